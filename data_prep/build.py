"""The data build of one stage: raw sources -> processed, validated dataset + manifest.

    python -m data_prep recipes/stage1_medical.yaml

Steps: read each source -> canonical records (rejects counted by reason) -> render the stage's
template -> tokenize once with the stage's tokenizer -> length policy -> exact dedup -> mix by
weight -> train/eval split -> parquet + manifest.json + rejects.jsonl + length histogram PNG.
Runs once before launch, never on every rank.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from data_prep import dedup
from data_prep.schemas import Record, canonicalize
from data_prep.sources import Reject, eval_texts, iter_source, local_files, resolve_local
from data_prep.templates import Rendered, render_texts, tokenize_pairs
from train.core.config import Recipe
from train.core.errors import UserError
from train.core.io import REJECTS_FILE, write_json, write_rejects
from train.core.log import get_logger
from train.core.paths import REPO_ROOT

log = get_logger("data_prep")

PIPELINE_VERSION = 2  # bump when the build changes what it writes


def processed_dir(recipe: Recipe) -> Path:
    path = Path(recipe.data.processed_dir)
    return path if path.is_absolute() else REPO_ROOT / path


def tokenizer_digest(tokenizer) -> str:
    h = hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    h.update(json.dumps([tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token]).encode())
    return h.hexdigest()


def fingerprint(recipe: Recipe, tokenizer) -> str:
    """Changes when any input file, the data settings, the template or the tokenizer changes."""
    h = hashlib.sha256(f"pipeline:{PIPELINE_VERSION}".encode())
    spec = asdict(recipe.data)
    spec.pop("processed_dir")
    h.update(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode())
    local_paths = [(s.path, s.loader) for s in recipe.data.sources] + [(p, "local") for p in recipe.data.decontaminate]
    for path, loader in local_paths:
        local = resolve_local(path, REPO_ROOT) if loader != "hub" or Path(path).exists() else None
        if local is None:  # Hub: identified by id, config and split
            source = next(s for s in recipe.data.sources if s.path == path)
            h.update(f"hub:{source.path}:{source.config_name}:{source.split}".encode())
            continue
        for file in local_files(local):
            h.update(file.name.encode())
            h.update(hashlib.sha256(file.read_bytes()).digest())
    h.update(tokenizer_digest(tokenizer).encode())
    return h.hexdigest()[:16]


def _apply_length_policy(rendered: list[Rendered], records: list[Record], recipe: Recipe, rejects: list[Reject]):
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
        if policy == "truncate" and room >= 1:
            # Cut the completion's text tokens, never its EOS.
            r.completion_ids = r.completion_ids[:room] + r.completion_ids[-1:]
            counts["truncated"] += 1
            kept.append((r, rec))
            continue
        reason = "prompt_too_long" if policy == "truncate" else "too_long"
        counts[reason] += 1
        rejects.append(Reject(rec.source, rec.row_id, reason, f"{total} tokens > {max_len}"))
    return kept, counts


def _record_text(rec: Record) -> str:
    # The record's own text, not the rendered template: a shared system prompt would make every pair look alike.
    return "\n".join(t for t in (rec.question, rec.reasoning, rec.answer) if t)


def _deduplicate(kept: list, data) -> tuple[list, list[Reject]]:
    removed: list[Reject] = []
    if data.dedup.exact:
        seen, unique = set(), []
        for r, rec in kept:
            key = hashlib.sha256(dedup.normalize(r.prompt + "\x00" + r.completion).encode()).hexdigest()
            if key in seen:
                removed.append(Reject(rec.source, rec.row_id, "duplicate", "exact duplicate (normalized text)"))
                continue
            seen.add(key)
            unique.append((r, rec))
        kept = unique
    if data.dedup.near != "none" and len(kept) > 1:
        texts = [_record_text(rec) for _, rec in kept]
        cfg = data.dedup
        if cfg.near == "minhash":
            dropped = dedup.minhash_duplicates(texts, cfg.minhash_threshold, cfg.ngram, cfg.num_perm, seed=data.seed)
            how = f"MinHash Jaccard >= {cfg.minhash_threshold}"
        else:
            dropped = dedup.semantic_duplicates(texts, cfg.semantic_threshold, cfg.semantic_model)
            how = f"cosine >= {cfg.semantic_threshold} ({cfg.semantic_model})"
        for index, original in sorted(dropped.items()):
            rec, orig = kept[index][1], kept[original][1]
            removed.append(Reject(rec.source, rec.row_id, "near_duplicate", f"{how} with {orig.source}:{orig.row_id}"))
        kept = [item for i, item in enumerate(kept) if i not in dropped]
    return kept, removed


def _decontaminate(kept: list, data, tokenizer) -> tuple[list, list[Reject]]:
    if not data.decontaminate:
        return kept, []
    texts = [t for path in data.decontaminate for t in eval_texts(path, REPO_ROOT)]
    eval_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    bad = set(dedup.contaminated_rows([r.input_ids for r, _ in kept], eval_ids, data.decontaminate_ngram))
    removed = [
        Reject(
            rec.source,
            rec.row_id,
            "contaminated",
            f"shares a {data.decontaminate_ngram}-token n-gram with {', '.join(data.decontaminate)}",
        )
        for i, (_, rec) in enumerate(kept)
        if i in bad
    ]
    return [item for i, item in enumerate(kept) if i not in bad], removed


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


def _percentiles(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    import numpy as np

    arr = np.asarray(lengths)
    return {
        "p50": int(np.percentile(arr, 50)),
        "p90": int(np.percentile(arr, 90)),
        "p99": int(np.percentile(arr, 99)),
        "max": int(arr.max()),
        "mean": round(float(arr.mean()), 1),
    }


def _write_histogram(lengths: list[int], max_length: int, path: Path, title: str) -> None:
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


def _write_parquet(rows: list[tuple[Rendered, Record]], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": [f"{rec.source}:{rec.row_id}" for _, rec in rows],
            "source": [rec.source for _, rec in rows],
            "prompt": [r.prompt for r, _ in rows],
            "completion": [r.completion for r, _ in rows],
            "input_ids": [r.input_ids for r, _ in rows],
            "completion_mask": [r.completion_mask for r, _ in rows],
            "num_tokens": [len(r.input_ids) for r, _ in rows],
        }
    )
    pq.write_table(table, path)


def read_records(recipe: Recipe) -> tuple[list[Record], list[Reject], Counter]:
    """Every source read and mapped to canonical records: (records, rejects, raw rows per source)."""
    rejects: list[Reject] = []
    raw_counts: Counter = Counter()
    records: list[Record] = []
    for source in recipe.data.sources:
        for row in iter_source(source, REPO_ROOT, rejects):
            raw_counts[source.name] += 1
            result = canonicalize(row, source, recipe.data.seed)
            if isinstance(result, Reject):
                rejects.append(result)
            else:
                records.append(result)
    # Rows rejected while reading (malformed lines) were never yielded: count them as raw rows too.
    for rej in rejects:
        if rej.row is None:
            raw_counts[rej.source] += 1
    if sum(raw_counts.values()) == 0:
        raise UserError(f"recipe {recipe.source_path}: the sources hold no rows ({', '.join(raw_counts) or 'none'})")
    return records, rejects, raw_counts


def _split(mixed: list, eval_fraction: float) -> tuple[list, list]:
    """(train, eval): the first share of the shuffled rows is held out, at least one row when asked for."""
    n_eval = int(round(len(mixed) * eval_fraction)) if len(mixed) > 1 else 0
    if eval_fraction > 0 and len(mixed) > 1:
        n_eval = max(1, n_eval)
    return mixed[n_eval:], mixed[:n_eval]


def build(recipe: Recipe, tokenizer) -> dict:
    """Build the processed dataset of `recipe`; return its manifest."""
    started = time.perf_counter()
    data = recipe.data
    out = processed_dir(recipe)
    out.mkdir(parents=True, exist_ok=True)
    records, rejects, raw_counts = read_records(recipe)
    validation_rejects = Counter(r.reason for r in rejects)
    reject_fraction = sum(validation_rejects.values()) / sum(raw_counts.values())

    prompts, completions = render_texts(records, data.template, data.system_prompt, data.empty_think, tokenizer)
    rendered = tokenize_pairs(prompts, completions, tokenizer)
    kept, length_counts = _apply_length_policy(rendered, records, recipe, rejects)
    dedup_started = time.perf_counter()
    kept, removed = _deduplicate(kept, data)
    dedup_seconds = time.perf_counter() - dedup_started
    kept, contaminated = _decontaminate(kept, data, tokenizer)
    rejects.extend(removed + contaminated)

    by_source: dict[str, list] = {}
    for item in kept:
        by_source.setdefault(item[1].source, []).append(item)
    mixed, mix_counts = _mix(by_source, recipe, random.Random(data.seed))
    write_rejects(out, rejects)
    if reject_fraction > data.max_reject_fraction:
        top = next(r for r in rejects if r.reason == validation_rejects.most_common(1)[0][0])
        raise UserError(
            f"{reject_fraction:.1%} of raw rows were rejected (> data.max_reject_fraction="
            f"{data.max_reject_fraction}); reasons {dict(validation_rejects)}, e.g. source '{top.source}' row "
            f"{top.row_id}: {top.detail}; all listed in {out / REJECTS_FILE}"
        )
    if not mixed:
        raise UserError(
            f"recipe {recipe.source_path}: no rows left after validation and length policy; see {out / REJECTS_FILE}"
        )
    train_rows, eval_rows = _split(mixed, data.eval_fraction)
    _write_parquet(train_rows, out / "train.parquet")
    _write_parquet(eval_rows, out / "eval.parquet")
    lengths = [len(r.input_ids) for r, _ in mixed]
    _write_histogram(lengths, data.max_length, out / "length_histogram.png", f"{recipe.stage}: {len(mixed)} rows")

    manifest = {
        "stage": recipe.stage,
        "fingerprint": fingerprint(recipe, tokenizer),
        "tokenizer": tokenizer.name_or_path,
        "template": data.template,
        "raw_rows": dict(raw_counts),
        "rejected": dict(validation_rejects),
        "reject_fraction": round(reject_fraction, 4),
        "length_policy": {"policy": data.length_policy, "max_length": data.max_length, **dict(length_counts)},
        "duplicates_removed": sum(r.reason == "duplicate" for r in removed),
        "near_duplicates_removed": sum(r.reason == "near_duplicate" for r in removed),
        "near_dedup_method": data.dedup.near,
        "dedup_seconds": round(dedup_seconds, 2),
        "contaminated_removed": len(contaminated),
        "mixed_rows": mix_counts,
        "train_rows": len(train_rows),
        "eval_rows": len(eval_rows),
        "train_tokens": sum(len(r.input_ids) for r, _ in train_rows),
        "train_completion_tokens": sum(len(r.completion_ids) for r, _ in train_rows),
        "length_percentiles": _percentiles(lengths),
        "seconds": round(time.perf_counter() - started, 2),
    }
    write_json(out / "manifest.json", manifest)
    (out / "report.txt").write_text(format_report(manifest) + "\n", encoding="utf-8")
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
    lines.append(
        f"  duplicates removed: exact {manifest['duplicates_removed']}, near "
        f"{manifest['near_duplicates_removed']} ({manifest['near_dedup_method']}, "
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


def processed_state(recipe: Recipe, tokenizer) -> str:
    """'fresh' when the processed data matches the recipe, its files and the tokenizer; else why not."""
    path = processed_dir(recipe) / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    expected = fingerprint(recipe, tokenizer)
    if manifest is None:
        return "missing"
    if manifest.get("fingerprint") != expected:
        return (
            f"stale (fingerprint {manifest.get('fingerprint')} != {expected}: a source, the data settings or "
            "the tokenizer changed)"
        )
    return "fresh"


def require_fresh(recipe: Recipe, tokenizer) -> None:
    """Refuse, with the command to run, when the processed data is missing or stale."""
    state = processed_state(recipe, tokenizer)
    if state != "fresh":
        raise UserError(
            f"processed data in {processed_dir(recipe)} is {state}; run `{recipe.command('data_prep')}` before "
            "launching"
        )


def load_processed(recipe: Recipe, tokenizer, allow_build: bool):
    """The processed train/eval datasets (input_ids + completion_mask) and their manifest.

    The manifest's fingerprint must match the recipe, its files and the tokenizer. When it is
    missing or stale, a single-process run builds it; a distributed launch refuses, so that the
    data is prepared once before launch, not on every rank.
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
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))

    def read(name: str):
        table = pq.read_table(out / name, columns=["input_ids", "completion_mask"])
        return datasets.Dataset(table) if table.num_rows else None

    train = read("train.parquet")
    if train is None:
        raise UserError(f"{out / 'train.parquet'} is empty; check the sources and data.eval_fraction")
    return train, read("eval.parquet"), manifest
