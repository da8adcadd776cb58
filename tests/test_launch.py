"""Launch checks and STRATEGY=auto, without launching anything."""

from __future__ import annotations

import pytest
from conftest import make_recipe
from transformers import Qwen2Config

from train.core.errors import UserError
from train.methods.launch import (
    Launch,
    check_launch,
    detect_launch,
    gradient_accumulation,
    parameter_count,
    pick_strategy,
)

QWEN_32B = Qwen2Config(
    hidden_size=5120,
    num_hidden_layers=64,
    num_attention_heads=40,
    num_key_value_heads=8,
    intermediate_size=27648,
    vocab_size=152064,
)


def test_32b_size_and_strategy_choice():
    params = parameter_count(QWEN_32B)
    assert 32.5e9 < sum(params) < 33.0e9
    strategy, why = pick_strategy(params, "nf4", 8, 80)
    assert strategy == "ddp" and "19.3 GB" in why  # 32B NF4 weights are ~19 GB
    assert pick_strategy(params, "nf4", 2, 24)[0] == "fsdp"  # two 4090s: FSDP-QLoRA
    assert pick_strategy(params, "nf4", 1, 24)[0] == "zero3_offload"
    assert pick_strategy(params, "none", 8, 80)[0] == "zero3"
    assert pick_strategy(params, "nf4", 1, 80)[0] == "single"


def test_detect_launch_from_accelerate_variables(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert detect_launch() == Launch("ddp", 4)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    cfg = tmp_path / "ds.json"
    cfg.write_text('{"zero_optimization": {"stage": 3}}')
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(cfg))
    assert detect_launch() == Launch("zero3", 4)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert detect_launch() == Launch("fsdp", 4)


@pytest.mark.parametrize(
    ("changes", "launch", "message"),
    [
        ({"backend": "unsloth"}, Launch("ddp", 2), "backend 'unsloth' runs on one GPU only"),
        (
            {"model": {"quantization": "nf4", "dtype": "bfloat16"}},
            Launch("fsdp", 8),
            "set model.quant_storage: bfloat16",
        ),
        (
            {"model": {"quantization": "nf4", "dtype": "bfloat16"}},
            Launch("zero3", 8),
            "set model.quant_storage: bfloat16",
        ),
        ({"model": {"quantization": "int8", "dtype": "bfloat16"}}, Launch("fsdp", 2), "int8 cannot be sharded"),
        (
            {"training": {"global_batch_size": 10, "per_device_train_batch_size": 2}},
            Launch("ddp", 3),
            "not a multiple of per_device_train_batch_size x data-parallel processes = 2 x 3",
        ),
    ],
)
def test_invalid_combinations_fail_with_the_fix(stage1_dict, changes, launch, message):
    for key, value in changes.items():
        if isinstance(value, dict):
            stage1_dict[key].update(value)
        else:
            stage1_dict[key] = value
    with pytest.raises(UserError, match=message):
        check_launch(make_recipe(stage1_dict), launch)


def test_valid_combinations_pass_and_global_batch_sets_accumulation(stage1_dict):
    stage1_dict["model"].update(quantization="nf4", dtype="bfloat16", quant_storage="bfloat16")
    stage1_dict["training"].update(global_batch_size=64, per_device_train_batch_size=2)
    recipe = make_recipe(stage1_dict)
    for launch in (Launch("fsdp", 8), Launch("zero3", 8), Launch("ddp", 4), Launch("single", 1)):
        check_launch(recipe, launch)
    assert gradient_accumulation(recipe, Launch("fsdp", 8)) == 4
    assert gradient_accumulation(recipe, Launch("single", 1)) == 32


def test_launcher_precision_must_match_the_recipe(stage1_dict, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # recipe says float32
    with pytest.raises(UserError, match="the launcher asks for mixed_precision=bf16 but the recipe's model.dtype"):
        check_launch(make_recipe(stage1_dict), Launch("ddp", 2))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    check_launch(make_recipe(stage1_dict), Launch("ddp", 2))


def test_check_launch_refuses_before_any_rank_starts(stage1_dict, tmp_path, capsys):
    """`make train-*` runs this once before `accelerate launch`: one line, exit 2, no rank started."""
    import yaml

    from train.cli import main

    stage1_dict["data"]["processed_dir"] = str(tmp_path / "never_built")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(stage1_dict), encoding="utf-8")
    cases = [
        (["--strategy", "ddp", "--processes", "2"], "is missing; run `python -m data_prep"),
        (["training.global_batch_size=6", "--strategy", "ddp", "--processes", "4"], "not a multiple of"),
        (
            [
                "training.report_to=[wandb_typo]",
                "--strategy",
                "ddp",
                "--processes",
                "2",
                "--config-file",
                "accelerate_configs/ddp.yaml",
            ],
            "unknown backend 'wandb_typo'",
        ),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["check-launch", str(recipe), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    main(["check-launch", str(recipe), "--strategy", "ddp", "--processes", "1"])  # one process builds its own data
    out = capsys.readouterr()
    assert "is ready for ddp on 1 process(es)" in out.err
    assert out.out == "sft\n"  # make train-* launches the method the recipe names (`-m train sft` here)
