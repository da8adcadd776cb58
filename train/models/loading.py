"""Load tokenizer and base model as a recipe says: bf16/fp32 or 4-bit NF4 / 8-bit (bitsandbytes),
attention kernel, Liger kernels, and the parent stages' adapters merged into the 16-bit base.

Stacking QLoRA stages: the parent adapter is merged into the *16-bit* base (never into 4-bit
weights), the merged model is written once to `<output_dir>/parent_merged/`, and the new stage
loads that folder quantized again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import train.models.attention  # noqa: F401  (registers the sdpa_packed attention)
from train.core.config import ALL_LINEAR, LoraConfig, ModelConfig, Recipe, is_tiny
from train.core.errors import UserError
from train.core.io import replace_output
from train.core.log import get_logger
from train.models.lineage import Chain, check_parent_base, resolve_chain

log = get_logger("model")


def resolve_model_path(name_or_path: str) -> str:
    if is_tiny(name_or_path):
        from train.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model(name_or_path))
    if not Path(name_or_path).exists():  # a Hub id: fail fast (cache only) when the Hub is unreachable
        from train.core.hub import offline_unless_hub_reachable

        offline_unless_hub_reachable()
    return name_or_path


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_model_config(model_cfg: ModelConfig):
    """The base model's config alone (no weights): for size estimates before any heavy work."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            resolve_model_path(model_cfg.name_or_path),
            revision=model_cfg.revision,
            trust_remote_code=model_cfg.trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the config of '{model_cfg.name_or_path}': {_first_line(err)}") from None


def load_tokenizer(model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    name = resolve_model_path(model_cfg.tokenizer or model_cfg.name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
        )
    except Exception as err:  # OSError offline, ValueError for an unknown class, HTTP errors
        raise UserError(
            f"cannot load tokenizer '{name}': {_first_line(err)} "
            "(model.name_or_path must be 'tiny', a local folder, or a Hub id reachable or in the HF cache)"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str):
    from train.models.merging import MERGE_DTYPES

    return MERGE_DTYPES[name]


def check_kernels(model_cfg: ModelConfig) -> None:
    """Fail at start-up, with the fix, when a requested kernel cannot run here."""
    import torch

    if model_cfg.attn_implementation == "flash_attention_2":
        if not torch.cuda.is_available():
            raise UserError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
        if importlib.util.find_spec("flash_attn") is None:
            raise UserError(
                "model.attn_implementation=flash_attention_2 but flash-attn is not installed: "
                "pip install '.[gpu]' (or use sdpa)"
            )
    if (
        model_cfg.attn_implementation == "flash_attention_3"
        and importlib.util.find_spec("flash_attn_interface") is None
    ):
        raise UserError("model.attn_implementation=flash_attention_3 needs the flash-attn 3 (hopper) build; use sdpa")
    if model_cfg.attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise UserError(
            "model.attn_implementation=flex_attention trains on a CUDA GPU only (PyTorch has no flex attention "
            "backward on CPU); use sdpa_packed here"
        )
    if model_cfg.use_liger:
        if not torch.cuda.is_available():
            raise UserError("model.use_liger=true needs a GPU (Liger's Triton kernels); set model.use_liger: false")
        if importlib.util.find_spec("liger_kernel") is None:
            raise UserError(
                "model.use_liger=true but liger-kernel is not installed: pip install '.[liger]' (make install-gpu)"
            )
    if model_cfg.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"model.quantization={model_cfg.quantization} needs bitsandbytes: pip install bitsandbytes")


def quantization_config(model_cfg: ModelConfig):
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=model_cfg.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(model_cfg.dtype),
            bnb_4bit_quant_storage=torch_dtype(model_cfg.quant_storage) if model_cfg.quant_storage != "uint8" else None,
        )
    if model_cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def pin_4bit_cpu_path(model) -> None:
    """Keep every bitsandbytes 4-bit layer on the path training uses (dequantize, then matmul in the
    compute dtype), on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weights the first time it runs in
    eval mode without gradients, and from then on computes it in bfloat16 through a fused kernel that
    has no backward. So an evaluation differs from training by bf16 rounding (machine-dependent results),
    and training *after* an evaluation (eval_steps) silently stops passing gradients through the frozen
    4-bit layers to the LoRA weights below them. GPUs are unaffected (the repack is CPU-only).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def peft_target_modules(lora: LoraConfig) -> str | list[str]:
    """The recipe's target_modules as PEFT takes them: its `all-linear` shorthand works only as a plain string."""
    return ALL_LINEAR if lora.target_modules == [ALL_LINEAR] else list(lora.target_modules)


def peft_lora_config(lora: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=peft_target_modules(lora),
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def parent_chain(recipe: Recipe) -> Chain:
    """What this stage starts from: the recipe's base, or its parent's lineage (adapters, a full stage's model)."""
    return resolve_chain(recipe.parent, recipe.model.name_or_path, recipe.model.revision)


def load_merged_16bit(chain: Chain, model_cfg: ModelConfig, attn_implementation: str | None = None):
    """The chain's base in 16/32-bit with each adapter merged in order (never into quantized weights)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(chain.base),
        revision=chain.revision,
        dtype=torch_dtype(model_cfg.dtype),
        trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=attn_implementation,
        low_cpu_mem_usage=True,
    )
    for adapter in chain.adapters:
        log.info("merging adapter %s", adapter)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return model


PARENT_CHAIN = "parent_chain.json"


def folder_identity(folder: str | Path) -> str:
    """Changes when a model folder's weights are written again (sizes and times: no re-read of a 64 GB model)."""
    import hashlib

    h = hashlib.sha256(str(Path(folder).resolve()).encode())
    for path in sorted(Path(folder).glob("*.safetensors")) + sorted(Path(folder).glob("*.json")):
        h.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def chain_identity(chain: Chain, *extra: str) -> str:
    """Changes when the chain's base or any of its adapters changes (a parent trained again); `extra` (a dtype,
    a folder) is hashed in too. Keys parent_merged/ and a distillation teacher's merged folder and logit cache."""
    import hashlib

    h = hashlib.sha256(json.dumps([chain.base, chain.revision, *extra]).encode())
    if chain.from_stage:
        h.update(folder_identity(chain.base).encode())
    elif is_tiny(chain.base):
        from train.models.tiny import tiny_build_name

        h.update(tiny_build_name(chain.base).encode())
    for adapter in chain.adapters:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            with open(adapter / name, "rb") as f:
                for block in iter(lambda f=f: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def chain_fingerprint(recipe: Recipe, chain: Chain) -> str:
    """Changes when the base, its dtype or any ancestor's weights change (a parent trained again)."""
    return chain_identity(chain, recipe.model.dtype)


def parent_merged_dir(recipe: Recipe, chain: Chain) -> str:
    """The parent chain merged into the 16-bit base, written to <output_dir>/parent_merged and reused while
    the chain it was merged from is unchanged (`parent_chain.json` holds its fingerprint)."""
    from accelerate import PartialState

    from train.models.merging import stream_merge

    merged_dir = Path(recipe.output_dir) / "parent_merged"
    marker = merged_dir / PARENT_CHAIN
    fingerprint = chain_fingerprint(recipe, chain)
    state = PartialState()
    with state.main_process_first():
        current = json.loads(marker.read_text()).get("fingerprint") if marker.is_file() else None
        if state.is_main_process and current != fingerprint:
            if current is not None or merged_dir.exists():
                log.info("parent_merged in %s is from another parent chain: merging again", merged_dir)
            tmp = merged_dir.with_name("parent_merged.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            # Tensor by tensor from the base's shards: bounded memory, and no from_pretrained (which under
            # ZeRO-3 is a collective that the other ranks, waiting here, would never join).
            stream_merge(
                resolve_model_path(chain.base), chain.adapters, tmp, recipe.model.dtype, revision=chain.revision
            )
            (tmp / PARENT_CHAIN).write_text(
                json.dumps(
                    {"fingerprint": fingerprint, "base": chain.base, "adapters": [str(a) for a in chain.adapters]},
                    indent=2,
                )
                + "\n"
            )
            replace_output(tmp, merged_dir)
    return str(merged_dir)


def start_source(recipe: Recipe, chain: Chain) -> str:
    """The folder (or Hub id) a stage loads with from_pretrained: the base, a full parent's model/, or the
    parent chain merged in 16-bit once (parent_merged/) when adapters must be merged first."""
    if chain.adapters:
        return parent_merged_dir(recipe, chain)
    return resolve_model_path(chain.base)


def master_dtype(recipe: Recipe) -> str:
    """The dtype a stage's weights are loaded and trained in. Full fine-tuning in bf16/fp16 keeps fp32 master
    weights (the Trainer computes in model.dtype by autocast): Adam's small updates would round away in 16-bit
    weights. DeepSpeed keeps its own fp32 copy, so under DeepSpeed the weights load in model.dtype."""
    if (
        recipe.full_finetune
        and recipe.model.dtype != "float32"
        and os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true"
    ):
        return "float32"
    return recipe.model.dtype


def load_model_for_training(recipe: Recipe):
    """The model a stage starts from (without the new LoRA, which the trainer adds; all of it trains under
    lora: none)."""
    import torch
    from transformers import AutoModelForCausalLM

    model_cfg = recipe.model
    check_kernels(model_cfg)
    chain = parent_chain(recipe)
    check_parent_base(recipe)
    quant = quantization_config(model_cfg)
    from transformers.integrations import is_deepspeed_zero3_enabled

    dtype = master_dtype(recipe)
    # Full fine-tuning loads from a folder even after merging parents: TRL builds a DPO/GRPO reference model from
    # the policy's config path, which must hold the weights the stage starts from (parent_merged/, not the base).
    if chain.adapters and quant is None and not is_deepspeed_zero3_enabled() and not recipe.full_finetune:
        return load_merged_16bit(chain, model_cfg, model_cfg.attn_implementation)

    # A quantized (or ZeRO-3-sharded, or fully fine-tuned) child merges its parents in 16-bit once on one process,
    # then loads that folder.
    source = start_source(recipe, chain)
    kwargs = {}
    if quant is not None and torch.cuda.is_available():
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            revision=None if chain.adapters else chain.revision,
            dtype=torch_dtype(dtype),
            quantization_config=quant,
            attn_implementation=model_cfg.attn_implementation,
            trust_remote_code=model_cfg.trust_remote_code,
            low_cpu_mem_usage=True,
            **kwargs,
        )
    except OSError as err:
        raise UserError(f"cannot load model '{source}': {_first_line(err)}") from None
    if quant is not None:
        pin_4bit_cpu_path(model)
    if model_cfg.trust_remote_code:
        log.warning("trust_remote_code is on: code from '%s' runs in this process", model_cfg.name_or_path)
    return model
