"""How long a sequence fits per GPU, with and without sequence parallelism: a prediction, not a measurement.

    python -m train pick-strategy recipes/stage1_medical_32k.yaml --gpus 8 --gpu-memory-gb 24 --sequence-parallel

Activations per token (bf16, LoRA, gradient checkpointing per decoder layer): every layer keeps its
input (2 * hidden bytes), and the layer being recomputed in the backward keeps what autograd saves in it,
plus about as much again in gradients in flight. The saved bytes per token per layer are measured on
four small Qwen2 shapes by `python -m bench.activation_memory` (saved-tensor hooks: exact, linear in the
length) and fitted: ACTIVATION_FIT below (exact on a shape it was not fitted on). Sequence parallelism over N ranks
divides all of it by N (attention after the all-to-all holds the whole sequence with 1/N of the heads:
the same bytes). Weights: NF4 decoder + 16-bit embeddings and head, replicated (DDP, ZeRO-2) or sharded
(FSDP2, ZeRO-3); LoRA weights, gradients and Adam states in fp32; a fixed allowance for the CUDA context,
communication buffers and fragmentation. No GPU has confirmed these figures yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from train.methods.launch import (
    BYTES_PER_PARAM,
    FULL_TRAINING_STATE_BYTES,
    heads_split,
    intermediate_size,
    kv_dim,
    linear_shapes,
    parameter_count,
)

# bytes per token per decoder layer = per_hidden * hidden + per_intermediate * intermediate + per_kv_dim * kv_dim
# + constant (bench/results/2026-11-30-cpu2-x86_64.md, "activation bytes per token per layer (bf16, LoRA r=16)":
# exact on the five fitted shapes and on a sixth it was not fitted on)
ACTIVATION_FIT = {"per_hidden": 32.062, "per_intermediate": 10.0, "per_kv_dim": 4.0, "constant": 708.0}
GRADIENTS_IN_FLIGHT = 1.0  # the recomputed layer's activation gradients, as large as what it saved (assumed)
CONTEXT_GB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation per GPU (assumed)
USABLE = 0.9  # keep 10% of the rest free: packed rows vary, the allocator needs slack
SHARDED = ("fsdp", "zero3")


@dataclass
class Fit:
    longest_tokens: int
    activation_bytes_per_token: float
    weights_gb: float
    free_gb: float


def layer_bytes_per_token(config) -> float:
    f = ACTIVATION_FIT
    return (
        f["per_hidden"] * config.hidden_size
        + f["per_intermediate"] * intermediate_size(config)
        + f["per_kv_dim"] * kv_dim(config)
        + f["constant"]
    )


def activation_bytes_per_token(config, sequence_parallel: int = 1) -> float:
    checkpoints = config.num_hidden_layers * 2 * config.hidden_size
    recomputed = layer_bytes_per_token(config) * (1 + GRADIENTS_IN_FLIGHT)
    return (checkpoints + recomputed) / sequence_parallel


def lora_parameters(config, rank: int) -> int:
    return config.num_hidden_layers * sum(rank * (i + o) for i, o in linear_shapes(config).values())


def weights_gb_per_gpu(config, quantization: str, strategy: str, gpus: int, lora_rank: int | None = 16) -> float:
    """Weights and training state per GPU; `lora_rank=None`: full fine-tuning (every weight trains)."""
    decoder, embed = parameter_count(config)
    base = decoder * BYTES_PER_PARAM[quantization] + embed * 2
    if lora_rank is None:
        lora = (decoder + embed) * FULL_TRAINING_STATE_BYTES
    else:
        lora = lora_parameters(config, lora_rank) * 16  # fp32 weight + gradient + two Adam moments
    if strategy in SHARDED:
        layer = decoder / config.num_hidden_layers * 2  # one layer gathered (16-bit) while it runs
        return (base / gpus + lora / gpus + layer) / 1e9
    return (base + lora) / 1e9


def longest_sequence(
    config, quantization: str, strategy: str, gpus: int, gpu_gb: float, sequence_parallel: int = 1, lora_rank=16
) -> Fit:
    weights = weights_gb_per_gpu(config, quantization, strategy, gpus, lora_rank)
    free = max(gpu_gb - weights - CONTEXT_GB, 0.0) * USABLE
    per_token = activation_bytes_per_token(config, sequence_parallel)
    return Fit(int(free * 1e9 / per_token), per_token, round(weights, 1), round(free, 1))


def usable_degrees(config, gpus: int) -> list[int]:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return [n for n in range(1, gpus + 1) if gpus % n == 0 and heads_split(heads, kv, n)]


def pick_sequence_parallel(
    config, quantization: str, strategy: str, gpus: int, gpu_gb: float, max_length: int, lora_rank=16
):
    """(N, why): the smallest sequence-parallel degree whose predicted longest sequence holds max_length."""
    for n in usable_degrees(config, gpus):
        fit = longest_sequence(config, quantization, strategy, gpus, gpu_gb, n, lora_rank)
        if fit.longest_tokens >= max_length:
            return n, (
                f"predicted: {fit.longest_tokens} tokens fit per micro-batch with sequence_parallel={n} "
                f"({fit.activation_bytes_per_token / 1e6:.2f} MB/token/GPU, {fit.weights_gb} GB weights, "
                f"{fit.free_gb} GB left for activations) >= the {max_length} tokens of a micro-batch"
            )
    best = usable_degrees(config, gpus)[-1]
    fit = longest_sequence(config, quantization, strategy, gpus, gpu_gb, best, lora_rank)
    return None, (
        f"predicted: even sequence_parallel={best} fits only {fit.longest_tokens} tokens per micro-batch "
        f"(< {max_length}: per_device_train_batch_size x data.max_length); shard the weights (STRATEGY=fsdp or zero3), add GPUs, or lower max_length"
    )
