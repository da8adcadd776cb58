"""What the launcher asked for (DDP, FSDP2, DeepSpeed ZeRO) and the checks that must pass before
any heavy work, plus `STRATEGY=auto`: pick a strategy from the model's size and the GPUs' memory.

    python -m train pick-strategy recipes/stage1_medical.yaml --gpus 8 [--gpu-memory-gb 80]
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from train.core.config import Recipe
from train.core.errors import UserError

# Bytes per parameter of the frozen base as loaded (NF4 with double-quantized scales ~4.1 bits).
BYTES_PER_PARAM = {"nf4": 0.52, "int8": 1.0, "none": 2.0}
# Room for activations (checkpointed), LoRA, optimizer state and the CUDA context, per GPU.
HEADROOM = 1.35
# Full fine-tuning (lora: none) keeps, per weight, beside the 16-bit weight: its 16-bit gradient, an fp32 master
# copy and Adam's two fp32 moments (mixed precision as the Trainer and DeepSpeed run it).
FULL_TRAINING_STATE_BYTES = 2 + 4 + 8


@dataclass
class Launch:
    strategy: str  # "single", "ddp", "fsdp", "zero2", "zero3"
    world_size: int


def detect_launch() -> Launch:
    """The strategy accelerate launched this process with (from the variables it sets)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return Launch("fsdp", world)
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        config_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and Path(config_file).is_file():
            stage = str(json.loads(Path(config_file).read_text()).get("zero_optimization", {}).get("stage", stage))
        return Launch(f"zero{stage or 2}", world)
    return Launch("ddp" if world > 1 else "single", world)


def launcher_prefix() -> list[str]:
    """`accelerate launch <its options>` (or torchrun's) that started this process, read from the process
    tree; [] when not launched by one (or when it cannot be read). Printed commands repeat it."""
    if "LOCAL_RANK" not in os.environ:
        return []
    try:
        import psutil

        parents = [p.cmdline() for p in psutil.Process().parents()[:4]]
    except Exception:  # noqa: BLE001 - no psutil, or a process we may not read: print without the launcher
        return []
    for cmd in parents:
        joined = " ".join(cmd[:3])
        if "accelerate" not in joined and "torchrun" not in joined and "torch.distributed.run" not in joined:
            continue
        # where `-m train` (the launched module) starts; a `python -m accelerate.commands.launch` comes before it
        cut = next((i for i in range(len(cmd) - 1) if cmd[i] == "-m" and cmd[i + 1] == "train"), None)
        if cut is None:
            continue
        options = cmd[:cut]
        for i, part in enumerate(options):  # the console script or `python -m accelerate.commands.launch`
            if part.endswith("/accelerate") or part == "accelerate":
                return ["accelerate", *options[i + 1 :]]
            if part == "accelerate.commands.launch":
                return ["accelerate", "launch", *options[i + 1 :]]
            if part.endswith("/torchrun") or part == "torchrun" or part == "torch.distributed.run":
                return ["torchrun", *options[i + 1 :]]
    return []


def stage_command(recipe: Recipe, method: str, *extra: str, drop: tuple[str, ...] = ()) -> str:
    """The command that runs this stage again as it was run: the launcher (if any), the recipe, the
    overrides, and `extra` replacing same-key overrides (e.g. training.resume_from_checkpoint=auto)."""
    import shlex

    prefix = launcher_prefix()
    command = recipe.command(f"train {method}", *extra, drop=drop)
    if not prefix:
        return command
    return shlex.join(prefix) + " -m " + command.removeprefix("python -m ")


def check_launch(recipe: Recipe, launch: Launch, launched_precision: str | None = None) -> None:
    """Combinations that cannot work fail here, at start-up, with the fix."""
    model, training = recipe.model, recipe.training
    # `accelerate launch --mixed_precision` (or a config's mixed_precision) must agree with the recipe.
    launched = launched_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    wanted = {"bfloat16": "bf16", "float16": "fp16"}.get(model.dtype, "no")
    if launched not in ("no", wanted):
        raise UserError(
            f"the launcher asks for mixed_precision={launched} but the recipe's model.dtype is {model.dtype}; "
            f"precision comes from the recipe: drop --mixed_precision / set mixed_precision: 'no' in the accelerate "
            f"config, or set model.dtype accordingly"
        )
    if recipe.backend == "unsloth" and launch.world_size > 1:
        raise UserError(
            f"backend 'unsloth' runs on one GPU only, but {launch.world_size} processes were launched; "
            "launch one process, or use backend: transformers with DDP/FSDP/ZeRO"
        )
    if recipe.backend == "unsloth":  # fail before data prep when Unsloth cannot run here
        from train.models import unsloth as unsloth_backend

        unsloth_backend.check_unsloth_recipe(recipe)
        unsloth_backend.UnslothApi()
    if launch.strategy in ("fsdp", "zero3") and model.quantization == "int8":
        raise UserError(
            f"model.quantization=int8 cannot be sharded by {launch.strategy}; use nf4 "
            f"(with model.quant_storage: {model.dtype}) or the ddp/zero2 strategy"
        )
    if launch.strategy in ("fsdp", "zero3") and model.quantization == "nf4" and model.quant_storage != model.dtype:
        raise UserError(
            f"{launch.strategy} shards 4-bit weights only when they are stored in the compute dtype, but "
            f"model.quant_storage is {model.quant_storage}; set model.quant_storage: {model.dtype}"
        )
    if launch.strategy == "fsdp":
        check_fsdp_wrap(recipe, fsdp_wrap_classes(os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP")))
    check_sequence_parallel(recipe, launch)
    if training.global_batch_size is not None:
        per_step = training.per_device_train_batch_size * data_parallel_size(recipe, launch)
        if training.global_batch_size % per_step:
            raise UserError(
                f"training.global_batch_size={training.global_batch_size} is not a multiple of "
                f"per_device_train_batch_size x data-parallel processes = {training.per_device_train_batch_size} x "
                f"{data_parallel_size(recipe, launch)}; use a multiple of {per_step} or change the batch size"
            )


def fsdp_wrap_classes(value) -> list[str]:
    """An accelerate config's `fsdp_transformer_layer_cls_to_wrap` (accelerate launch passes it on as
    FSDP_TRANSFORMER_CLS_TO_WRAP): class names, comma-separated or a list; [] when unset."""
    if not value:
        return []
    items = value if isinstance(value, list) else str(value).strip("[]").split(",")
    return [str(item).strip().strip("'\"") for item in items if str(item).strip().strip("'\"")]


def model_layer_classes(model_cfg) -> tuple[set[str], list[str]]:
    """(class names of every module of the base model, its `_no_split_modules`: the decoder-layer class that
    accelerate wraps when the config names none), from a weightless skeleton on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from train.models.loading import load_model_config

    config = load_model_config(model_cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    return {type(m).__name__ for m in model.modules()}, sorted(getattr(model, "_no_split_modules", None) or [])


def check_fsdp_wrap(recipe: Recipe, names: list[str]) -> None:
    """An FSDP wrap class the model does not have fails at start-up with the fix, not on every rank after loading
    (accelerate's "Could not find the transformer layer class"). accelerate_configs/fsdp.yaml names none: accelerate
    then takes the model's own `_no_split_modules` (Qwen2DecoderLayer, LlamaDecoderLayer, GPT2Block, ...)."""
    if not names:
        return
    present, no_split = model_layer_classes(recipe.model)
    missing = [name for name in names if name not in present]
    if missing:
        raise UserError(
            f"the accelerate config's fsdp_transformer_layer_cls_to_wrap names {', '.join(missing)}, which "
            f"{recipe.model.name_or_path} does not have (its decoder layer: {', '.join(no_split) or '?'}); delete the "
            f"key so accelerate wraps the model's own _no_split_modules (as accelerate_configs/fsdp.yaml does), or set "
            f"it to {','.join(no_split) or 'a layer class of this model'}"
        )


# Trackers we name an extra for (pyproject); transformers knows others, which need their own package.
REPORT_EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}


def check_report_to(report_to: list[str]) -> None:
    """Each `training.report_to` backend is known and installed, checked before the model loads.

    transformers would otherwise fail with a raw traceback at trainer creation, after the model loaded.
    """
    from transformers.integrations import integration_utils as hf_integrations

    known = {"none", "all", *hf_integrations.INTEGRATION_TO_CALLBACK}
    for name in report_to:
        if name not in known:
            raise UserError(
                f"training.report_to: unknown backend '{name}'; use none or any of "
                f"{', '.join(sorted(REPORT_EXTRAS))} (or another transformers integration)"
            )
        check = getattr(hf_integrations, f"is_{name}_available", None)
        if name in REPORT_EXTRAS and check is not None and not check():
            raise UserError(
                f"training.report_to lists {name}, which is not installed: "
                f"pip install -e '.[{REPORT_EXTRAS[name]}]' (or remove it from report_to)"
            )


def data_parallel_size(recipe: Recipe, launch: Launch) -> int:
    """Replicas that see different batches: the processes, over the ranks that share one sequence."""
    return max(launch.world_size // recipe.training.sequence_parallel, 1)


def check_sequence_parallel(recipe: Recipe, launch: Launch) -> None:
    """training.sequence_parallel: N must divide the processes and the model's query and KV heads."""
    n = recipe.training.sequence_parallel
    if n == 1:
        return
    if launch.world_size % n:
        raise UserError(
            f"training.sequence_parallel={n} splits each sequence over {n} processes, but {launch.world_size} were "
            f"launched; launch a multiple of {n} (--num_processes / GPUS), or set training.sequence_parallel to a "
            f"divisor of {launch.world_size}"
        )
    from train.models.loading import load_model_config

    config = load_model_config(recipe.model)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    if not heads_split(heads, kv, n):
        usable = [d for d in range(2, heads + 1) if heads_split(heads, kv, d)]
        raise UserError(
            f"training.sequence_parallel={n}: each rank attends with 1/{n} of the heads, but "
            f"{recipe.model.name_or_path} has {heads} query and {kv} KV heads; use one of {usable or [1]}"
        )


def heads_split(heads: int, kv: int, n: int) -> bool:
    """Ulysses over n ranks: the query heads divide by n, and the KV heads divide by n or are replicated n/kv
    times (DeepSpeed's core does that when n is a multiple of them)."""
    return heads % n == 0 and (kv % n == 0 or n % kv == 0)


def gradient_accumulation(recipe: Recipe, launch: Launch) -> int:
    training = recipe.training
    if training.global_batch_size is None:
        return training.gradient_accumulation_steps
    return training.global_batch_size // (training.per_device_train_batch_size * data_parallel_size(recipe, launch))


# ---------------------------------------------------------------------------------------------
# STRATEGY=auto


def intermediate_size(config) -> int:
    """The MLP width: `intermediate_size` (Qwen2, Llama, Mistral, Gemma, Qwen3), GPT-2's `n_inner`, else 4 x hidden
    (GPT-2's default when n_inner is unset)."""
    return getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * config.hidden_size


def kv_dim(config) -> int:
    """Width of the keys (= values) of one token in one layer: KV heads x head size (all heads without GQA)."""
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return kv * (getattr(config, "head_dim", None) or config.hidden_size // heads)


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each linear layer of one decoder block, keyed by its name inside the block as PEFT
    matches target_modules (a suffix of the module path). GPT-2 (`n_embd`; its Conv1D layers, fused QKV);
    otherwise the q/k/v/o + gate/up/down names that Qwen2, Llama, Mistral, Gemma and Qwen3 share. The config
    names differ too (GPT-2 has no intermediate_size), but transformers maps hidden_size, num_hidden_layers
    and num_attention_heads onto GPT-2's own."""
    h, inter = config.hidden_size, intermediate_size(config)
    if getattr(config, "model_type", None) == "gpt2":
        return {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "mlp.c_fc": (h, inter), "mlp.c_proj": (inter, h)}
    heads = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or h // heads
    return {
        "q_proj": (h, heads * hd),
        "k_proj": (h, kv_dim(config)),
        "v_proj": (h, kv_dim(config)),
        "o_proj": (heads * hd, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }


def lora_target_shapes(config, target_modules: list[str]) -> dict[str, tuple[int, int]]:
    """The linear_shapes that `lora.target_modules` adapts: all of them for PEFT's all-linear (which skips only the
    output head), else those whose name ends in a listed name, as PEFT matches a list of names."""
    from train.core.config import ALL_LINEAR

    shapes = linear_shapes(config)
    if list(target_modules) == [ALL_LINEAR]:
        return shapes
    return {
        name: shape
        for name, shape in shapes.items()
        if any(name == t or name.endswith("." + t) or t.endswith("." + name) for t in target_modules)
    }


def parameter_count(config) -> tuple[int, int]:
    """(decoder-layer parameters, embedding + head parameters) of a decoder-only model, from its config."""
    h = config.hidden_size
    per_layer = sum(i * o for i, o in linear_shapes(config).values()) + 2 * h
    embed = config.vocab_size * h * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    return config.num_hidden_layers * per_layer, embed + h


def pick_strategy(
    params: tuple[int, int], quantization: str, gpus: int, gpu_memory_gb: float, full: bool = False
) -> tuple[str, str]:
    """(strategy, why) for a model of `params` (decoder, embeddings) on `gpus` GPUs of `gpu_memory_gb` each;
    `full`: full fine-tuning, whose gradients and optimizer state cover every weight."""
    decoder, embed = params
    # bitsandbytes quantizes the decoder's linear layers; embeddings and head stay 16-bit.
    weights_gb = (decoder * BYTES_PER_PARAM[quantization] + embed * 2) / 1e9
    state = " and full fine-tuning state" if full else ""
    if full:
        weights_gb += (decoder + embed) * FULL_TRAINING_STATE_BYTES / 1e9
    need_gb = weights_gb * HEADROOM
    summary = (
        f"{(decoder + embed) / 1e9:.1f}B parameters in {quantization} are ~{weights_gb:.1f} GB of weights{state}, "
        f"~{need_gb:.1f} GB with activations and optimizer headroom; each GPU has {gpu_memory_gb:.0f} GB"
    )
    if need_gb <= gpu_memory_gb:
        if gpus == 1:
            return "single", f"{summary}: it fits on the one GPU"
        return "ddp", f"{summary}: a full copy fits on every GPU, so plain data parallel (DDP) is fastest"
    if need_gb <= gpu_memory_gb * gpus:
        if quantization == "nf4":
            return "fsdp", (
                f"{summary}: a copy does not fit on one GPU, but sharded over {gpus} it does: FSDP2 "
                "QLoRA (set model.quant_storage to model.dtype)"
            )
        return "zero3", f"{summary}: a copy does not fit on one GPU; ZeRO-3 shards it over {gpus}"
    if full:
        fix = "add GPUs, or train a LoRA/QLoRA adapter instead (a lora section with model.quantization: nf4)"
    elif quantization == "nf4":
        fix = "add GPUs, or BACKEND=unsloth on one GPU"
    else:
        fix = "quantize (model.quantization: nf4)"
    return "zero3_offload", (
        f"{summary}: even sharded over {gpus} GPU(s) it does not fit; ZeRO-3 with CPU offload (slow), or {fix}"
    )


def gpu_memory_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def sharding_in_effect(trainer) -> str:
    """What the trainer actually runs, read from it (not from what was asked)."""
    if trainer.is_fsdp_enabled:
        return f"fsdp{getattr(trainer.accelerator.state.fsdp_plugin, 'fsdp_version', '')}"
    if trainer.is_deepspeed_enabled:
        return f"zero{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if trainer.accelerator.num_processes > 1 else "none"


def check_sharding(launch: Launch, in_effect: str) -> None:
    expected = {"fsdp": "fsdp", "zero2": "zero2", "zero3": "zero3"}.get(launch.strategy)
    if expected and not in_effect.startswith(expected):
        raise UserError(
            f"the launcher asked for {launch.strategy} but accelerate set up {in_effect} (FSDP needs GPUs: on CPU "
            "accelerate falls back to DDP); launch with accelerate_configs/ddp.yaml, or on GPUs"
        )
