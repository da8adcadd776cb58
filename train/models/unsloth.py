"""The single-GPU Unsloth backend (`backend: unsloth`, `make train-stage1 GPUS=1 BACKEND=unsloth`).

Only model loading and LoRA wrapping differ from the main path: Unsloth's
`FastLanguageModel.from_pretrained` (by default the pre-quantized `model.unsloth_name_or_path`
checkpoint) and `get_peft_model(..., use_gradient_checkpointing="unsloth")`. The data, template,
completion-only loss, packing, TRL trainer, checkpoints, `adapter/` and `stage.json` are the main
path's, so `merge`, `export` and `eval` take either backend's output unchanged; `stage.json` names
`model.name_or_path` (the 16-bit base) as the base the adapter is merged into.

Unsloth is imported lazily: without a CUDA GPU `import unsloth` raises NotImplementedError (not
ImportError), so any failure is caught and explained. The two Unsloth calls sit behind `UnslothApi`
so CPU tests can check everything around them; those tests never claim that Unsloth trained.
"""

from __future__ import annotations

import os

from train.core.config import ALL_LINEAR, Recipe
from train.core.errors import UserError
from train.core.log import get_logger

log = get_logger("unsloth")

# lora.target_modules [all-linear] (the default) spelled out: Unsloth's fast LoRA path takes these names, and on the
# Llama-style models it supports they are exactly what PEFT's all-linear adapts.
UNSLOTH_ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class UnslothApi:
    """The two Unsloth calls this backend makes (a seam: tests may pass another implementation)."""

    def __init__(self):
        try:
            import unsloth  # noqa: F401 - patches transformers/TRL on import, must come first
            from unsloth import FastLanguageModel
        except Exception as err:  # noqa: BLE001 - NotImplementedError without a GPU, ImportError without the extra
            raise UserError(
                "backend 'unsloth' needs an NVIDIA GPU and the unsloth extra (pip install -e '.[unsloth]'); "
                f"`import unsloth` failed with {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
                "Use backend: transformers on this machine"
            ) from None
        self.fast = FastLanguageModel

    def from_pretrained(self, model_name: str, max_seq_length: int, load_in_4bit: bool, dtype):
        model, _tokenizer = self.fast.from_pretrained(
            model_name=model_name, max_seq_length=max_seq_length, load_in_4bit=load_in_4bit, dtype=dtype
        )
        return model

    def get_peft_model(
        self,
        model,
        r: int,
        alpha: int,
        dropout: float,
        target_modules: list[str],
        seed: int,
        use_rslora: bool,
        gradient_checkpointing: bool,
    ):
        return self.fast.get_peft_model(
            model,
            r=r,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=target_modules,
            bias="none",
            random_state=seed,
            use_rslora=use_rslora,
            use_gradient_checkpointing="unsloth" if gradient_checkpointing else False,
        )


def check_unsloth_recipe(recipe: Recipe) -> None:
    """Refusals that do not need a GPU: one process, a 4-bit or 16-bit base, no other kernels."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise UserError(
            f"backend 'unsloth' runs in one process on one GPU, but WORLD_SIZE={world}; launch "
            "`python -m train sft ...` (or make ... GPUS=1 BACKEND=unsloth), or use backend: transformers"
        )
    if recipe.model.quantization == "int8":
        raise UserError("backend 'unsloth' loads 4-bit or 16-bit bases; set model.quantization: nf4 or none")


def load_unsloth_model(recipe: Recipe, source: str | None = None, api=None):
    """The base through Unsloth (4-bit when model.quantization is nf4), already wrapped with the recipe's LoRA.

    `source` is a parent chain merged in 16-bit (a later stage); else `model.unsloth_name_or_path`
    (the pre-quantized checkpoint) or, without one, `model.name_or_path`.
    """
    from train.models.loading import resolve_model_path, torch_dtype

    check_unsloth_recipe(recipe)
    api = api or UnslothApi()
    model_cfg = recipe.model
    name = resolve_model_path(source or model_cfg.unsloth_name_or_path or model_cfg.name_or_path)
    log.info(
        "unsloth: loading %s (%s), LoRA r=%d on %s",
        name,
        model_cfg.quantization,
        recipe.lora.r,
        ",".join(recipe.lora.target_modules),
    )
    model = api.from_pretrained(
        name,
        max_seq_length=recipe.data.max_length,
        load_in_4bit=model_cfg.quantization == "nf4",
        dtype=torch_dtype(model_cfg.dtype),
    )
    lora = recipe.lora
    targets = UNSLOTH_ALL_LINEAR if lora.target_modules == [ALL_LINEAR] else list(lora.target_modules)
    return api.get_peft_model(
        model,
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        target_modules=targets,
        seed=recipe.training.seed,
        use_rslora=lora.use_rslora,
        gradient_checkpointing=model_cfg.gradient_checkpointing,
    )
