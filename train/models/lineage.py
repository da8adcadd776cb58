"""Stage lineage: a stage folder's record (stage.json), its adapter, and the chain of its ancestors.

A stage that names a `parent` continues from it: every ancestor's adapter is merged, oldest first,
into the base before this stage trains, merges or generates. A full fine-tuning stage (`lora: none`)
saves a whole model instead; it becomes the base of the stages after it (`resolve_chain`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from train.core.config import Recipe, is_tiny
from train.core.errors import UserError
from train.models.tiny import tiny_build_name

ADAPTER_DIR = "adapter"  # a LoRA stage's weights
MODEL_DIR = "model"  # a full fine-tuning stage's weights (lora: none): a whole model folder


def read_stage(stage_dir: str | Path) -> dict:
    path = Path(stage_dir) / "stage.json"
    if not path.is_file():
        raise UserError(f"parent stage '{stage_dir}' has no stage.json; train that stage first")
    info = json.loads(path.read_text(encoding="utf-8"))
    if is_tiny(info.get("base_model")) and info.get("base_model_build"):
        if info["base_model_build"] != tiny_build_name(info["base_model"]):
            raise UserError(
                f"stage '{stage_dir}' was trained on the embedded model {info['base_model_build']}, but this checkout "
                f"builds {tiny_build_name(info['base_model'])} (the bundled samples, its tokenizer corpus, changed); its adapter does "
                "not fit the new base: train that stage again (make demo)"
            )
    return info


def is_full_stage(stage_dir: str | Path) -> bool:
    """A full fine-tuning stage (`lora: none`): its weights are a whole model in model/, not an adapter."""
    return (Path(stage_dir) / MODEL_DIR / "config.json").is_file()


def stage_weights(stage_dir: str | Path) -> Path:
    """The folder of a finished stage's own weights (and its tokenizer): model/ or adapter/."""
    return Path(stage_dir) / (MODEL_DIR if is_full_stage(stage_dir) else ADAPTER_DIR)


def ancestors(stage: str | Path | None) -> list[tuple[Path, dict]]:
    """(folder, stage.json) of `stage` and every stage it continues from, newest first."""
    found: list[tuple[Path, dict]] = []
    seen = set()
    while stage:
        stage_dir = Path(stage).resolve()
        if stage_dir in seen:
            raise UserError(f"stage lineage loops at {stage_dir}")
        seen.add(stage_dir)
        info = read_stage(stage_dir)
        found.append((stage_dir, info))
        stage = info.get("parent")
    return found


@dataclass(frozen=True)
class Chain:
    """What a stage's model is made of: `base` with `adapters` merged into it, oldest first.

    `base` is the recipe's base model (a Hub id, 'tiny', a folder), or the model/ folder of the newest full
    fine-tuning ancestor: a full stage replaces everything before it, so the chain stops there."""

    base: str
    adapters: list[Path]
    revision: str | None = None  # the Hub revision of `base` (None for a stage's model folder)
    from_stage: bool = False  # `base` is a full fine-tuning stage's model/


def resolve_chain(stage: str | Path | None, base_model: str, revision: str | None = None) -> Chain:
    """The chain that ends at `stage` (its own weights included); `base_model`/`revision`: the recipe's base,
    used when no ancestor is a full fine-tuning stage. Every stage on the way must have its weights."""
    adapters: list[Path] = []
    for stage_dir, _info in ancestors(stage):
        if is_full_stage(stage_dir):
            return Chain(str(stage_dir / MODEL_DIR), list(reversed(adapters)), None, from_stage=True)
        adapter = stage_dir / ADAPTER_DIR
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(
                f"parent stage '{stage_dir}' has neither an adapter ({adapter}) nor a model ({stage_dir / MODEL_DIR}); "
                "train that stage first"
            )
        adapters.append(adapter)
    return Chain(base_model, list(reversed(adapters)), revision)


def stage_chain(stage_dir: str | Path, weights: str | Path | None = None) -> Chain:
    """The chain of a finished stage, from its stage.json; `weights`: one of its checkpoints (an adapter, or a
    model folder for a full fine-tuning stage) instead of its final weights."""
    info = read_stage(stage_dir)
    recipe_model = info.get("recipe", {}).get("model", {})
    chain = resolve_chain(stage_dir, info["base_model"], recipe_model.get("revision"))
    if weights is None:
        return chain
    weights = Path(weights)
    if is_full_stage(stage_dir):
        if not (weights / "config.json").is_file():
            raise UserError(f"{weights} holds no model (config.json missing); {stage_dir} is a full fine-tuning stage")
        return replace(chain, base=str(weights))
    if not (weights / "adapter_config.json").is_file():
        raise UserError(f"no LoRA adapter in {weights} (adapter_config.json missing); train the stage first")
    return replace(chain, adapters=[*chain.adapters[:-1], weights])


def adapter_chain(parent: str | None) -> list[Path]:
    """Adapter folders from the base (or the newest full fine-tuning ancestor) to `parent`, oldest first;
    checks that every stage of the lineage has its weights."""
    return resolve_chain(parent, "").adapters


def check_parent_base(recipe: Recipe) -> None:
    if recipe.parent:
        parent_base = read_stage(recipe.parent).get("base_model")
        if parent_base != recipe.model.name_or_path:
            raise UserError(
                f"parent stage {recipe.parent} was trained on '{parent_base}' but this recipe's model.name_or_path "
                f"is '{recipe.model.name_or_path}'; set model.name_or_path: {parent_base}"
            )


def stage_lineage(stage_dir: str | Path) -> list[Path]:
    """Stage folders from the oldest ancestor to this stage."""
    return [folder for folder, _info in reversed(ancestors(stage_dir))]
