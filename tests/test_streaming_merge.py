"""The streaming merge (train/models/merging.py) writes what PEFT's in-memory merge computes, bit for bit,
for a 16-bit chain and a QLoRA chain; `train merge` uses it and says how it checked parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import train_tiny_stage
from safetensors.torch import load_file

from train.core.config import TINY_MODEL, ModelConfig
from train.export.merge import merge_stage
from train.models.lineage import Chain, adapter_chain
from train.models.loading import load_merged_16bit, resolve_model_path
from train.models.merging import INDEX, stream_merge

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """stage1 -> stage2 in 16 bit, and stage1 -> a QLoRA (nf4) child."""
    root = tmp_path_factory.mktemp("streaming")
    train_tiny_stage("stage1_medical", root / "s1", root / "d1", max_steps=2)
    train_tiny_stage("stage2_korean", root / "s2", root / "d2", parent=root / "s1", max_steps=2)
    nf4 = {"quantization": "nf4"}
    train_tiny_stage("stage2_korean", root / "q2", root / "d2", parent=root / "s1", model=nf4, max_steps=2)
    return root


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("child", ["s2", "q2"], ids=["16bit-chain", "qlora-chain"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_streaming_equals_the_in_memory_merge_bit_for_bit(chains, tmp_path, child, dtype):
    chain = [*adapter_chain(str(chains / "s1")), chains / child / "adapter"]
    in_memory = load_merged_16bit(Chain(TINY_MODEL, chain), ModelConfig(name_or_path=TINY_MODEL, dtype=dtype))
    in_memory.save_pretrained(tmp_path / "in_memory")
    stats = stream_merge(resolve_model_path(TINY_MODEL), chain, tmp_path / "streamed", dtype, max_shard_bytes=2**21)
    a, b = _tensors(tmp_path / "in_memory"), _tensors(tmp_path / "streamed")
    assert a.keys() == b.keys() and stats["tensors"] == len(a)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert stats["shards"] > 1 and (tmp_path / "streamed" / INDEX).is_file()  # small shards: an index, as HF writes
    assert stats["merged_tensors"] == 2 * 28  # both adapters' 28 targets each (7 projections x 4 layers)
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config["dtype"] == dtype


def test_merge_checks_sampled_tensors_when_the_model_does_not_fit_twice(chains, tmp_path, monkeypatch):
    import psutil

    full = merge_stage(chains / "s2", tmp_path / "full", dtype="float32")
    assert full["merge"] == "streaming, tensor by tensor" and full["parity_check"].startswith("logits")
    small = psutil.virtual_memory()._replace(available=1)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: small)
    sampled = merge_stage(chains / "s2", tmp_path / "sampled", dtype="float32")
    assert "sampled merged tensors" in sampled["parity_check"]
    assert sampled["merged_vs_base_plus_adapter"]["checked"] == 8
    assert sampled["merged_vs_base_plus_adapter"]["relative_diff"] < 1e-6
    assert sampled["adapter_effect"]["max_abs_diff"] > 0
    assert _tensors(tmp_path / "full").keys() == _tensors(tmp_path / "sampled").keys()
