"""rensa (the default MinHash backend) finds the pairs datasketch (the reference) finds, on a labelled set of
Korean rows: exact copies, one-particle variants, reordered sentences, and unrelated rows."""

from __future__ import annotations

import random

from data_prep.dedup import minhash_duplicates

PARTICLES = [("은", "는"), ("이", "가"), ("을", "를"), ("에서", "에게")]


def _labelled(seed: int = 7, documents: int = 150) -> tuple[list[str], set[int]]:
    """(rows, rows that duplicate an earlier row by construction)."""
    rng = random.Random(seed)
    syllables = [chr(0xAC00 + rng.randrange(11172)) for _ in range(400)]
    words = ["".join(rng.choices(syllables, k=rng.randint(2, 4))) for _ in range(600)]

    def sentence() -> str:
        body = " ".join(rng.choices(words, k=8))
        return f"{body}{rng.choice(['은', '이', '을', '에서'])} {' '.join(rng.choices(words, k=5))}입니다."

    rows, duplicates = [], set()
    for _ in range(documents):
        sentences = [sentence() for _ in range(6)]
        rows.append(" ".join(sentences))
        kind = rng.choice(["exact", "particle", "reordered", "unrelated"])
        if kind == "unrelated":
            rows.append(" ".join(sentence() for _ in range(6)))
            continue
        if kind == "exact":
            variant = list(sentences)
        elif kind == "particle":
            variant = list(sentences)
            i = rng.randrange(len(variant))
            for old, new in PARTICLES:
                if old in variant[i]:
                    variant[i] = variant[i].replace(old, new, 1)
                    break
        else:
            variant = list(reversed(sentences))
        duplicates.add(len(rows))
        rows.append(" ".join(variant))
    return rows, duplicates


def test_rensa_finds_the_pairs_datasketch_finds():
    rows, labelled = _labelled()
    reference = minhash_duplicates(rows, 0.8, 4, 128, backend="datasketch")
    fast = minhash_duplicates(rows, 0.8, 4, 128, backend="rensa")
    assert set(reference) == labelled  # the labels are what today's implementation finds
    both = set(reference) & set(fast)
    precision, recall = len(both) / len(fast), len(both) / len(reference)
    assert precision >= 0.99 and recall >= 0.99, (precision, recall)
    assert all(fast[row] == reference[row] for row in both)  # and the same earlier row is kept
