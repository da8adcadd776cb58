"""DoRA (`lora.use_dora`): trained through PEFT, merged by the streaming merge exactly as PEFT's
merge_and_unload merges it (Linear and GPT-2's Conv1D), and a DoRA stage merges with parity and parents a child."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_recipe, recipe_dict, train_tiny_stage
from safetensors.torch import load_file

from train.core.config import TINY_GPT2, TINY_MODEL
from train.models.loading import resolve_model_path
from train.models.merging import stream_merge


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("name", [TINY_MODEL, TINY_GPT2])
def test_streamed_dora_merge_equals_peft(name, tmp_path):
    """A DoRA adapter with a non-zero delta and magnitudes away from the weight norms (as after training):
    the streamed merge writes what PEFT's merge_and_unload computes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = resolve_model_path(name)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
    )
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                param.normal_(0, 0.05)
            if "lora_magnitude_vector" in pname:
                param.mul_(1 + 0.2 * torch.rand_like(param))
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["use_dora"]
    model.merge_and_unload().save_pretrained(tmp_path / "peft")

    stats = stream_merge(base, [tmp_path / "adapter"], tmp_path / "streamed", "float32")
    peft, streamed = _tensors(tmp_path / "peft"), _tensors(tmp_path / "streamed")
    original = _tensors(Path(base))
    assert stats["merged_tensors"] > 0 and peft.keys() <= streamed.keys() | set(original)
    changed = 0
    for key, value in peft.items():
        if key not in streamed:  # a tied head PEFT writes and the base does not keep apart
            continue
        scale = value.abs().max().clamp_min(1e-6)
        assert (streamed[key] - value).abs().max() / scale < 1e-5, key
        changed += not torch.equal(value, original.get(key, value))
    assert changed == stats["merged_tensors"]


@pytest.mark.e2e
def test_a_dora_stage_trains_merges_with_parity_and_parents_a_qlora_child(tmp_path):
    from train.export.merge import merge_stage
    from train.methods.sft import run_sft

    train_tiny_stage("stage1_medical", tmp_path / "s1", tmp_path / "d1", max_steps=6)

    data = recipe_dict("stage1_medical")
    data.update(output_dir=str(tmp_path / "dora"), parent=str(tmp_path / "s1"))
    data["lora"]["use_dora"] = True
    data["data"].update(processed_dir=str(tmp_path / "d1"), max_length=256)
    data["training"].update(max_steps=6, save_steps=1000, logging_steps=3)
    run_sft(make_recipe(data))
    config = json.loads((tmp_path / "dora" / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"]

    report = merge_stage(tmp_path / "dora", tmp_path / "merged", dtype="float32")
    assert report["merge"] == "streaming, tensor by tensor"
    assert (
        report["merged_vs_base_plus_adapter"]["relative_diff"] < 1e-4 and report["adapter_effect"]["max_abs_diff"] > 0
    )

    child = recipe_dict("stage1_medical")
    child.update(output_dir=str(tmp_path / "child"), parent=str(tmp_path / "dora"))
    child["model"]["quantization"] = "nf4"
    child["data"].update(processed_dir=str(tmp_path / "d1"), max_length=256)
    child["training"].update(max_steps=2, save_steps=1000, logging_steps=1)
    run_sft(make_recipe(child))  # its parent chain (LoRA, then DoRA) merged in 16 bit, then quantized
    assert (tmp_path / "child" / "parent_merged" / "parent_chain.json").is_file()
