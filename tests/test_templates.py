"""Loss mask: every prompt token is -100, every completion token from <think> through EOS is trained."""

from __future__ import annotations

import copy

import pytest

from data_prep.schemas import Record
from data_prep.templates import render_texts, tokenize_pairs

KO = Record(
    "ko",
    "1",
    question="45세 남성이 흉통을 호소합니다. 진단은?",
    answer="급성 심근경색입니다.",
    reasoning="흉통이 팔로 퍼지는 것은 심근 허혈을 시사합니다.",
)


def labels_of(rendered):
    return [tok if m else -100 for tok, m in zip(rendered.input_ids, rendered.completion_mask, strict=True)]


@pytest.mark.parametrize("template", ["reasoning", "chat"])
def test_mask_is_token_exact_on_korean(tokenizer, template):
    prompts, completions = render_texts([KO], template, "당신은 의료 전문가입니다.", True, tokenizer)
    [r] = tokenize_pairs(prompts, completions, tokenizer)
    labels = labels_of(r)
    n_prompt = len(tokenizer(prompts[0], add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert all(label != -100 for label in labels[n_prompt:])
    assert r.input_ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
    trained = tokenizer.decode([t for t in labels if t != -100])
    if template == "reasoning":
        assert prompts[0].endswith("### Response:\n")
        assert trained == f"<think>\n{KO.reasoning}\n</think>\n{KO.answer}{tokenizer.eos_token}"
    else:  # R1's template opens <think> in the generation prompt: the completion continues it
        assert prompts[0].endswith("<｜Assistant｜><think>\n")
        assert trained == f"{KO.reasoning}\n</think>\n{KO.answer}{tokenizer.eos_token}"
    # The prompt ids are exactly what generation feeds the model.
    assert r.input_ids[:n_prompt] == tokenizer(prompts[0], add_special_tokens=False)["input_ids"]


def test_bpe_merge_across_the_boundary_does_not_shift_the_mask(tokenizer):
    prompt, completion = "### Question:\n서울은 대한민", "국의 수도입니다."
    joint = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    alone = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert joint[: len(alone)] != alone, "fixture must merge across the boundary to test anything"
    [r] = tokenize_pairs([prompt], [completion], tokenizer)
    assert r.completion_mask.count(0) == len(alone)
    assert tokenizer.decode(r.input_ids[: len(alone)]) == prompt
    assert tokenizer.decode(r.input_ids[len(alone) :]) == completion + tokenizer.eos_token


def test_empty_think_keeps_the_shape_for_rows_without_reasoning(tokenizer):
    plain = Record("ko", "2", question="캐나다의 수도는?", answer="오타와입니다.")
    _, [with_think] = render_texts([plain], "reasoning", "S", True, tokenizer)
    _, [without] = render_texts([plain], "reasoning", "S", False, tokenizer)
    assert with_think == "<think>\n\n</think>\n오타와입니다." and without == "오타와입니다."


def test_trl_keeps_our_tokens_and_mask(tokenizer, tiny_dir, tmp_path):
    """SFTTrainer must build labels from our completion_mask, not re-tokenize the text."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    prompts, completions = render_texts([KO], "reasoning", "S", True, tokenizer)
    [r] = tokenize_pairs(prompts, completions, tokenizer)
    ds = datasets.Dataset.from_dict({"input_ids": [r.input_ids], "completion_mask": [r.completion_mask]})
    args = SFTConfig(
        output_dir=str(tmp_path), max_length=512, packing=False, completion_only_loss=True, use_cpu=True, report_to=[]
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir), args=args, train_dataset=ds, processing_class=tokenizer
    )
    row = trainer.train_dataset[0]
    assert row["input_ids"] == r.input_ids
    assert row["labels"] == labels_of(r)


def test_reasoning_chat_template_renders_the_training_prompt(tokenizer):
    from train.core.formats import reasoning_chat_template, render_prompt

    system = "You are a medical expert.\nAnswer in 'Korean' \\ English."  # newline, quotes, backslash survive
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = reasoning_chat_template(system)
    one = tok.apply_chat_template(
        [{"role": "user", "content": "흉통의 원인은?"}], tokenize=False, add_generation_prompt=True
    )
    assert one == render_prompt("흉통의 원인은?", system, "reasoning", tok)
    # A system message replaces the recipe's; an assistant turn ends with EOS as in training.
    turns = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nx\n</think>\nA1"},
        {"role": "user", "content": "Q2"},
    ]
    text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert text == (
        render_prompt("Q1", "S", "reasoning", tok)
        + "<think>\nx\n</think>\nA1"
        + tok.eos_token
        + "\n\n### Question:\nQ2\n\n### Response:\n"
    )
