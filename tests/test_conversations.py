"""Multi-turn conversations (schemas messages and sharegpt): validation by reason, a loss mask over exactly the
assistant turns (decoded and compared with the input turns), expand vs all_turns, whole-turn truncation."""

from __future__ import annotations

import copy
import json

import pyarrow.parquet as pq
import pytest
from conftest import REPO, make_recipe, recipe_dict, write_jsonl

from data_prep.build import build
from data_prep.schemas import canonicalize
from data_prep.sources import RawRow, Reject
from train.core.config import SourceConfig
from train.core.errors import UserError

SAMPLES = REPO / "data_prep" / "samples"
# A chat template that renders a past answer exactly as its generation prompt plus the answer (ChatML-like):
# the kind all_turns can cut into turns.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
    "{{ eos_token }}{% else %}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _recipe(tmp_path, template="reasoning", multi_turn="auto", **data):
    recipe = copy.deepcopy(recipe_dict("consultations"))
    recipe.update(output_dir=str(tmp_path / "out"), parent=None)
    recipe["data"].update(
        processed_dir=str(tmp_path / "data"), template=template, multi_turn=multi_turn, eval_fraction=0.0, **data
    )
    return make_recipe(recipe)


def _conversations() -> dict[str, list[dict]]:
    """Every bundled consultation as (role, content, reasoning) turns, by row id."""
    out = {}
    for i, line in enumerate((SAMPLES / "ko_consultations_messages.jsonl").read_text(encoding="utf-8").splitlines()):
        out[f"consultations_messages:ko_consultations_messages.jsonl:{i + 1}"] = json.loads(line)["messages"]
    rows = json.loads((SAMPLES / "ko_consultations_sharegpt.json").read_text(encoding="utf-8"))
    names = {"human": "user", "gpt": "assistant", "system": "system"}
    for i, row in enumerate(rows):
        turns = [{"role": names[t["from"]], "content": t["value"]} for t in row["conversations"]]
        out[f"consultations_sharegpt:ko_consultations_sharegpt.json:{i}"] = turns
    return out


def _written(turn: dict) -> str:
    """An assistant turn as the model is trained to write it: its think block (or an empty one), the answer."""
    content, reasoning = turn["content"], turn.get("reasoning_content")
    if "</think>" in content:
        reasoning, content = content.split("</think>")
        reasoning = reasoning.replace("<think>", "")
    return (
        f"<think>\n{(reasoning or '').strip()}\n</think>\n{content.strip()}"
        if reasoning
        else (f"<think>\n\n</think>\n{content.strip()}")
    )


def _trained_spans(row: dict) -> list[list[int]]:
    spans, current = [], None
    for token, trained in zip(row["input_ids"], row["completion_mask"], strict=True):
        if trained and current is None:
            current = []
            spans.append(current)
        if trained:
            current.append(token)
        else:
            current = None
    return spans


@pytest.mark.parametrize(
    ("turns", "reason"),
    [
        ([{"role": "user", "content": "열이 나요"}], "no_assistant_turn"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
            "ends_on_user_turn",
        ),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}], "empty_turn"),
        ([{"role": "doctor", "content": "a"}, {"role": "assistant", "content": "b"}], "unknown_role"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}],
            "roles_not_alternating",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "c"},
            ],
            "roles_not_alternating",
        ),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r"}], "unclosed_think"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r</think>"}], "empty_turn"),
        ("not a list", "not_a_conversation"),
    ],
)
def test_malformed_conversations_are_rejected_by_reason(turns, reason):
    source = SourceConfig(name="chat", path="x.jsonl", schema="messages")
    result = canonicalize(RawRow("x.jsonl:1", {"messages": turns}), source, seed=0)
    assert isinstance(result, Reject) and result.reason == reason, result


def test_sharegpt_and_renamed_columns_read_the_same_conversation():
    turns = [{"from": "human", "value": "열이 나요"}, {"from": "gpt", "value": "<think>\n감염?\n</think>\n해열제"}]
    share = canonicalize(RawRow("r", {"conversations": turns}), SourceConfig("s", "x", "sharegpt"), seed=0)
    renamed = SourceConfig("m", "x", "messages", columns={"messages": "dialog", "role": "speaker", "content": "text"})
    mine = [
        {"speaker": "user", "text": "열이 나요"},
        {"speaker": "assistant", "text": "해열제", "reasoning_content": "감염?"},
    ]
    other = canonicalize(RawRow("r", {"dialog": mine}), renamed, seed=0)
    assert share.turns == other.turns and share.turns[1].reasoning == "감염?" and share.turns[1].content == "해열제"


def _check_rows(rows: list[dict], tokenizer, expand: bool, strip_open_think: bool = False) -> int:
    conversations, eos = _conversations(), tokenizer.eos_token
    checked = 0
    for row in rows:
        conv_id, _, turn = row["id"].partition("#turn")
        assistants = [t for t in conversations[conv_id] if t["role"] == "assistant"]
        wanted = [assistants[int(turn) - 1]] if expand else assistants
        spans = [tokenizer.decode(s) for s in _trained_spans(row)]
        expected = [_written(t) + eos for t in wanted]
        if strip_open_think:  # the generation prompt already opened the think block
            expected = [e.removeprefix("<think>\n") for e in expected]
        assert spans == expected, row["id"]
        if expand:  # the history as a client sends it back: earlier answers without their reasoning
            history = tokenizer.decode(
                [t for t, m in zip(row["input_ids"], row["completion_mask"], strict=True) if not m]
            )
            for past in assistants[: int(turn) - 1]:
                assert past["content"].split("</think>")[-1].strip() in history
            assert history.count("<think>") == (1 if strip_open_think else 0)  # only a generation prompt's
        checked += 1
    return checked


def test_expand_trains_each_assistant_turn_with_the_history_as_at_inference(tmp_path, tokenizer):
    """reasoning template, multi_turn auto = expand: one row per assistant turn, its trained tokens decode to
    exactly that turn (think block, answer, EOS), the history holds earlier answers only."""
    manifest = build(_recipe(tmp_path), tokenizer)
    assert manifest["multi_turn"] == "expand" and manifest["conversation_examples"] == 18
    rows = pq.read_table(tmp_path / "data" / "train.parquet").to_pylist()
    assert _check_rows(rows, tokenizer, expand=True) == 18
    assert {r["source"] for r in rows} == {"consultations_messages", "consultations_sharegpt"}


def test_all_turns_trains_every_assistant_turn_of_one_row(tmp_path, tokenizer):
    """all_turns (reasoning template, whose history renders a turn as it was written): one row per conversation,
    one trained span per assistant turn, token-exact at every boundary."""
    manifest = build(_recipe(tmp_path, multi_turn="all_turns"), tokenizer)
    rows = pq.read_table(tmp_path / "data" / "train.parquet").to_pylist()
    assert manifest["multi_turn"] == "all_turns" and len(rows) == 8
    assert _check_rows(rows, tokenizer, expand=False) == 8
    for row in rows:  # prompt + completion columns are the rendered text, cut where training starts
        assert tokenizer.decode(row["input_ids"]) == row["prompt"] + row["completion"]


def test_chat_templates_choose_their_mode_and_all_turns_refuses_r1(tmp_path, tokenizer):
    """chat template: R1-style (the embedded one opens <think> in its generation prompt) -> expand; all_turns
    with a template that strips past think blocks (R1-Distill's) is refused with the fix; a ChatML-like
    template -> all_turns, token-exact."""
    manifest = build(_recipe(tmp_path / "r1", template="chat"), tokenizer)
    rows = pq.read_table(tmp_path / "r1" / "data" / "train.parquet").to_pylist()
    assert manifest["multi_turn"] == "expand"
    assert _check_rows(rows, tokenizer, expand=True, strip_open_think=True) == 18
    # R1-Distill's own template drops the think block of every past answer: a turn as history cannot be cut
    # out as the model wrote it, so all_turns is refused with the fix.
    stripping = copy.deepcopy(tokenizer)
    stripping.chat_template = tokenizer.chat_template.replace(
        "{{ message['content'] }}<｜end▁of▁sentence｜>",
        "{{ message['content'].split('</think>')[-1] }}<｜end▁of▁sentence｜>",
    )
    assert stripping.chat_template != tokenizer.chat_template
    with pytest.raises(UserError, match="use data.multi_turn: expand"):
        build(_recipe(tmp_path / "r1b", template="chat", multi_turn="all_turns"), stripping)

    chatml = copy.deepcopy(tokenizer)
    chatml.chat_template = CHATML
    manifest = build(_recipe(tmp_path / "ml", template="chat"), chatml)
    rows = pq.read_table(tmp_path / "ml" / "data" / "train.parquet").to_pylist()
    assert manifest["multi_turn"] == "all_turns" and _check_rows(rows, chatml, expand=False) == 8


def test_long_conversations_lose_whole_turns_from_the_front(tmp_path, tokenizer):
    long = "두통과 발열이 계속됩니다. " * 40
    turns = [{"role": "user", "content": long}, {"role": "assistant", "content": "첫 답입니다."}]
    turns += [
        {"role": "user", "content": "두 번째 질문"},
        {"role": "assistant", "content": "<think>\n짧게\n</think>\n두 번째 답"},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": turns}])
    sources = [{"name": "long", "path": str(path), "schema": "messages"}]
    manifest = build(_recipe(tmp_path / "t", multi_turn="all_turns", sources=sources, max_length=128), tokenizer)
    (row,) = pq.read_table(tmp_path / "t" / "data" / "train.parquet").to_pylist()
    assert manifest["length_policy"]["turns_dropped"] == 2
    assert "두통과" not in row["prompt"] and tokenizer.decode(_trained_spans(row)[0]).startswith("<think>\n짧게")
    assert len(_trained_spans(row)) == 1 and len(row["input_ids"]) <= 128

    dropped = _recipe(tmp_path / "d", multi_turn="all_turns", sources=sources, max_length=128, length_policy="drop")
    with pytest.raises(UserError, match="no rows left"):
        build(dropped, tokenizer)
    rejects = [json.loads(x) for x in (tmp_path / "d" / "data.tmp" / "rejects.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rejects] == ["too_long"]


@pytest.mark.e2e
def test_the_consultations_recipe_trains_on_the_assistant_turns(tmp_path):
    """The bundled tiny recipe (both schemas) trains: its loss counts only the assistant turns' tokens."""
    from conftest import train_tiny_stage

    record = train_tiny_stage("consultations", tmp_path / "stage", tmp_path / "data", max_steps=3, logging_steps=1)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text(encoding="utf-8"))
    rows = pq.read_table(tmp_path / "data" / "train.parquet").to_pylist()
    assert manifest["train_completion_tokens"] == sum(sum(r["completion_mask"]) for r in rows)
    assert (
        record["metrics"]["global_steps"] == 3
        and (tmp_path / "stage" / "adapter" / "adapter_model.safetensors").is_file()
    )
