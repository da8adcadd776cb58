"""backend: unsloth on CPU: selection, refusals and the output contract.

Unsloth itself needs an NVIDIA GPU. Here its two calls (`UnslothApi`) are replaced by a recorder that
loads the model with transformers and wraps it with PEFT, so everything around them (data, template,
loss, trainer, checkpoints, adapter, stage.json, merge) runs for real. These tests show that contract,
not that Unsloth trains: that needs the GPU run (support table in docs/distributed.md).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, make_recipe

import train.models.unsloth as unsloth_backend
from train.core.errors import UserError
from train.methods.sft import run_sft

pytestmark = pytest.mark.e2e


class RecordingApi:
    """Stands in for Unsloth's FastLanguageModel: plain transformers + PEFT, recording each call."""

    calls: list[tuple[str, dict]] = []

    def from_pretrained(self, model_name, max_seq_length, load_in_4bit, dtype):
        import torch
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        RecordingApi.calls.append(
            (
                "from_pretrained",
                {
                    "model_name": model_name,
                    "max_seq_length": max_seq_length,
                    "load_in_4bit": load_in_4bit,
                    "dtype": dtype,
                },
            )
        )
        quant = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
            if load_in_4bit
            else None
        )
        return AutoModelForCausalLM.from_pretrained(model_name, dtype=dtype, quantization_config=quant)

    def get_peft_model(self, model, r, alpha, dropout, target_modules, seed, use_rslora, gradient_checkpointing):
        from peft import LoraConfig, get_peft_model

        RecordingApi.calls.append(
            (
                "get_peft_model",
                {
                    "r": r,
                    "alpha": alpha,
                    "target_modules": target_modules,
                    "seed": seed,
                    "gradient_checkpointing": gradient_checkpointing,
                },
            )
        )
        return get_peft_model(
            model,
            LoraConfig(
                r=r,
                lora_alpha=alpha,
                lora_dropout=dropout,
                target_modules=target_modules,
                use_rslora=use_rslora,
                task_type="CAUSAL_LM",
            ),
        )


@pytest.fixture
def recording(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr(unsloth_backend, "UnslothApi", RecordingApi)
    return RecordingApi


def test_without_a_gpu_unsloth_fails_with_what_is_needed(stage1_dict):
    stage1_dict["backend"] = "unsloth"
    with pytest.raises(UserError, match=r"needs an NVIDIA GPU and the unsloth extra .*backend: transformers"):
        run_sft(make_recipe(stage1_dict))


def test_unsloth_refuses_several_processes_and_int8(stage1_dict, monkeypatch, recording):
    stage1_dict["backend"] = "unsloth"
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="one process on one GPU"):
        unsloth_backend.check_unsloth_recipe(make_recipe(stage1_dict))
    monkeypatch.setenv("WORLD_SIZE", "1")
    stage1_dict["model"]["quantization"] = "int8"
    with pytest.raises(UserError, match="4-bit or 16-bit"):
        unsloth_backend.check_unsloth_recipe(make_recipe(stage1_dict))
    assert recording.calls == []


def test_make_refuses_unsloth_on_several_gpus():
    proc = subprocess.run(
        ["make", "-s", "train-stage1", "GPUS=2", "BACKEND=unsloth"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode != 0 and "BACKEND=unsloth runs on one GPU" in proc.stdout + proc.stderr


def test_unsloth_stage_writes_what_merge_and_children_expect(stage1_dict, tmp_path, recording, tiny_dir):
    from train.export.merge import merge_stage

    parent = copy.deepcopy(stage1_dict)
    parent["training"]["max_steps"] = 3
    run_sft(make_recipe(parent))  # the main path, as a parent

    child = copy.deepcopy(stage1_dict)
    child.update(backend="unsloth", parent=parent["output_dir"], output_dir=str(tmp_path / "unsloth_child"))
    child["model"].update(quantization="nf4", unsloth_name_or_path="unsloth/some-bnb-4bit")
    child["training"].update(max_steps=6, learning_rate=3e-3, warmup_steps=0)
    record = run_sft(make_recipe(child))

    (load, load_args), (wrap, wrap_args) = recording.calls
    assert load == "from_pretrained" and wrap == "get_peft_model"
    # A child loads its parent chain merged in 16-bit, quantized by Unsloth at load.
    assert load_args["model_name"] == str(tmp_path / "unsloth_child" / "parent_merged")
    assert load_args["load_in_4bit"] is True and load_args["max_seq_length"] == child["data"]["max_length"]
    assert wrap_args["r"] == child["lora"]["r"] and wrap_args["seed"] == child["training"]["seed"]
    assert wrap_args["gradient_checkpointing"] is False  # the tiny recipe turns it off

    saved = json.loads((tmp_path / "unsloth_child" / "stage.json").read_text())
    assert saved["backend"] == "unsloth" and saved["base_model"] == "tiny"  # the 16-bit base merge uses
    assert saved["parent"] == str((tmp_path / "stage1").resolve())
    assert record["metrics"]["train_loss_last"] < record["metrics"]["train_loss_first"]
    assert record["metrics"]["padding_efficiency"] >= 0.99  # same packed data path
    adapter = json.loads((tmp_path / "unsloth_child" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == child["lora"]["r"]

    report = merge_stage(tmp_path / "unsloth_child", tmp_path / "merged", dtype="float32")
    assert report["merged_vs_base_plus_adapter"]["relative_diff"] < 1e-4
    assert report["lineage"][-1] == str(tmp_path / "unsloth_child")


def test_first_stage_loads_the_prequantized_checkpoint(stage1_dict, recording, tiny_dir):
    stage1_dict.update(backend="unsloth")
    stage1_dict["model"]["unsloth_name_or_path"] = str(tiny_dir)  # a local stand-in for the bnb-4bit repo
    stage1_dict["training"]["max_steps"] = 1
    run_sft(make_recipe(stage1_dict))
    assert recording.calls[0][1]["model_name"] == str(tiny_dir)
    assert recording.calls[0][1]["load_in_4bit"] is False  # tiny recipe: quantization none


def test_cli_backend_override_fails_before_any_data_work(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "sft",
            "recipes/tiny/stage1_medical.yaml",
            "backend=unsloth",
            f"output_dir={tmp_path / 'out'}",
            f"data.processed_dir={tmp_path / 'data'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "needs an NVIDIA GPU" in proc.stderr
    assert not (tmp_path / "data").exists()
