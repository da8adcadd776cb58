"""Reward model, DPO and GRPO stages on the tiny model after a short SFT stage (TRL's trainers)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from conftest import REPO, child_recipe, make_recipe, train_tiny_stage, write_jsonl

from train.core.errors import UserError
from train.methods.preference import run_preference
from train.methods.rewards import exact_answer_reward, format_reward

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sft_parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    train_tiny_stage("stage1_medical", root / "sft", root / "sft_data", max_steps=12, logging_steps=4)
    return root


def _recipe(name: str, root, **training):
    return child_recipe(name, root, **training)


def test_reward_functions():
    good = "<think>\nreasoning\n</think>\nThe most likely diagnosis is asthma."
    assert format_reward(
        [],
        [
            good,
            "reasoning\n</think>\nAsthma.",
            "no reasoning",
            "<think>\nnever closed",
            "<think>\n</think>\n",
            "<think>x</think>\n<think>again",
        ],
    ) == [1, 1, 0, 0, 0, 0]
    assert exact_answer_reward([], [good, good], ground_truth=["asthma", "gout"]) == [1.0, 0.0]


def test_reward_model_learns_the_preference(sft_parent):
    record = run_preference(_recipe("reward", sft_parent, max_steps=24, learning_rate=2e-3))
    metrics = record["metrics"]
    assert record["method"] == "reward" and record["parent"] == str((sft_parent / "sft").resolve())
    assert metrics["eval"]["eval_accuracy"] >= 0.8, metrics  # held-out pairs
    assert (sft_parent / "reward" / "reward_model" / "config.json").is_file()
    manifest = json.loads((sft_parent / "reward_data" / "manifest.json").read_text())
    assert manifest["rejected"] == {"identical_pair": 1, "bad_rating": 1}
    assert manifest["rows"] == 48 + 16 * 3  # 48 pairs + every ratings pair 1 apart (3 per prompt)


def test_dpo_raises_the_chosen_rejected_margin(sft_parent):
    record = run_preference(_recipe("dpo", sft_parent, max_steps=16, logging_steps=2))
    m = record["metrics"]
    assert m["rewards/margins_last"] > m["rewards/margins_first"] and m["rewards/margins_last"] > 0.5, m
    assert (sft_parent / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    # merge takes a DPO stage like an SFT one (lineage: sft -> dpo)
    from train.export.merge import merge_stage

    report = merge_stage(sft_parent / "dpo", sft_parent / "dpo_merged", dtype="float32")
    assert report["lineage"] == [str(sft_parent / "sft"), str(sft_parent / "dpo")]


def test_grpo_raises_the_format_reward(sft_parent):
    record = run_preference(_recipe("grpo", sft_parent, max_steps=12, logging_steps=1))
    m = record["metrics"]
    history = [json.loads(line) for line in open(sft_parent / "grpo" / "metrics.jsonl", encoding="utf-8")]
    fmt = [h["rewards/format_reward/mean"] for h in history if "rewards/format_reward/mean" in h]
    assert len(fmt) >= 10 and sum(fmt[-4:]) / 4 > sum(fmt[:4]) / 4, fmt
    assert m["global_steps"] == 12


def test_preference_recipes_are_checked(sft_parent, tmp_path):
    data = yaml.safe_load((REPO / "recipes" / "tiny" / "dpo.yaml").read_text(encoding="utf-8"))
    wrong = copy.deepcopy(data)
    wrong["data"]["sources"] = [
        {"name": "m", "path": "data_prep/samples/medical_o1_sample.json", "schema": "medical_o1"}
    ]
    with pytest.raises(UserError, match="method 'dpo' cannot use"):
        make_recipe(wrong)
    grpo = yaml.safe_load((REPO / "recipes" / "tiny" / "grpo.yaml").read_text(encoding="utf-8"))
    grpo["preference"]["rewards"] = ["reward_model"]
    with pytest.raises(UserError, match="preference.reward_model is not set"):
        make_recipe(grpo)
    empty = copy.deepcopy(data)
    empty["data"]["sources"] = [
        {
            "name": "e",
            "schema": "preference",
            "path": str(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "a"}])),
        }
    ]
    empty.update(output_dir=str(tmp_path / "o"), parent=str(sft_parent / "sft"))
    empty["data"]["processed_dir"] = str(tmp_path / "d")
    with pytest.raises(UserError, match="no usable dpo rows"):
        run_preference(make_recipe(empty))
