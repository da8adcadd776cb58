"""Answer clean-up, QA metrics suited to Korean, and answer voting. Pure Python, no model.

Metrics follow the KorQuAD 1.0 evaluation script (EM on normalized text; F1 over *characters*
after removing spaces, because Korean particles glue onto words and word-level F1 punishes
"서울" vs "서울은"). They are written here rather than imported because no maintained package ships
KorQuAD's character-level F1; `tests/test_qa_metrics.py` checks them against hand-computed cases.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from train.core.config import CleanupRules
from train.core.formats import THINK_BLOCK

_KORQUAD_REMOVE = re.compile(r"['\"《》<>〈〉()‘’]")
_PUNCT = set(string.punctuation)


# ---------------------------------------------------------------------------------------------
# Clean-up


def clean_answer(text: str, prompt: str = "", rules: CleanupRules | None = None) -> str:
    rules = rules or CleanupRules()
    if rules.strip_prompt_echo and prompt and text.startswith(prompt):
        text = text[len(prompt) :]
    cut = min((i for i in (text.find(m) for m in rules.stop_markers) if i >= 0), default=len(text))
    text = text[:cut]
    if rules.strip_think:
        text = THINK_BLOCK.sub("", text)
        if "<think>" in text:  # never closed: everything after it is unfinished reasoning
            text = text[: text.index("<think>")]
    text = text.strip()
    for prefix in rules.answer_prefixes:
        if text.lower().startswith(prefix.lower()):
            text = text[len(prefix) :].strip()
            break
    if rules.first_line_only:
        text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return " ".join(text.split())


# ---------------------------------------------------------------------------------------------
# Metrics (KorQuAD 1.0 normalization)


def normalize_answer(text: str) -> str:
    text = _KORQUAD_REMOVE.sub(" ", text.lower())
    text = "".join(ch for ch in text if ch not in _PUNCT)
    return " ".join(text.split())


def exact_match(prediction: str, references: list[str]) -> float:
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(ref) for ref in references))


def _char_f1(prediction: str, reference: str) -> float:
    pred = list(normalize_answer(prediction).replace(" ", ""))
    ref = list(normalize_answer(reference).replace(" ", ""))
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def char_f1(prediction: str, references: list[str]) -> float:
    return max(_char_f1(prediction, ref) for ref in references)


def contains_reference(prediction: str, references: list[str]) -> float:
    norm = normalize_answer(prediction).replace(" ", "")
    return float(any(normalize_answer(ref).replace(" ", "") in norm for ref in references if ref.strip()))


_CHOICE = re.compile(r"(?:^|[\s(\[:：])([A-J])(?:[).\]:：\s]|$)")


def extract_choice(prediction: str, choices: list[str]) -> str | None:
    """The letter a prediction picks: an explicit letter first, else the one choice whose text it contains."""
    letters = "ABCDEFGHIJ"[: len(choices)]
    match = _CHOICE.search(prediction.strip())
    if match and match.group(1) in letters:
        return match.group(1)
    norm = normalize_answer(prediction)
    hits = [letters[i] for i, c in enumerate(choices) if normalize_answer(c) and normalize_answer(c) in norm]
    return hits[0] if len(hits) == 1 else None


def score_example(prediction: str, references: list[str], choices: list[str] | None = None) -> dict:
    """Every metric for one example; multiple-choice examples add `choice` and `accuracy`."""
    scores = {
        "exact_match": exact_match(prediction, references),
        "f1": char_f1(prediction, references),
        "contains_reference": contains_reference(prediction, references),
        "length": len(prediction),
    }
    if choices:
        picked = extract_choice(prediction, choices)
        gold = {r.strip().upper() for r in references if len(r.strip()) == 1}
        gold |= {
            "ABCDEFGHIJ"[i]
            for i, c in enumerate(choices)
            if any(normalize_answer(c) == normalize_answer(r) for r in references)
        }
        scores.update(choice=picked, accuracy=float(picked in gold))
    return scores


def aggregate(per_example: list[dict]) -> dict:
    keys = [
        k for k in ("exact_match", "f1", "contains_reference", "length", "accuracy") if any(k in s for s in per_example)
    ]
    return {
        k: round(sum(s[k] for s in per_example if k in s) / max(1, sum(k in s for s in per_example)), 4) for k in keys
    } | {"examples": len(per_example)}


# ---------------------------------------------------------------------------------------------
# Voting


def vote(candidates: list[tuple[str, float]]) -> tuple[str, dict]:
    """Majority over normalized answers; a tie goes to the answer with the highest total log-probability.

    `candidates` are (answer, total log-prob of the generated sequence). Returns the winning answer
    as one of its candidates wrote it, and the tally.
    """
    if not candidates:
        return "", {}
    groups: dict[str, list[tuple[str, float]]] = {}
    for answer, logprob in candidates:
        groups.setdefault(normalize_answer(answer), []).append((answer, logprob))
    best = max(groups.values(), key=lambda g: (len(g), max(lp for _, lp in g)))
    answer = max(best, key=lambda c: c[1])[0]
    return answer, {key: len(g) for key, g in groups.items()}
