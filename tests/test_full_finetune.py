"""Full fine-tuning (`lora: none`): every weight trains, the stage saves a model folder (model/) instead of an
adapter, a child stage starts from it, merge copies it with checks, and two processes equal one under ZeRO-3
and FSDP2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_recipe, recipe_dict, run_train
from safetensors.torch import load_file

from train.core.errors import UserError
from train.methods.launch import pick_strategy


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_lora_none_is_full_fine_tuning_and_refuses_what_cannot_train():
    data = recipe_dict("stage1_medical")
    full = make_recipe({**data, "lora": "none"})
    assert full.full_finetune and not make_recipe(data).full_finetune
    with pytest.raises(UserError, match="nf4 weights cannot be trained; set model.quantization: none"):
        make_recipe({**data, "lora": "none"}, ["model.quantization=nf4"])
    with pytest.raises(UserError, match="runs on backend transformers"):
        make_recipe({**data, "lora": "none", "backend": "unsloth"})
    with pytest.raises(UserError, match="'lora' is 'full'; allowed: 'none'"):
        make_recipe({**data, "lora": "full"})
    with pytest.raises(UserError, match="unknown key 'lora.rank'; valid keys: alpha, dropout, r,"):
        make_recipe(data, ["lora.rank=8"])


def test_strategy_auto_sizes_the_recipe_with_its_overrides(capsys):
    """make train-* STRATEGY=auto ARGS=lora=none: the pick sees the full fine-tuning state, not a LoRA's."""
    from train.cli import main

    picked = {}
    for override in ([], ["lora=none"]):
        main(["pick-strategy", "recipes/tiny/stage1_medical.yaml", *override, "--gpus", "2", "--gpu-memory-gb", "0.05"])
        picked[bool(override)] = capsys.readouterr().out.strip()
    assert picked == {False: "ddp", True: "zero3"}


def test_full_fine_tuning_in_bf16_keeps_fp32_master_weights_outside_deepspeed(monkeypatch):
    from train.models.loading import load_model_for_training, master_dtype

    data = recipe_dict("stage1_medical")
    full = make_recipe({**data, "lora": "none"}, ["model.dtype=bfloat16"])
    lora = make_recipe(data, ["model.dtype=bfloat16"])
    assert master_dtype(full) == "float32" and master_dtype(lora) == "bfloat16"
    assert {p.dtype for p in load_model_for_training(full).parameters()} == {torch.float32}
    assert {p.dtype for p in load_model_for_training(lora).parameters()} == {torch.bfloat16}
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # DeepSpeed keeps its own fp32 copy
    assert master_dtype(full) == "bfloat16"


def test_the_strategy_pick_counts_full_fine_tuning_state():
    seven_b = (7_000_000_000, 500_000_000)
    assert pick_strategy(seven_b, "none", 8, 80)[0] == "ddp"  # LoRA: the 16-bit weights fit on each GPU
    strategy, why = pick_strategy(seven_b, "none", 8, 80, full=True)
    assert strategy == "zero3" and "full fine-tuning state" in why  # + gradients, fp32 master, Adam moments


def test_the_copy_check_finds_a_changed_tensor(tmp_path):
    from safetensors.torch import save_file

    from train.models.merging import check_copy

    torch.manual_seed(0)
    weights = {"a.weight": torch.randn(4, 3), "b.weight": torch.randn(3), "position_ids": torch.arange(512)}

    def cast(tensors):  # as stream_merge writes: floating tensors in the merge dtype, integer buffers kept
        return {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}

    for name, tensors in (("source", weights), ("copy", cast(weights))):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "model.safetensors")
    assert check_copy(tmp_path / "source", tmp_path / "copy", "bfloat16")["max_abs_diff"] == 0.0
    damaged = cast(weights)
    damaged["b.weight"][1] += 1
    save_file(damaged, tmp_path / "copy" / "model.safetensors")
    assert check_copy(tmp_path / "source", tmp_path / "copy", "bfloat16")["max_abs_diff"] >= 0.5  # 1 in bf16
    save_file({"a.weight": damaged["a.weight"]}, tmp_path / "copy" / "model.safetensors")
    with pytest.raises(UserError, match="tensors differ"):
        check_copy(tmp_path / "source", tmp_path / "copy", "bfloat16")


@pytest.mark.e2e
def test_a_full_stage_saves_a_model_parents_a_lora_child_and_merges_as_a_checked_copy(tmp_path):
    from train.export.merge import merge_stage
    from train.inference.hf import load_stage_model
    from train.methods.sft import run_sft
    from train.models.loading import load_model_for_training, resolve_model_path

    data = recipe_dict("stage1_medical")
    data.update(output_dir=str(tmp_path / "full"), lora="none")
    data["data"].update(processed_dir=str(tmp_path / "d1"), max_length=256)
    data["training"].update(max_steps=3, save_steps=2, logging_steps=1, learning_rate=1e-4)
    record = run_sft(make_recipe(data))
    assert record["finetune"] == "full" and record["weights"] == "model"
    full = tmp_path / "full"
    assert not (full / "adapter").exists() and (full / "checkpoint-2" / "model.safetensors").is_file()
    trained, base = _tensors(full / "model"), _tensors(Path(resolve_model_path(data["model"]["name_or_path"])))
    assert trained.keys() == base.keys()
    assert all(not torch.equal(trained[k], base[k]) for k in trained), "some weights did not train"

    # A LoRA child starts from the full stage's weights: it trains exactly like a stage whose base is that folder.
    def child(out: str, parent: Path | None, base: str | None) -> list[float]:
        d = recipe_dict("stage2_korean")
        d.update(output_dir=str(tmp_path / out), parent=str(parent) if parent else None)
        if base:
            d["model"]["name_or_path"] = base
        d["data"].update(processed_dir=str(tmp_path / "d2"), max_length=256)
        d["training"].update(max_steps=2, save_steps=1000, logging_steps=1)
        run_sft(make_recipe(d))
        return _losses(tmp_path / out)

    assert child("child", full, None) == child("direct", None, str(full / "model"))

    # Merge: a copy in the merge dtype, every tensor checked, logits against the trained model and its start.
    report = merge_stage(full, tmp_path / "merged", dtype="float32")
    assert report["finetune"] == "full" and report["merged_vs_base_plus_adapter"]["max_abs_diff"] == 0.0
    assert report["merged_vs_base_plus_adapter"]["tensors_checked"] == len(trained)
    assert report["adapter_effect"]["max_abs_diff"] > 0  # it moved away from the base
    merged_tensors = _tensors(tmp_path / "merged")
    assert merged_tensors.keys() == trained.keys() and all(torch.equal(merged_tensors[k], trained[k]) for k in trained)
    with pytest.raises(UserError, match="no 4-bit weights"):
        merge_stage(full, tmp_path / "dq", dequantize=True)
    # A model that does not fit twice in memory: the tensors alone are checked, and the merge still writes.
    import psutil

    small = type("Memory", (), {"available": 1})()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(psutil, "virtual_memory", lambda: small)
        tensors_only = merge_stage(full, tmp_path / "merged_tensors_only", dtype="bfloat16")
    parity = tensors_only["merged_vs_base_plus_adapter"]
    assert parity["checked"] == len(trained) and parity["max_abs_diff"] == 0.0 == parity["relative_diff"]
    assert tensors_only["adapter_effect"]["max_abs_diff"] is None and "tensors" in tensors_only["parity_check"]

    # The LoRA child merges onto the full stage's weights (not the original base).
    child_report = merge_stage(tmp_path / "child", tmp_path / "child_merged", dtype="float32")
    assert child_report["merged_vs_base_plus_adapter"]["relative_diff"] < 1e-4
    assert child_report["lineage"] == [str(full.resolve()), str((tmp_path / "child").resolve())]

    # The other objectives train all weights too: DPO from the full stage (its reference: a frozen copy).
    from train.methods.preference import run_preference

    dpo = recipe_dict("dpo")
    dpo.update(output_dir=str(tmp_path / "dpo"), parent=str(tmp_path / "child"), lora="none")
    dpo["data"]["processed_dir"] = str(tmp_path / "dpo_data")
    dpo["training"].update(max_steps=2, save_steps=1000, learning_rate=1e-4)
    dpo_recipe = make_recipe(dpo)
    assert run_preference(dpo_recipe)["finetune"] == "full"
    # The policy started from the parent chain (full stage + the child's LoRA) written to parent_merged/, the folder
    # TRL also builds the frozen reference from (it reads the policy's config path).
    start = _tensors(tmp_path / "dpo" / "parent_merged")
    assert load_model_for_training(dpo_recipe).config._name_or_path == str(tmp_path / "dpo" / "parent_merged")
    assert any(not torch.equal(start[k], trained[k]) for k in trained)  # the child's adapter is in it
    policy = _tensors(tmp_path / "dpo" / "model")
    assert policy.keys() == start.keys() and all(not torch.equal(policy[k], start[k]) for k in start)

    # A full reward stage: reward_model/ (what GRPO loads) is its model/, hard-linked, not a second copy.
    reward = recipe_dict("reward")
    reward.update(output_dir=str(tmp_path / "reward"), parent=str(full), lora="none")
    reward["data"]["processed_dir"] = str(tmp_path / "reward_data")
    reward["training"].update(max_steps=2, save_steps=1000)
    run_preference(make_recipe(reward))
    for file in (tmp_path / "reward" / "model").glob("*.safetensors"):
        assert (tmp_path / "reward" / "reward_model" / file.name).stat().st_ino == file.stat().st_ino

    # A full stage as a 4-bit or sharded distillation teacher loads its model/ as it is (nothing to merge first).
    from train.models.teacher import merged_teacher_dir, teacher_model_config

    teacher_dir = merged_teacher_dir(str(full), teacher_model_config(str(full)), tmp_path / "distill")
    assert teacher_dir.resolve() == (full / "model").resolve() and not (tmp_path / "distill").exists()

    # Generation from the stage folder is the merged model's.
    model, tokenizer, _ = load_stage_model(full)
    ids = tokenizer("흉통의 원인은", return_tensors="pt")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, merged(**ids).logits)


@pytest.mark.dist
@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp"])
def test_full_fine_tuning_on_two_processes_equals_one(strategy, tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "full-ft-dist"
    common = [
        "recipes/tiny/stage1_medical.yaml",
        "lora=none",
        "training.max_steps=3",
        "training.logging_steps=1",
        "training.save_steps=2",
        "training.save_total_limit=null",
        "training.warmup_steps=0",
        "training.learning_rate=1e-4",
        "data.max_length=256",
        f"data.processed_dir={root / 'data'}",
    ]
    single = root / "single"
    if not (single / "stage.json").is_file():  # shared by both strategies (and builds the data)
        run_train(["sft", *common, f"output_dir={single}", "training.per_device_train_batch_size=2"])
    out = root / strategy
    run_train(["sft", *common, f"output_dir={out}", "training.per_device_train_batch_size=1"], strategy)
    stage = json.loads((out / "stage.json").read_text())
    assert (
        stage["metrics"]["world_size"] == 2
        and stage["metrics"]["sharding"] == {"ddp": "ddp", "zero3": "zero3", "fsdp": "fsdp2"}[strategy]
    )
    a, b = _losses(single), _losses(out)
    assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    x, y = _tensors(single / "model"), _tensors(out / "model")
    assert x.keys() == y.keys() and len(x) > 40  # the whole model, gathered from both ranks
    assert max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-4
    if strategy == "ddp":
        return
    # Resume from checkpoint-2 in a new launch (ZeRO-3's and FSDP2's own sharded checkpoint formats): the same
    # last step and the same model.
    resumed = root / f"{strategy}-resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    run_train(
        [
            "sft",
            *common,
            f"output_dir={resumed}",
            "training.per_device_train_batch_size=1",
            "training.resume_from_checkpoint=auto",
        ],
        strategy,
    )
    assert abs(_losses(resumed)[-1] - b[-1]) < 1e-4
    z = _tensors(resumed / "model")
    assert max(float((y[k] - z[k]).abs().max()) for k in y) < 1e-4
