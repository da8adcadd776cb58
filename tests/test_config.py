"""Recipes: every shipped one loads offline; typos and bad values fail with the key's name."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, make_recipe

from train.core.config import load_recipe
from train.core.errors import UserError

SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.relative_to(REPO / "recipes").as_posix() for p in SHIPPED}
    assert {"stage1_medical.yaml", "stage2_korean.yaml", "tiny/stage1_medical.yaml", "tiny/stage2_korean.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO / "recipes").as_posix())
def test_every_shipped_recipe_loads(path: Path):
    if "codeio" in path.parts:  # CodeI/O data specs (python -m data_prep codeio)
        from data_prep.codeio import load_spec

        assert load_spec(path).functions_dir
        return
    if "classify" in path.parts:  # encoder classification recipes (python -m train classify)
        from train.methods.classification import load_classification_recipe

        recipe = load_classification_recipe(path)
        assert recipe.stage and recipe.data.train
    else:
        recipe = load_recipe(path)  # no download: config only
        assert recipe.stage and recipe.data.sources
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# "), f"{path} must open with a comment saying what it is for"
    assert "python -m" in path.read_text(encoding="utf-8") or "make " in path.read_text(encoding="utf-8")


def test_real_recipes_carry_the_team_hyperparameters():
    recipe = load_recipe(REPO / "recipes/stage1_medical.yaml")
    assert recipe.model.name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"
    assert recipe.model.quantization == "nf4" and recipe.model.dtype == "bfloat16"
    assert (recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout) == (16, 16, 0.0)
    assert set(recipe.lora.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    t = recipe.training
    assert (
        t.per_device_train_batch_size,
        t.gradient_accumulation_steps,
        t.learning_rate,
        t.warmup_steps,
        t.weight_decay,
        t.seed,
        t.lr_scheduler_type,
    ) == (2, 4, 2e-4, 5, 0.01, 3407, "linear")
    stage2 = load_recipe(REPO / "recipes/stage2_korean.yaml")
    assert stage2.parent == recipe.output_dir


def test_misspelled_key_is_named_with_a_suggestion(tmp_path, stage1_dict):
    stage1_dict["training"]["learning_rat"] = 1e-4
    with pytest.raises(UserError, match=r"unknown key 'training.learning_rat'.*did you mean 'learning_rate'"):
        make_recipe(stage1_dict)


def test_misspelled_top_level_key_in_a_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("stage: x\noutput_dir: o\nmodle: {}\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"{path}: unknown key 'modle'.*did you mean 'model'"):
        load_recipe(path)


def test_bad_literal_and_type_are_named(stage1_dict):
    bad = dict(stage1_dict, data={**stage1_dict["data"], "template": "alpaca"})
    with pytest.raises(UserError, match=r"'data.template' is 'alpaca'; allowed: 'reasoning', 'chat'"):
        make_recipe(bad)
    bad = dict(stage1_dict, lora={"r": "sixteen"})
    with pytest.raises(UserError, match=r"'lora.r' must be int"):
        make_recipe(bad)


def test_overrides_apply_and_are_typed(stage1_dict):
    recipe = make_recipe(stage1_dict, ["training.max_steps=7", "training.learning_rate=3e-4", "lora.r=8"])
    assert recipe.training.max_steps == 7 and recipe.training.learning_rate == 3e-4 and recipe.lora.r == 8
    with pytest.raises(UserError, match="unknown key 'training.max_step'"):
        make_recipe(stage1_dict, ["training.max_step=7"])
    with pytest.raises(UserError, match="must look like section.key=value"):
        make_recipe(stage1_dict, ["training.max_steps"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["data"].update(sources=[]), "data.sources' is empty"),
        (lambda d: d["data"]["sources"][0].update(weight=0), r"weight must be > 0"),
        (lambda d: d["data"]["sources"][0].update(schema="columns"), r"needs 'columns: \{question: COL"),
        (lambda d: d["data"].update(eval_fraction=1.0), r"eval_fraction must be in \[0, 1\)"),
        (lambda d: d["training"].update(max_steps=0), r"max_steps=0 trains nothing"),
        (lambda d: d["training"].update(sft_args={"max_length": 9}), r"sft_args sets \['max_length'\]"),
        (lambda d: d["model"].update(attn_implementation="flash_attention_2"), "flash attention needs"),
    ],
)
def test_cross_field_checks_say_how_to_fix(stage1_dict, change, message):
    change(stage1_dict)
    with pytest.raises(UserError, match=message):
        make_recipe(stage1_dict)


def test_sft_args_are_checked_against_trl(stage1_dict, tmp_path):
    from train.methods.trainers import build_sft_config

    stage1_dict["training"]["sft_args"] = {"hub_token": "hf_sentinel"}
    with pytest.raises(UserError, match="tokens are read from the environment"):
        build_sft_config(make_recipe(stage1_dict), str(tmp_path), has_eval=False)
    stage1_dict["training"]["sft_args"] = {"neftune_noise_alph": 5}
    with pytest.raises(UserError, match="did you mean 'neftune_noise_alpha'"):
        build_sft_config(make_recipe(stage1_dict), str(tmp_path), has_eval=False)
    stage1_dict["training"]["sft_args"] = {"neftune_noise_alpha": 5}
    assert build_sft_config(make_recipe(stage1_dict), str(tmp_path), has_eval=False).neftune_noise_alpha == 5
