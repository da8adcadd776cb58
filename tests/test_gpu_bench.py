"""The GPU benchmark's harness, run on a CPU: its FLOP arithmetic against models built from the same configs,
its random-weight loader against transformers' own 4-bit quantizer, and one short run of each path on the tiny
shape. No speed figure comes from here (those are `make bench-gpu`'s, on a GPU)."""

from __future__ import annotations

import pytest
import torch

from bench.gpu_bench import (
    BASELINE,
    OURS,
    load_random_model,
    longest_trainable,
    matmul_params,
    peak_tflops,
    qwen2_config,
    random_state_dict,
    run_variant,
    summarize,
    train_flops,
)

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("shape, billions", [("qwen2.5-7b", 7.6), ("qwen2.5-32b", 32.8)])
def test_matmul_params_match_the_model_built_from_the_config(shape, billions):
    from transformers import Qwen2ForCausalLM

    config = qwen2_config(shape, "sdpa")
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(config) == linear
    total = sum(p.numel() for p in model.parameters())
    assert abs(total / 1e9 - billions) < 0.05  # the published sizes: these are the real architectures


def test_train_flops_by_hand():
    config = qwen2_config("tiny", "sdpa")
    n = matmul_params(config)  # 2 layers: (256*256*2 + 256*128*2 + 3*256*512) * 2 + 256*4096
    assert n == (131072 + 65536 + 393216) * 2 + 1048576
    flops = train_flops(config, [3, 5], lora_params=100)
    assert flops == 4 * n * 8 + 6 * 100 * 8 + 6 * 2 * 256 * (9 + 25)
    # attention grows with the square of each sequence, not of the micro-batch
    assert train_flops(config, [8], 100) - train_flops(config, [3, 5], 100) == 6 * 2 * 256 * (64 - 34)


def test_peak_tflops_lookup():
    assert peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.4
    assert peak_tflops("NVIDIA GeForce RTX 4090", None) == 165.2
    assert peak_tflops("Unknown GPU", None) is None
    assert peak_tflops("Unknown GPU", 100.0) == 100.0


def test_random_state_dict_shares_one_buffer_and_loads_quantized():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from train.core.config import ModelConfig

    config = qwen2_config("tiny", "sdpa")
    state = random_state_dict(config, torch.bfloat16)
    q0, q1 = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.1.self_attn.q_proj.weight"]
    assert q0.untyped_storage().data_ptr() == q1.untyped_storage().data_ptr()  # views, no copies
    assert not torch.equal(q0, q1)  # different offsets: layers differ
    assert torch.equal(state["model.norm.weight"], torch.ones(256, dtype=torch.bfloat16))

    model = load_random_model("tiny", ModelConfig(dtype="float32", quantization="nf4", attn_implementation="sdpa"))
    layer = model.model.layers[1].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state is not None
    assert model.is_loaded_in_4bit and model.hf_quantizer is not None  # what PEFT and the Trainer look at
    weight = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    expected = state["model.layers.1.mlp.down_proj.weight"].float()
    assert (weight - expected).abs().max() < 0.02  # NF4 of these values, not an uninitialised tensor
    assert model.lm_head.weight.dtype == torch.float32 and not isinstance(model.lm_head, bnb.nn.Linear4bit)


@pytest.fixture(scope="module")
def tiny_runs():
    spec = {
        "shape": "tiny",
        "distribution": "medical_reasoning",
        "tokens": 256,
        "steps": 4,
        "warmup": 1,
        "rows": 200,
        "peak_tflops": 1.0,
    }
    return (
        run_variant({**spec, "path": OURS, "attn": "sdpa_packed", "liger": False}),
        run_variant({**spec, "path": BASELINE}),
    )


def test_both_paths_run_and_report(tiny_runs):
    ours, base = tiny_runs
    for run in tiny_runs:
        assert run["timed_steps"] == 3 and run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1
    assert 0.8 * 256 <= ours["real_tokens_per_step"] <= 256  # one bfd pack of at most 256 tokens
    # the baseline holds about the same real tokens per step, in whole rows
    assert base["rows_per_batch"] >= 2 and 0.3 * 256 < base["real_tokens_per_step"] < 3 * 256
    assert ours["peak_gb"] is None  # CPU: no CUDA allocator to read


def test_longest_trainable_stops_at_the_first_oom():
    tried = []

    def fits_below_5000(n):
        tried.append(n)
        return n < 5000

    result = longest_trainable(fits_below_5000, [1024, 2048, 4096, 8192, 16384])
    assert result == {"longest_fitting": 4096, "first_oom": 8192, "tried": [1024, 2048, 4096, 8192]}
    assert tried == [1024, 2048, 4096, 8192]  # nothing after the first failure
    assert longest_trainable(lambda n: False, [1024])["longest_fitting"] == 0


def test_summarize_takes_medians_and_ratios_against_the_same_shape_baseline():
    def run(path, tps, mem, shape="s"):
        return {
            "shape": shape,
            "distribution": "d",
            "path": path,
            "attn": "a",
            "liger": False,
            "tokens_per_s": tps,
            "step_s_median": 1.0,
            "mfu": 0.1,
            "peak_gb": mem,
        }

    rows = summarize(
        [
            run(BASELINE, 100, 40),
            run(BASELINE, 120, 40),
            run(OURS, 300, 20),
            run(OURS, 200, 20),
            run(OURS, 900, 5, shape="other"),
        ]
    )
    ours = next(r for r in rows if r["path"] == OURS and r["shape"] == "s")
    assert ours["tokens_per_s"] == 250 and ours["rounds"] == 2
    assert ours["speedup_vs_baseline"] == round(250 / 110, 2) and ours["peak_mem_vs_baseline"] == 0.5
    other = next(r for r in rows if r["shape"] == "other")
    assert other["speedup_vs_baseline"] is None  # never compared across shapes


def test_length_search_reuses_the_quantized_model_across_lengths():
    from bench.gpu_bench import run_cap

    result = run_cap(
        {"shape": "tiny", "path": OURS, "attn": "sdpa_packed", "liger": False, "cap_gib": 24.0, "lengths": [64, 128]}
    )
    assert result["longest_fitting"] == 128 and result["first_oom"] is None and result["tried"] == [64, 128]
