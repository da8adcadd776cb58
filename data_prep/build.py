"""The data build of one stage: raw sources -> processed, validated dataset + manifest.

    python -m data_prep recipes/stage1_medical.yaml

Steps: read each source -> canonical records (rejects counted by reason) -> AI Hub pair dedup ->
render the stage's template -> tokenize once with the stage's tokenizer -> length policy -> exact
dedup -> near dedup -> decontamination -> mix by weight -> train/eval split -> parquet +
manifest.json + rejects.jsonl + length histogram PNG. Runs once before launch, never on every rank.

Memory does not grow with the raw data: rows stream from the readers through those steps a chunk
(`CHUNK_ROWS`) at a time, rejected rows go straight to rejects.jsonl, and the kept rows (text and
token ids) are spilled to an Arrow file on disk. What stays in memory per kept row is a few numbers
(token counts, the dedup key, its id), plus the MinHash signature when near-dedup is on. The seeded
mix and split then pick rows by number, and the shuffled parquet is written through an external
shuffle (buckets of `SHUFFLE_BUCKET_BYTES`).

Everything is written into `<processed_dir>.tmp` and moved into place when complete, manifest.json
last; the manifest lists each file with its size and sha256, and `processed_state` refuses a folder
whose files do not match it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import sys
import time
from array import array
from collections import Counter
from dataclasses import asdict
from itertools import chain
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from data_prep import dedup
from data_prep.schemas import Record, canonicalize
from data_prep.sources import Reject, eval_texts, iter_source, local_files, resolve_local
from data_prep.templates import (
    Rendered,
    conversation_template,
    drop_first_exchange,
    expand_turns,
    render_conversation,
    render_texts,
    resolve_multi_turn,
    tokenize_pairs,
)
from train.core.config import CONVERSATION_SCHEMAS, Recipe
from train.core.errors import UserError
from train.core.io import (
    REJECTS_FILE,
    TMP_MARKER,
    atomic_write_text,
    fresh_tmp,
    replace_output,
    write_json,
    write_rejects,
)
from train.core.log import get_logger
from train.core.paths import REPO_ROOT

log = get_logger("data_prep")

PIPELINE_VERSION = 3  # bump when the build changes what it writes
MANIFEST = "manifest.json"
OUTPUT_FILES = ("train.parquet", "eval.parquet", REJECTS_FILE, "length_histogram.png", "report.txt")
HASH_CACHE = ".data_prep-hashes.json"  # beside the processed folders: {path: size, mtime_ns, inode, sha256}
CHUNK_ROWS = 512  # rows rendered, tokenized and deduplicated together
SHUFFLE_BUCKET_BYTES = 16 * 2**20  # rows held at once while writing the shuffled parquet
HASH_BLOCK = 2**20
RACY_NS = 3 * 10**9  # a hash taken this soon after the file's mtime is not trusted next time (as git does)
_WORK = "work"  # spill and shuffle files inside <processed_dir>.tmp, removed before the swap


def processed_dir(recipe: Recipe) -> Path:
    path = Path(recipe.data.processed_dir)
    return path if path.is_absolute() else REPO_ROOT / path


def hash_cache_path(recipe: Recipe) -> Path:
    return processed_dir(recipe).parent / HASH_CACHE


def sha256_file(path: Path) -> str:
    """The file's sha256, read a block at a time (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


class FileHashes:
    """sha256 of files, each computed once: remembered in this process and in a small JSON file (`HASH_CACHE`)
    keyed by the file's path, size, mtime_ns and inode, so every rank and every later run only stats it.
    A hash taken within `RACY_NS` of the file's mtime is recomputed next time (the file may still change within
    one timestamp tick)."""

    _memo: dict[tuple[str, int, int, int], tuple[str, int]] = {}  # shared by every instance in the process

    def __init__(self, cache_file: Path):
        self.cache_file = cache_file
        self._disk: dict | None = None
        self._dirty = False

    def _entries(self) -> dict:
        if self._disk is None:
            try:
                data = json.loads(self.cache_file.read_text(encoding="utf-8"))
                files = data["files"] if isinstance(data, dict) and data.get("version") == 1 else {}
            except (OSError, ValueError, KeyError):
                files = {}
            self._disk = files if isinstance(files, dict) else {}
        return self._disk

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int, int]:
        st = path.stat()
        return str(path), st.st_size, st.st_mtime_ns, st.st_ino

    def sha256(self, path: Path) -> str:
        path = path.resolve()
        key = self._key(path)
        known = self._memo.get(key)
        if known is None:
            entry = self._entries().get(key[0])
            if isinstance(entry, dict) and (entry.get("size"), entry.get("mtime_ns"), entry.get("inode")) == key[1:]:
                known = (str(entry.get("sha256")), int(entry.get("hashed_ns", 0)))
        if known is None or known[1] - key[2] < RACY_NS:
            known = (sha256_file(path), time.time_ns())
        self._remember(key, *known)
        return known[0]

    def remember(self, path: Path, digest: str) -> None:
        """Record a hash computed elsewhere (the build hashes what it wrote before moving it into place)."""
        self._remember(self._key(path.resolve()), digest, time.time_ns())

    def _remember(self, key: tuple[str, int, int, int], digest: str, hashed_ns: int) -> None:
        self._memo[key] = (digest, hashed_ns)
        entry = {"size": key[1], "mtime_ns": key[2], "inode": key[3], "sha256": digest, "hashed_ns": hashed_ns}
        entries = self._entries()
        if entries.get(key[0]) != entry:
            entries[key[0]] = entry
            self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        entries = self._entries()
        for name in [n for n in entries if not Path(n).is_file()]:  # files since removed
            del entries[name]
        try:
            atomic_write_text(self.cache_file, json.dumps({"version": 1, "files": entries}, indent=1) + "\n")
        except OSError as err:  # a read-only data folder: the hashes are recomputed next time
            log.warning("cannot write the file-hash cache %s (%s)", self.cache_file, err.strerror or err)
        self._dirty = False


def tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]).encode())
    return h.hexdigest()


def check_decontaminate(recipe: Recipe) -> None:
    """Every `data.decontaminate` entry must name an existing local file or folder: one line, before any work."""
    for i, path in enumerate(recipe.data.decontaminate):
        candidate = Path(path) if Path(path).is_absolute() else REPO_ROOT / path
        if not candidate.exists():
            raise UserError(
                f"{recipe.source_path}: data.decontaminate[{i}] {path!r} not found ({candidate}); give a local eval "
                "file or folder, or remove the entry"
            )


def fingerprint(recipe: Recipe, tokenizer) -> str:
    """Changes when any input file, the data settings, the template or the tokenizer changes.

    Each local file's bytes are hashed once (`FileHashes`): later calls, other ranks and later runs stat it."""
    check_decontaminate(recipe)
    h = hashlib.sha256(f"pipeline:{PIPELINE_VERSION}".encode())
    spec = asdict(recipe.data)
    spec.pop("processed_dir")
    h.update(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode())
    hashes = FileHashes(hash_cache_path(recipe))
    locals_: list[Path] = []
    for source in recipe.data.sources:
        local = resolve_local(source.path, REPO_ROOT) if source.loader != "hub" or Path(source.path).exists() else None
        if local is None:  # Hub: identified by id, config and split
            h.update(f"hub:{source.path}:{source.config_name}:{source.split}".encode())
            continue
        locals_.append(local)
    for path in recipe.data.decontaminate:
        found = resolve_local(path, REPO_ROOT)
        if found is not None:
            locals_.append(found)
    for local in locals_:
        for file in local_files(local):
            h.update(file.name.encode())
            h.update(bytes.fromhex(hashes.sha256(file)))
    hashes.save()
    h.update(tokenizer_digest(tokenizer).encode())
    return h.hexdigest()[:16]


class _Rejects:
    """rejects.jsonl, written as rows are rejected (never all held in memory), counted by reason.

    `append` (what readers and validation call) is a row that could not be read or is invalid: it counts
    toward data.max_reject_fraction. `drop` is a valid row left out (length, duplicate, contamination)."""

    def __init__(self, folder: Path, buffer_rows: int = 1000):
        self.folder, self.buffer_rows = folder, buffer_rows
        self._buffer: list[Reject] = []
        self.validation: Counter = Counter()
        self.first: dict[str, Reject] = {}  # first invalid row of each reason, for the error message
        self.unread: Counter = Counter()  # rows a reader could not read, per source: raw rows never yielded
        write_rejects(folder, [])

    def append(self, reject: Reject) -> None:
        self.validation[reject.reason] += 1
        self.first.setdefault(reject.reason, reject)
        if reject.row is None:
            self.unread[reject.source] += 1
        self.drop(reject)

    def drop(self, reject: Reject) -> None:
        self._buffer.append(reject)
        if len(self._buffer) >= self.buffer_rows:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            write_rejects(self.folder, self._buffer, append=True)
            self._buffer = []


def _spill_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("prompt", pa.string()),
            ("completion", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("mask_runs", pa.list_(pa.int32())),  # alternating untrained/trained token counts, an even number
        ]
    )


def _output_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("prompt", pa.string()),
            ("completion", pa.string()),
            ("input_ids", pa.list_(pa.int64())),
            ("completion_mask", pa.list_(pa.int64())),
            ("num_tokens", pa.int64()),
        ]
    )


def _record_text(rec: Record) -> str:
    # The record's own text, not the rendered template: a shared system prompt would make every pair look alike.
    return "\n".join(t for t in (rec.question, rec.reasoning, rec.answer) if t)


def _eval_ngrams(data, tokenizer) -> np.ndarray | None:
    """The token n-gram hashes of every text of the decontamination sets (tokenized a batch at a time)."""
    if not data.decontaminate:
        return None
    parts: list[np.ndarray] = []
    for path in data.decontaminate:
        batch: list[str] = []
        for text in chain(eval_texts(path, REPO_ROOT), [None]):
            if text is not None:
                batch.append(text)
            if batch and (text is None or len(batch) >= CHUNK_ROWS):
                ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
                parts.append(dedup.ngram_set(ids, data.decontaminate_ngram))
                batch = []
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)


class _Stream:
    """The streaming part of the build: read -> validate -> pair dedup -> render -> tokenize -> length policy ->
    exact dedup -> near dedup -> decontamination, a chunk at a time; kept rows are spilled to `spill_path`."""

    def __init__(self, recipe: Recipe, tokenizer, rejects: _Rejects, eval_hashes: np.ndarray | None, spill: Path):
        import pyarrow as pa

        self.recipe, self.data, self.tokenizer, self.rejects = recipe, recipe.data, tokenizer, rejects
        self.eval_hashes = eval_hashes
        self.raw_counts: Counter = Counter()
        self.length_counts: Counter = Counter()
        self.pairs_seen: dict[bytes, str] = {}  # AI Hub pair digest -> the row that kept it
        self.exact_seen: dict[bytes, int] = {}  # normalized prompt+completion digest -> index into self.names
        self.names: list[str] = []  # "source:row_id" of each row past exact dedup (near dedup's row numbers)
        self.near = self._near_deduper()
        self.dedup_seconds = 0.0
        self.phase_seconds: dict[str, float] = {}  # read, tokenize, dedup, decontaminate, spill, write
        self.phase_rows: Counter = Counter()
        self.counts: Counter = Counter()  # duplicate_pair, duplicate, near_duplicate, contaminated
        self.by_source: dict[str, list[int]] = {}  # kept rows (spill row numbers) per source, in reading order
        self.lengths = array("i")  # tokens per kept row (prompt + completion)
        self.prompt_lengths = array("i")
        self.spill_bytes = 0
        self.spill_path = spill
        self.writer = pa.ipc.new_file(str(spill), _spill_schema(), options=pa.ipc.IpcWriteOptions(compression="zstd"))
        # Conversations: the template they are rendered with, and data.multi_turn resolved against it.
        self.chat_template, self.multi_turn = None, None
        self.conversation_rows = 0  # kept examples made from conversations
        if any(s.schema in CONVERSATION_SCHEMAS for s in self.data.sources):
            self.chat_template = conversation_template(self.data.template, self.data.system_prompt, tokenizer)
            self.multi_turn = resolve_multi_turn(
                self.data.multi_turn, self.data.template, self.chat_template, tokenizer
            )

    def _near_deduper(self):
        cfg = self.data.dedup
        if cfg.near == "minhash":
            return dedup.MinHashDeduper(
                cfg.minhash_threshold, cfg.ngram, cfg.num_perm, seed=self.data.seed, backend=cfg.minhash_backend
            )
        if cfg.near == "semantic":
            return dedup.SemanticDeduper(cfg.semantic_threshold, cfg.semantic_model)
        return None

    def run(self) -> None:
        chunk: list[Record] = []
        # A bar on a terminal; in logs (not a TTY) one line per phase at the end (log_phases).
        bar = tqdm(desc="data_prep", unit=" rows", disable=not sys.stderr.isatty())
        mark = time.perf_counter()
        try:
            for source in self.data.sources:
                for row in iter_source(source, REPO_ROOT, self.rejects):
                    self.raw_counts[source.name] += 1
                    result = canonicalize(row, source, self.data.seed)
                    if isinstance(result, Reject):
                        self.rejects.append(result)
                    elif not self._repeated_pair(result):
                        chunk.append(result)
                        if len(chunk) >= CHUNK_ROWS:
                            self._timed("read", len(chunk), mark)
                            self._process(chunk)
                            bar.update(len(chunk))
                            bar.set_postfix(kept=len(self.lengths), near_dups=self.counts["near_duplicate"])
                            chunk = []
                            mark = time.perf_counter()
            self._timed("read", len(chunk), mark)
            self._process(chunk)
            bar.update(len(chunk))
        finally:
            bar.close()
            self.writer.close()
        # Rows rejected while reading (malformed lines) were never yielded: count them as raw rows too.
        self.raw_counts.update(self.rejects.unread)

    def _timed(self, phase: str, rows: int, since: float) -> float:
        now = time.perf_counter()
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + now - since
        self.phase_rows[phase] += rows
        return now

    def log_phases(self) -> None:
        for phase, seconds in self.phase_seconds.items():
            rows = self.phase_rows[phase]
            log.info("data_prep %-13s %9d rows %8.1f s %9.0f rows/s", phase, rows, seconds, rows / max(seconds, 1e-9))

    def _repeated_pair(self, rec: Record) -> bool:
        """An AI Hub pair already seen (normalized Korean + English), in this file or another: dropped before
        rendering, since its two copies may be rendered in opposite directions and then differ as text."""
        if rec.pair_key is None:
            return False
        key = rec.pair_key[:16]
        first = self.pairs_seen.get(key)
        if first is None:
            self.pairs_seen[key] = f"{rec.source}:{rec.row_id}"
            return False
        self.counts["duplicate_pair"] += 1
        self.rejects.drop(
            Reject(rec.source, rec.row_id, "duplicate_pair", f"same Korean-English pair (normalized) as {first}")
        )
        return True

    def _process(self, records: list[Record]) -> None:
        if not records:
            return
        data = self.data
        mark = time.perf_counter()
        if self.multi_turn == "expand":
            records = [part for rec in records for part in (expand_turns(rec) if rec.turns else [rec])]
        single = [rec for rec in records if rec.turns is None]
        prompts, completions = render_texts(single, data.template, data.system_prompt, data.empty_think, self.tokenizer)
        flat = iter(tokenize_pairs(prompts, completions, self.tokenizer) if single else [])
        del prompts, completions
        rendered: list[Rendered] = []
        for i, rec in enumerate(records):
            if rec.turns is None:
                rendered.append(next(flat))
            else:
                r, records[i] = self._render_conversation(rec)
                rendered.append(r)
        kept, counts = _apply_length_policy(rendered, records, self.recipe, self.rejects)
        self.length_counts.update(counts)
        mark = self._timed("tokenize", len(records), mark)
        rows = len(kept)
        kept = self._deduplicate(kept)
        self.dedup_seconds += time.perf_counter() - mark
        mark = self._timed("dedup", rows, mark)
        rows = len(kept)
        kept = self._decontaminate(kept)
        mark = self._timed("decontaminate", rows, mark)
        self._spill(kept)
        self._timed("spill", len(kept), mark)

    def _render_conversation(self, rec: Record) -> tuple[Rendered, Record]:
        """A conversation rendered; with length_policy truncate, its earliest exchanges dropped (whole turns,
        counted) until it fits, or until only the trained last exchange is left (then the length policy drops it)."""
        data = self.data
        while True:
            r = render_conversation(
                rec, data.template, data.system_prompt, data.empty_think, self.tokenizer, self.chat_template or ""
            )
            shorter = drop_first_exchange(rec) if data.length_policy == "truncate" else None
            if len(r.prompt_ids) + len(r.completion_ids) <= data.max_length or shorter is None:
                return r, rec
            self.length_counts["turns_dropped"] += 2
            rec = shorter

    def _deduplicate(self, kept: list) -> list:
        if self.data.dedup.exact:
            unique = []
            for r, rec in kept:
                text = dedup.normalize(r.prompt + "\x00" + r.completion)
                key = hashlib.blake2b(text.encode(), digest_size=16).digest()
                if key in self.exact_seen:
                    self.counts["duplicate"] += 1
                    original = self.names[self.exact_seen[key]]
                    self.rejects.drop(
                        Reject(rec.source, rec.row_id, "duplicate", f"exact duplicate (normalized text) of {original}")
                    )
                    continue
                self.exact_seen[key] = len(self.names)
                unique.append((r, rec))
                self.names.append(f"{rec.source}:{rec.row_id}")
            kept = unique
        else:
            self.names.extend(f"{rec.source}:{rec.row_id}" for _, rec in kept)
        if self.near is None or not kept:
            return kept
        base = self.near.rows
        dropped = self.near.add([_record_text(rec) for _, rec in kept])
        cfg = self.data.dedup
        if cfg.near == "minhash":
            how = f"MinHash Jaccard >= {cfg.minhash_threshold}"
        else:
            how = f"cosine >= {cfg.semantic_threshold} ({cfg.semantic_model})"
        for index, original in sorted(dropped.items()):
            rec = kept[index - base][1]
            self.counts["near_duplicate"] += 1
            self.rejects.drop(Reject(rec.source, rec.row_id, "near_duplicate", f"{how} with {self.names[original]}"))
        return [item for i, item in enumerate(kept) if base + i not in dropped]

    def _decontaminate(self, kept: list) -> list:
        if self.eval_hashes is None or not kept:
            return kept
        n, data = self.data.decontaminate_ngram, self.data
        bad = set(dedup.rows_sharing_ngrams([r.input_ids for r, _ in kept], self.eval_hashes, n))
        for i in sorted(bad):
            rec = kept[i][1]
            self.counts["contaminated"] += 1
            self.rejects.drop(
                Reject(
                    rec.source,
                    rec.row_id,
                    "contaminated",
                    f"shares a {n}-token n-gram with {', '.join(data.decontaminate)}",
                )
            )
        return [item for i, item in enumerate(kept) if i not in bad]

    def _spill(self, kept: list[tuple[Rendered, Record]]) -> None:
        import pyarrow as pa

        if not kept:
            return
        # Untrained tokens per row (a conversation's history and role headers count as prompt).
        prompt_lens = [sum(r.mask_runs[0::2]) for r, _ in kept]
        totals = [len(r.prompt_ids) + len(r.completion_ids) for r, _ in kept]
        offsets = np.zeros(len(kept) + 1, dtype=np.int32)
        np.cumsum(totals, out=offsets[1:])
        values = np.fromiter(
            chain.from_iterable(chain(r.prompt_ids, r.completion_ids) for r, _ in kept),
            dtype=np.int32,
            count=int(offsets[-1]),
        )
        batch = pa.record_batch(
            [
                pa.array([f"{rec.source}:{rec.row_id}" for _, rec in kept], pa.string()),
                pa.array([rec.source for _, rec in kept], pa.string()),
                pa.array([r.prompt for r, _ in kept], pa.string()),
                pa.array([r.completion for r, _ in kept], pa.string()),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)),
                pa.array([r.mask_runs for r, _ in kept], pa.list_(pa.int32())),
            ],
            schema=_spill_schema(),
        )
        self.writer.write_batch(batch)
        self.spill_bytes += batch.nbytes
        self.conversation_rows += sum(rec.turns is not None for _, rec in kept)
        first = len(self.lengths)
        for i, (_, rec) in enumerate(kept):
            self.by_source.setdefault(rec.source, []).append(first + i)
        self.lengths.extend(totals)
        self.prompt_lengths.extend(prompt_lens)


def _apply_length_policy(rendered: list[Rendered], records: list[Record], recipe: Recipe, rejects: _Rejects):
    max_len, policy = recipe.data.max_length, recipe.data.length_policy
    kept: list = []
    counts: Counter = Counter()
    for r, rec in zip(rendered, records, strict=True):
        total = len(r.prompt_ids) + len(r.completion_ids)
        if total <= max_len:
            kept.append((r, rec))
            continue
        if policy == "error":
            raise UserError(
                f"source '{rec.source}' row {rec.row_id}: {total} tokens > data.max_length={max_len} "
                "(raise max_length or set data.length_policy: drop|truncate)"
            )
        room = max_len - len(r.prompt_ids) - 1
        if rec.turns is not None:  # a conversation is never cut inside a turn (its earlier turns went first)
            counts["too_long"] += 1
            rejects.drop(
                Reject(rec.source, rec.row_id, "too_long", f"{total} tokens > {max_len} with its last exchange alone")
            )
            continue
        if policy == "truncate" and room >= 1:
            # Cut the completion's text tokens, never its EOS.
            r.completion_ids = r.completion_ids[:room] + r.completion_ids[-1:]
            counts["truncated"] += 1
            kept.append((r, rec))
            continue
        reason = "prompt_too_long" if policy == "truncate" else "too_long"
        counts[reason] += 1
        rejects.drop(Reject(rec.source, rec.row_id, reason, f"{total} tokens > {max_len}"))
    return kept, counts


def _mix(by_source: dict[str, list], recipe: Recipe, rng: random.Random) -> tuple[list, dict]:
    mixed, counts = [], {}
    for source in recipe.data.sources:
        rows = by_source.get(source.name, [])
        whole, frac = int(source.weight), source.weight - int(source.weight)
        taken = rows * whole + rng.sample(rows, round(len(rows) * frac))
        if source.max_rows is not None:
            taken = taken[: source.max_rows]
        counts[source.name] = len(taken)
        mixed.extend(taken)
    rng.shuffle(mixed)
    return mixed, counts


def _percentiles(lengths) -> dict:
    if len(lengths) == 0:
        return {}
    arr = np.asarray(lengths)
    return {
        "p50": int(np.percentile(arr, 50)),
        "p90": int(np.percentile(arr, 90)),
        "p99": int(np.percentile(arr, 99)),
        "max": int(arr.max()),
        "mean": round(float(arr.mean()), 1),
    }


def _write_histogram(lengths, max_length: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=40, color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per example (prompt + completion)")
    ax.set_ylabel("examples")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _output_table(table):
    """Spill rows -> the processed parquet's columns: int64 token ids, the loss mask (0 over the prompt, 1 over
    the completion), the token count."""
    import pyarrow as pa
    import pyarrow.compute as pc

    ids = table.column("input_ids").combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    values = pa.array(ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64))
    # Every row's runs alternate 0s and 1s, starting with 0s, and are even in number: flattened over the rows
    # they still alternate, so one repeat builds every mask (a prompt then a completion, or a conversation's turns).
    runs = table.column("mask_runs").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    mask = pa.array(np.repeat(np.tile(np.array([0, 1], dtype=np.int64), len(runs) // 2), runs))
    return pa.table(
        [
            table.column("id"),
            table.column("source"),
            table.column("prompt"),
            table.column("completion"),
            pa.ListArray.from_arrays(offsets, values),
            pa.ListArray.from_arrays(offsets, mask),
            pa.array(lengths),
        ],
        schema=_output_schema(),
    )


def _write_shuffled(spill: Path, mixed: np.ndarray, n_eval: int, out: Path, work: Path, row_bytes: float) -> None:
    """eval.parquet = rows at positions [0, n_eval) of `mixed` (spill row numbers, in their seeded order),
    train.parquet = the rest, in that order, with bounded memory: an external shuffle. Each spill batch's rows
    go to the bucket file of their position range (about SHUFFLE_BUCKET_BYTES each); then each bucket is read,
    put in position order and appended to the parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = len(mixed)
    per_bucket = max(1, int(SHUFFLE_BUCKET_BYTES // max(row_bytes, 1.0)), math.ceil(total / 256))
    order = np.argsort(mixed, kind="stable")  # positions, by spill row
    wanted = mixed[order]
    writers: dict = {}
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(str(spill)) as f, pa.ipc.open_file(f) as reader:
        start = 0
        for b in range(reader.num_record_batches):
            batch = reader.get_batch(b)
            lo, hi = np.searchsorted(wanted, [start, start + batch.num_rows])
            positions, local = order[lo:hi], wanted[lo:hi] - start
            buckets = positions // per_bucket
            by_bucket = np.argsort(buckets, kind="stable")
            positions, local, buckets = positions[by_bucket], local[by_bucket], buckets[by_bucket]
            bounds = [0, *(np.flatnonzero(np.diff(buckets)) + 1).tolist(), len(buckets)]
            for a, z in zip(bounds[:-1], bounds[1:], strict=True):
                if a == z:
                    continue
                part = batch.take(pa.array(local[a:z]))
                part = pa.RecordBatch.from_arrays(
                    [*part.columns, pa.array(positions[a:z])], names=[*part.schema.names, "pos"]
                )
                k = int(buckets[a])
                if k not in writers:
                    writers[k] = pa.ipc.new_file(str(work / f"bucket-{k}.arrow"), part.schema, options=options)
                writers[k].write_batch(part)
            start += batch.num_rows
    for writer in writers.values():
        writer.close()
    schema = _output_schema()
    with pq.ParquetWriter(out / "train.parquet", schema) as train, pq.ParquetWriter(out / "eval.parquet", schema) as ev:
        for k in sorted(writers):
            path = work / f"bucket-{k}.arrow"
            with pa.OSFile(str(path)) as f, pa.ipc.open_file(f) as reader:
                table = reader.read_all()
            table = table.take(pa.array(np.argsort(table.column("pos").to_numpy(), kind="stable")))
            cut = int(np.searchsorted(table.column("pos").to_numpy(), n_eval))
            if cut:
                ev.write_table(_output_table(table.slice(0, cut)))
            if cut < table.num_rows:
                train.write_table(_output_table(table.slice(cut)))
            del table
            path.unlink()


def _split(mixed: list, eval_fraction: float) -> tuple[list, list]:
    """(train, eval): the first share of the shuffled rows is held out, at least one row when asked for."""
    n_eval = int(round(len(mixed) * eval_fraction)) if len(mixed) > 1 else 0
    if eval_fraction > 0 and len(mixed) > 1:
        n_eval = max(1, n_eval)
    return mixed[n_eval:], mixed[:n_eval]


def _check_processed_dir(recipe: Recipe, out: Path) -> None:
    """The build replaces data.processed_dir as a whole: refuse a folder holding anything it did not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{recipe.source_path}: data.processed_dir {out} is a file; point it at a folder")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (*OUTPUT_FILES, MANIFEST, TMP_MARKER))
    if foreign:
        raise UserError(
            f"{recipe.source_path}: data.processed_dir {out} holds files data_prep did not write "
            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); the build replaces the folder: "
            "give it a folder of its own or move them away"
        )


def build(recipe: Recipe, tokenizer) -> dict:
    """Build the processed dataset of `recipe` in `<processed_dir>.tmp`, move it into place; return its manifest."""
    started = time.perf_counter()
    data = recipe.data
    out = processed_dir(recipe)
    check_decontaminate(recipe)
    _check_processed_dir(recipe, out)
    digest = fingerprint(recipe, tokenizer)  # hashes each input file once (later calls only stat it)
    eval_hashes = _eval_ngrams(data, tokenizer)
    tmp = fresh_tmp(out, MANIFEST)
    work = tmp / _WORK
    work.mkdir()
    rejects = _Rejects(tmp)
    stream = _Stream(recipe, tokenizer, rejects, eval_hashes, work / "kept.arrow")
    try:
        stream.run()
    finally:
        rejects.flush()
    raw_counts = stream.raw_counts
    raw_total = sum(raw_counts.values())
    if raw_total == 0:
        raise UserError(f"recipe {recipe.source_path}: the sources hold no rows ({', '.join(raw_counts) or 'none'})")
    validation_rejects = rejects.validation
    reject_fraction = sum(validation_rejects.values()) / raw_total
    if reject_fraction > data.max_reject_fraction:
        top = rejects.first[validation_rejects.most_common(1)[0][0]]
        raise UserError(
            f"{reject_fraction:.1%} of raw rows were rejected (> data.max_reject_fraction="
            f"{data.max_reject_fraction}); reasons {dict(validation_rejects)}, e.g. source '{top.source}' row "
            f"{top.row_id}: {top.detail}; all listed in {tmp / REJECTS_FILE}"
        )
    mixed_list, mix_counts = _mix(stream.by_source, recipe, random.Random(data.seed))
    if not mixed_list:
        raise UserError(
            f"recipe {recipe.source_path}: no rows left after validation and length policy; see {tmp / REJECTS_FILE}"
        )
    train_list, eval_list = _split(mixed_list, data.eval_fraction)
    n_eval = len(eval_list)
    del train_list, eval_list
    mixed = np.asarray(mixed_list, dtype=np.int64)
    del mixed_list
    row_bytes = stream.spill_bytes / max(1, len(stream.lengths))
    mark = time.perf_counter()
    _write_shuffled(work / "kept.arrow", mixed, n_eval, tmp, work, row_bytes)
    stream._timed("write", len(mixed), mark)
    stream.log_phases()
    shutil.rmtree(work)
    all_lengths = np.frombuffer(stream.lengths, dtype=np.int32)
    completion_lengths = all_lengths - np.frombuffer(stream.prompt_lengths, dtype=np.int32)
    lengths = all_lengths[mixed]
    _write_histogram(lengths, data.max_length, tmp / "length_histogram.png", f"{recipe.stage}: {len(mixed)} rows")

    counts = stream.counts
    manifest = {
        "stage": recipe.stage,
        "fingerprint": digest,
        "tokenizer": tokenizer.name_or_path,
        "template": data.template,
        **(
            {"multi_turn": stream.multi_turn, "conversation_examples": stream.conversation_rows}
            if stream.multi_turn
            else {}
        ),
        "raw_rows": dict(raw_counts),
        "rejected": dict(validation_rejects),
        "reject_fraction": round(reject_fraction, 4),
        "length_policy": {"policy": data.length_policy, "max_length": data.max_length, **dict(stream.length_counts)},
        "duplicate_pairs_removed": counts["duplicate_pair"],
        "duplicates_removed": counts["duplicate"],
        "near_duplicates_removed": counts["near_duplicate"],
        "near_dedup_method": data.dedup.near,
        "dedup_seconds": round(stream.dedup_seconds, 2),
        # MinHash band entries a full bucket did not take (dedup.MinHashDeduper.BUCKET_CAP): template-heavy data
        "minhash_saturated_band_entries": getattr(stream.near, "saturated", 0),
        "contaminated_removed": counts["contaminated"],
        "mixed_rows": mix_counts,
        "train_rows": len(mixed) - n_eval,
        "eval_rows": n_eval,
        "train_tokens": int(all_lengths[mixed[n_eval:]].sum()),
        "train_completion_tokens": int(completion_lengths[mixed[n_eval:]].sum()),
        "length_percentiles": _percentiles(lengths),
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_text(tmp / "report.txt", format_report(manifest) + "\n")
    digests = {name: sha256_file(tmp / name) for name in OUTPUT_FILES}
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": digests[name]} for name in OUTPUT_FILES}
    manifest["files"] = files
    write_json(tmp / MANIFEST, manifest)  # last: a folder without it was never finished
    replace_output(tmp, out)
    hashes = FileHashes(hash_cache_path(recipe))
    for name, sha in digests.items():
        hashes.remember(out / name, sha)
    hashes.save()
    return manifest


def format_report(manifest: dict) -> str:
    lines = [f"data build: {manifest['stage']}  (fingerprint {manifest['fingerprint']})"]
    lines.append(f"  {'source':<22}{'raw':>8}{'kept':>8}")
    for name, raw in manifest["raw_rows"].items():
        lines.append(f"  {name:<22}{raw:>8}{manifest['mixed_rows'].get(name, 0):>8}")
    rejected = ", ".join(f"{k}={v}" for k, v in manifest["rejected"].items()) or "none"
    lines.append(f"  rejected: {rejected}  ({manifest['reject_fraction']:.1%} of raw rows)")
    lp = manifest["length_policy"]
    extra = ", ".join(f"{k}={v}" for k, v in lp.items() if k not in ("policy", "max_length")) or "none"
    lines.append(f"  length policy {lp['policy']} at {lp['max_length']} tokens: {extra}")
    pairs = manifest.get("duplicate_pairs_removed", 0)
    lines.append(
        f"  duplicates removed: {f'same AI Hub pair {pairs}, ' if pairs else ''}exact {manifest['duplicates_removed']}, "
        f"near {manifest['near_duplicates_removed']} ({manifest['near_dedup_method']}, "
        f"{manifest['dedup_seconds']}s), contaminated {manifest['contaminated_removed']}"
    )
    pct = manifest["length_percentiles"]
    lines.append(
        f"  tokens/example p50={pct.get('p50')} p90={pct.get('p90')} p99={pct.get('p99')} max={pct.get('max')}"
    )
    lines.append(
        f"  train rows {manifest['train_rows']} ({manifest['train_tokens']} tokens), eval rows {manifest['eval_rows']}"
    )
    return "\n".join(lines)


def _files_problem(out: Path, manifest: dict, hashes: FileHashes) -> str | None:
    """Why the folder's files are not the ones its manifest lists (None when they are)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not {"train.parquet", "eval.parquet"} <= set(files):
        return f"{MANIFEST} lists no files (an older or interrupted build)"
    for name, info in files.items():
        path = out / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if not isinstance(info, dict) or size != info.get("bytes"):
            return f"{name} is {size} bytes, {MANIFEST} says {info.get('bytes') if isinstance(info, dict) else '?'}"
        if hashes.sha256(path) != info.get("sha256"):
            return f"{name} does not match its sha256 in {MANIFEST}"
    return None


def processed_state(recipe: Recipe, tokenizer) -> str:
    """'fresh' when the processed data matches the recipe, its files and the tokenizer, and the folder holds
    exactly the files its manifest lists; else why not ('missing', 'stale (...)', 'incomplete (...)')."""
    check_decontaminate(recipe)  # a recipe that cannot build says so now, not after `python -m data_prep`
    out = processed_dir(recipe)
    path = out / MANIFEST
    if not path.is_file():
        partial = sorted(p.name for p in out.iterdir() if p.name in OUTPUT_FILES) if out.is_dir() else []
        if partial:
            return f"incomplete ({', '.join(partial)} without {MANIFEST}: an interrupted or older build)"
        return "missing"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"incomplete ({MANIFEST} cannot be read)"
    if not isinstance(manifest, dict):
        return f"incomplete ({MANIFEST} is not a manifest)"
    expected = fingerprint(recipe, tokenizer)
    if manifest.get("fingerprint") != expected:
        return (
            f"stale (fingerprint {manifest.get('fingerprint')} != {expected}: a source, the data settings or "
            "the tokenizer changed)"
        )
    hashes = FileHashes(hash_cache_path(recipe))
    problem = _files_problem(out, manifest, hashes)
    hashes.save()
    return f"incomplete ({problem})" if problem else "fresh"


def require_fresh(recipe: Recipe, tokenizer) -> None:
    """Refuse, with the command to run, when the processed data is missing, stale or incomplete."""
    state = processed_state(recipe, tokenizer)
    if state != "fresh":
        raise UserError(
            f"processed data in {processed_dir(recipe)} is {state}; run `{recipe.command('data_prep')}` before "
            "launching"
        )


def load_processed(recipe: Recipe, tokenizer, allow_build: bool):
    """The processed train/eval datasets (input_ids + completion_mask) and their manifest.

    The manifest's fingerprint must match the recipe, its files and the tokenizer, and the folder's files
    the manifest. When it is missing, stale or incomplete, a single-process run builds it; a distributed
    launch refuses, so that the data is prepared once before launch, not on every rank.
    """
    import datasets
    import pyarrow.parquet as pq

    out = processed_dir(recipe)
    state = processed_state(recipe, tokenizer)
    if state != "fresh":
        if not allow_build:
            require_fresh(recipe, tokenizer)
        log.info("processed data in %s is %s: building it", out, state)
        manifest = build(recipe, tokenizer)
        log.info("\n%s", format_report(manifest))
    else:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))

    def read(name: str):
        table = pq.read_table(out / name, columns=["input_ids", "completion_mask"])
        return datasets.Dataset(table) if table.num_rows else None

    train = read("train.parquet")
    if train is None:
        raise UserError(f"{out / 'train.parquet'} is empty; check the sources and data.eval_fraction")
    return train, read("eval.parquet"), manifest
