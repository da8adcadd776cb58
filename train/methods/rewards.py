"""GRPO reward functions. TRL calls each with the prompts, the completions and the dataset's columns."""

from __future__ import annotations

import re

from train.core.formats import THINK_CLOSE, THINK_OPEN
from train.evaluation.qa_metrics import clean_answer, contains_reference

_FORMAT = re.compile(rf"^\s*(?:{re.escape(THINK_OPEN)})?(.+?){re.escape(THINK_CLOSE)}\s*(\S.*)$", re.DOTALL)


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for reasoning closed by </think> and followed by an answer, else 0.0.

    The completion may open with <think> or not: the R1 chat template already opens it in the prompt.
    """
    return [
        1.0 if (m := _FORMAT.match(c)) and m.group(1).strip() and THINK_OPEN not in m.group(2) else 0.0
        for c in completions
    ]


def exact_answer_reward(prompts, completions, ground_truth, **kwargs) -> list[float]:
    """1.0 when the answer after the reasoning contains the ground truth (KorQuAD-normalized), else 0.0."""
    return [contains_reference(clean_answer(c), [truth]) for c, truth in zip(completions, ground_truth, strict=True)]
