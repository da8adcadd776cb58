"""Map raw rows of each known dataset onto one canonical record, validating as we go.

| schema            | dataset                                   | question              | reasoning    | answer   |
|-------------------|-------------------------------------------|-----------------------|--------------|----------|
| medical_o1        | FreedomIntelligence/medical-o1-reasoning-SFT | Question           | Complex_CoT  | Response |
| kocommercial      | MarkrAI/KoCommercial-Dataset              | instruction (+ input) | -            | output   |
| aihub_translation | AI Hub Korean-English .xlsx               | 원문 or 번역문 + instruction | -      | the other |
| columns           | anything, through `columns:` in the recipe | as mapped            | as mapped    | as mapped |
| messages          | OpenAI chat rows: messages [{role, content}] | every user turn   | per assistant turn: `<think>` in content or reasoning_content | every assistant turn |
| sharegpt          | ShareGPT rows: conversations [{from, value}] (system, human, gpt) | every human turn | `<think>` in value | every gpt turn |

A conversation must have at least one assistant turn, end on one, alternate user and assistant after an
optional first system turn, and have no empty turn or unknown role; otherwise it is a reject by reason
(`no_assistant_turn`, `ends_on_user_turn`, `roles_not_alternating`, `empty_turn`, `unknown_role`,
`not_a_conversation`).

An AI Hub pair's direction (Korean->English or English->Korean, `ko_to_en_ratio`) is drawn from a hash
of the pair's normalized text; the build drops a pair seen before (in any file) before rendering it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Literal, overload

from data_prep.dedup import normalize
from data_prep.sources import RawRow, Reject
from train.core.config import SourceConfig
from train.core.formats import THINK_CLOSE, THINK_OPEN

KO_TO_EN = "다음 한국어 문장을 영어로 번역하세요.\n{text}"
EN_TO_KO = "Translate the following English sentence into Korean.\n{text}"


@dataclass(frozen=True)
class Turn:
    role: str  # user | assistant
    content: str  # an assistant turn: the answer, its <think> block taken out into `reasoning`
    reasoning: str | None = None


@dataclass
class Record:
    source: str
    row_id: str
    question: str
    answer: str
    reasoning: str | None = None
    system: str | None = None
    pair_key: bytes | None = None  # aihub_translation: digest of the normalized (Korean, English) pair
    turns: tuple[Turn, ...] | None = None  # a conversation (user/assistant alternating, ends on assistant)
    train_last_only: bool = False  # data.multi_turn expand: history as at inference, only the last turn trained


# Per conversation schema: (list column, role key, content key, role names -> user/assistant/system).
CONVERSATION_FIELDS = {
    "messages": ("messages", "role", "content", {"system": "system", "user": "user", "assistant": "assistant"}),
    "sharegpt": ("conversations", "from", "value", {"system": "system", "human": "user", "gpt": "assistant"}),
}


class RowError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@overload
def _text(cells: dict, column: str, required: Literal[True] = True) -> str: ...
@overload
def _text(cells: dict, column: str, required: bool) -> str | None: ...
def _text(cells: dict, column: str, required: bool = True) -> str | None:
    if column not in cells:
        if required:
            raise RowError("missing_field", f"column '{column}' is missing")
        return None
    value = cells[column]
    if value is None or (isinstance(value, float) and value != value):  # None or NaN (blank cell)
        if required:
            raise RowError("empty_field", f"column '{column}' is empty")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError("non_text", f"column '{column}' holds {type(value).__name__}, not text")
    text = str(value).strip()
    if required and not text:
        raise RowError("empty_field", f"column '{column}' is empty")
    return text or None


@overload
def _check_think(text: str, column: str) -> str: ...
@overload
def _check_think(text: str | None, column: str) -> str | None: ...
def _check_think(text: str | None, column: str) -> str | None:
    """Reject unbalanced <think> tags; unwrap reasoning already wrapped in one block."""
    if text is None:
        return None
    opened, closed = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    if opened != closed:
        raise RowError("unclosed_think", f"column '{column}' has {opened} <think> and {closed} </think>")
    match = re.fullmatch(r"\s*<think>(.*)</think>\s*", text, flags=re.S)
    return match.group(1).strip() if match and opened == 1 else text


def _conversation(cells: dict, source: SourceConfig) -> tuple[str | None, tuple[Turn, ...]]:
    """(system, turns) of a messages or sharegpt row, or a RowError naming what is wrong."""
    column, role_key, content_key, roles = CONVERSATION_FIELDS[source.schema]
    column = source.columns.get(source.schema if source.schema == "messages" else "conversations", column)
    role_key, content_key = source.columns.get("role", role_key), source.columns.get("content", content_key)
    value = cells.get(column)
    if isinstance(value, str):  # a CSV or xlsx cell holding the list as JSON
        try:
            value = json.loads(value)
        except ValueError:
            raise RowError("not_a_conversation", f"column '{column}' is text, not a JSON list of turns") from None
    if value is None or column not in cells:
        raise RowError("missing_field", f"column '{column}' is missing")
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise RowError("not_a_conversation", f"column '{column}' is not a list of {{{role_key}, {content_key}}} turns")
    system, turns = None, []  # type: tuple[str | None, list[Turn]]
    for i, raw in enumerate(value):
        role = roles.get(str(raw.get(role_key)))
        if role is None:
            raise RowError(
                "unknown_role", f"turn {i} has {role_key} {raw.get(role_key)!r}; use one of {', '.join(roles)}"
            )
        content = raw.get(content_key)
        reasoning = raw.get("reasoning_content") or raw.get("reasoning") if role == "assistant" else None
        if not isinstance(content, str) or not content.strip():
            raise RowError("empty_turn", f"turn {i} ({role}) has no {content_key} text")
        if role == "system":
            if i != 0:
                raise RowError("roles_not_alternating", f"turn {i} is a system turn; only the first turn may be")
            system = content.strip()
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise RowError("roles_not_alternating", f"turn {i} is {role} where {expected} was expected")
        if role == "assistant":
            if content.count(THINK_OPEN) != content.count(THINK_CLOSE):
                raise RowError("unclosed_think", f"turn {i} has unbalanced <think> and </think>")
            inline = re.fullmatch(r"\s*<think>(.*?)</think>(.*)", content, flags=re.S)
            if inline:  # the reasoning written into the content, as R1 writes it
                reasoning, content = inline.group(1).strip() or None, inline.group(2).strip()
            if THINK_OPEN in content:
                raise RowError("unclosed_think", f"turn {i}: a <think> block that is not at the start of the answer")
            if not content:
                raise RowError("empty_turn", f"turn {i} (assistant) has reasoning but no answer")
        turns.append(Turn(role, content.strip(), reasoning.strip() if isinstance(reasoning, str) else None))
    if not any(t.role == "assistant" for t in turns):
        raise RowError("no_assistant_turn", "the conversation has no assistant turn to train on")
    if turns[-1].role != "assistant":
        raise RowError("ends_on_user_turn", "the conversation ends on a user turn (its answer is missing)")
    return system, tuple(turns)


def pair_key(korean: str, english: str) -> bytes:
    """The identity of a translation pair: the same sentences in any file, row, spacing or case."""
    return hashlib.sha256(f"{normalize(korean)}\x00{normalize(english)}".encode()).digest()


def _direction_is_ko_to_en(key: bytes, ratio: float, seed: int) -> bool:
    # From the pair's content, not its row id or position: the same pair gets the same direction in every
    # file and every rebuild, so its copies render alike and the pair dedup before rendering is the only one needed.
    digest = hashlib.sha256(f"{seed}:".encode() + key).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < ratio


def to_record(row: RawRow, source: SourceConfig, seed: int) -> Record:
    cells = row.cells
    schema = source.schema
    if schema == "medical_o1":
        question = _text(cells, "Question")
        reasoning: str | None = _check_think(_text(cells, "Complex_CoT"), "Complex_CoT")
        answer = _check_think(_text(cells, "Response"), "Response")
        return Record(source.name, row.row_id, question, answer, reasoning)
    if schema == "kocommercial":
        instruction = _text(cells, "instruction")
        extra = _text(cells, "input", required=False)  # empty input is normal in KoCommercial
        answer = _check_think(_text(cells, "output"), "output")
        question = f"{instruction}\n\n{extra}" if extra else instruction
        return Record(source.name, row.row_id, question, answer)
    if schema == "aihub_translation":
        korean, english = _text(cells, "원문"), _text(cells, "번역문")
        key = pair_key(korean, english)
        if _direction_is_ko_to_en(key, source.ko_to_en_ratio, seed):
            return Record(source.name, row.row_id, KO_TO_EN.format(text=korean), english, pair_key=key)
        return Record(source.name, row.row_id, EN_TO_KO.format(text=english), korean, pair_key=key)
    if schema in CONVERSATION_FIELDS:
        system, turns = _conversation(cells, source)
        last = turns[-1]
        return Record(source.name, row.row_id, turns[-2].content, last.content, last.reasoning, system, turns=turns)
    # schema == "columns"
    mapping = source.columns
    question = _text(cells, mapping["question"])
    answer = _check_think(_text(cells, mapping["answer"]), mapping["answer"])
    reasoning = (
        _check_think(_text(cells, mapping["reasoning"], required=False), mapping["reasoning"])
        if "reasoning" in mapping
        else None
    )
    system = _text(cells, mapping["system"], required=False) if "system" in mapping else None
    if "context" in mapping:  # context QA: the passage comes first, as `train eval` renders {context}{question}
        context = _text(cells, mapping["context"])
        question = f"{context}\n\n{question}"
    return Record(source.name, row.row_id, question, answer, reasoning, system)


def canonicalize(row: RawRow, source: SourceConfig, seed: int) -> Record | Reject:
    try:
        return to_record(row, source, seed)
    except RowError as err:
        return Reject(source.name, row.row_id, err.reason, err.detail, _jsonable(row.cells))


def _jsonable(cells: dict) -> dict:
    return {str(k): (v if isinstance(v, (str, int, float, bool)) or v is None else repr(v)) for k, v in cells.items()}
