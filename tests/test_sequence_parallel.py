"""Ulysses sequence parallelism on CPU (gloo all_to_all): 2 processes sharing each sequence equal 1 process,
under DDP and FSDP2 (the test shim), with and without packing, across a resume."""

from __future__ import annotations

import shutil

import pytest
from conftest import make_recipe
from test_distributed import losses, max_adapter_diff, run

from train.core.errors import UserError

SP = ["training.sequence_parallel=2"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One-process reference runs, per packing setting, built on first use."""
    root, done = tmp_path_factory.mktemp("sp"), {}

    def get(packing: bool):
        if packing not in done:
            out = root / f"single-{packing}"
            done[packing] = (out, run(out, root / f"data-{packing}", None, batch=2, extra=_packing(packing)))
        return done[packing]

    return root, get


def _packing(packing: bool) -> list[str]:
    return [f"training.packing={str(packing).lower()}"]


@pytest.mark.dist
@pytest.mark.parametrize(("strategy", "packing"), [("ddp", True), ("ddp", False), ("fsdp", True)])
def test_sequence_parallel_two_processes_equal_one_and_resume(single, strategy, packing):
    root, get = single
    reference, ref_record = get(packing)
    data, extra = root / f"data-{packing}", [*_packing(packing), *SP]
    # One sequence-parallel group of 2 ranks = one data-parallel replica at the same micro-batch.
    out = root / f"sp-{strategy}-{packing}"
    m = run(out, data, strategy, batch=2, extra=extra)["metrics"]
    assert (
        m["world_size"] == 2
        and m["sequence_parallel"] == 2
        and m["sharding"] == {"fsdp": "fsdp2"}.get(strategy, strategy)
    )
    # Each rank held half of every sequence (padded to an even length), never the whole of it.
    assert m["widest_rank_batch_tokens"] == (ref_record["metrics"]["widest_rank_batch_tokens"] + 1) // 2, m
    a, b = losses(reference), losses(out)
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    assert max_adapter_diff(reference, out) < 1e-4
    if strategy == "ddp" and packing:  # resumed from checkpoint-2 in a new launch: the same steps 3-4 and adapter
        resumed = root / "sp-resumed"
        resumed.mkdir()
        shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
        record = run(resumed, data, "ddp", 2, [*extra, "training.resume_from_checkpoint=auto"])
        assert record["metrics"]["resumed_from"].endswith("checkpoint-2")
        assert max(abs(x - y) for x, y in zip(losses(resumed), b[2:], strict=True)) < 1e-4
        assert max_adapter_diff(out, resumed) < 1e-4


def test_sequence_parallel_start_up_checks(stage1_dict):
    from train.methods.launch import Launch, check_launch

    recipe = make_recipe(stage1_dict, SP)
    with pytest.raises(UserError, match="launch a multiple of 2"):
        check_launch(make_recipe(stage1_dict, ["training.sequence_parallel=2"]), Launch("ddp", 3))
    with pytest.raises(UserError, match=r"4 query and 2 KV heads; use one of \[2, 4\]"):
        check_launch(make_recipe(stage1_dict, ["training.sequence_parallel=3"]), Launch("ddp", 3))
    check_launch(make_recipe(stage1_dict, ["training.sequence_parallel=4"]), Launch("ddp", 4))  # KV heads replicated
    check_launch(recipe, Launch("ddp", 4))  # 2 groups of 2: fine
    from train.methods.launch import gradient_accumulation

    # 4 processes in groups of 2 are 2 data-parallel replicas: 8 rows a step at micro-batch 2 = 2 accumulations.
    batched = make_recipe(stage1_dict, [*SP, "training.global_batch_size=8", "training.per_device_train_batch_size=2"])
    assert gradient_accumulation(batched, Launch("ddp", 4)) == 2
    with pytest.raises(UserError, match="model.attn_implementation: sdpa_packed"):
        make_recipe(stage1_dict, [*SP, "model.attn_implementation=sdpa"])
    with pytest.raises(UserError, match="sequence_parallel must be >= 1"):
        make_recipe(stage1_dict, ["training.sequence_parallel=0"])
    with pytest.raises(UserError, match="runs SFT on the transformers backend; this recipe has method distill"):
        make_recipe(stage1_dict | {"method": "distill", "distill": {"teacher": "x"}}, SP)
    with pytest.raises(UserError, match="average_tokens_across_devices"):
        make_recipe(stage1_dict, [*SP, "training.sft_args={average_tokens_across_devices: false}"])


def test_sequence_parallel_collator_shifts_then_splits():
    import torch

    from train.models.sequence_parallel import ShardCollator

    batch = {"input_ids": torch.arange(8)[None], "labels": torch.tensor([[-100, -100, 2, 3, 4, 5, 6, 7]])}
    first, second = (ShardCollator(lambda _: dict(batch), 2, r)([None]) for r in (0, 1))
    assert first["input_ids"].tolist() == [[0, 1, 2, 3]] and second["input_ids"].tolist() == [[4, 5, 6, 7]]
    # The last token of the first half predicts the first token of the second: shifted before the split.
    assert first["shift_labels"].tolist() == [[-100, 2, 3, 4]] and second["shift_labels"].tolist() == [[5, 6, 7, -100]]
    assert second["position_ids"].tolist() == [[4, 5, 6, 7]]  # global positions for RoPE
    with pytest.raises(ValueError, match="does not split"):
        ShardCollator(lambda _: {"input_ids": torch.arange(7)[None], "labels": torch.arange(7)[None]}, 2, 0)([None])


def test_sequence_parallel_memory_model_is_the_measured_fit_and_picks_n(capsys):
    from test_launch import QWEN_32B
    from transformers import Qwen2Config

    from bench.activation_memory import saved_bytes_per_token_per_layer
    from train.methods.memory import activation_bytes_per_token, layer_bytes_per_token, pick_sequence_parallel

    # The coefficients in memory.py reproduce what autograd saves on a shape the fit never saw (1%).
    shape = dict(hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2)
    measured = saved_bytes_per_token_per_layer(1, 384, 1024, 6, 2, 128)
    assert abs(layer_bytes_per_token(Qwen2Config(**shape)) / measured - 1) < 0.01, measured

    per_token = activation_bytes_per_token(QWEN_32B)
    assert 1.4e6 < per_token < 1.7e6 and activation_bytes_per_token(QWEN_32B, 4) == per_token / 4
    assert pick_sequence_parallel(QWEN_32B, "nf4", "ddp", 8, 80, 32768)[0] == 2  # 8x H100: ~32k fit without
    assert pick_sequence_parallel(QWEN_32B, "nf4", "ddp", 8, 80, 16384)[0] == 1
    assert pick_sequence_parallel(QWEN_32B, "nf4", "fsdp", 8, 24, 32768)[0] == 4  # 8x 4090 under FSDP2
    n, why = pick_sequence_parallel(QWEN_32B, "nf4", "ddp", 8, 24, 32768)  # a replicated 32B leaves a 4090 nothing
    assert n is None and "shard the weights" in why

    from train.cli import main

    main(
        [
            "pick-strategy",
            "recipes/tiny/stage1_medical.yaml",
            "--gpus",
            "2",
            "--gpu-memory-gb",
            "24",
            "--sequence-parallel",
        ]
    )
    out = capsys.readouterr()
    assert out.out == "1\n" and "SP=auto -> training.sequence_parallel=1" in out.err
