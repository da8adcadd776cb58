"""Stage lineage: a stage folder's record (stage.json), its adapter, and the chain of its ancestors.

A stage that names a `parent` continues from it: every ancestor's adapter is merged, oldest first,
into the base before this stage trains, merges or generates.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.core.config import Recipe, is_tiny
from train.core.errors import UserError
from train.models.tiny import tiny_build_name

ADAPTER_DIR = "adapter"


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


def adapter_chain(parent: str | None) -> list[Path]:
    """Adapter folders of every ancestor, oldest first."""
    chain: list[Path] = []
    seen = set()
    while parent:
        stage_dir = Path(parent).resolve()
        if stage_dir in seen:
            raise UserError(f"stage lineage loops at {stage_dir}")
        seen.add(stage_dir)
        info = read_stage(stage_dir)
        adapter = stage_dir / ADAPTER_DIR
        if not (adapter / "adapter_config.json").is_file():
            raise UserError(f"parent stage '{stage_dir}' has no adapter in {adapter}")
        chain.append(adapter)
        parent = info.get("parent")
    return list(reversed(chain))


def check_parent_base(recipe: Recipe) -> None:
    if recipe.parent:
        parent_base = read_stage(recipe.parent).get("base_model")
        if parent_base != recipe.model.name_or_path:
            raise UserError(
                f"parent stage {recipe.parent} was trained on '{parent_base}' but this recipe's model.name_or_path "
                f"is '{recipe.model.name_or_path}'; set model.name_or_path: {parent_base}"
            )


def stage_lineage(stage_dir: Path) -> list[Path]:
    """Stage folders from the oldest ancestor to this stage."""
    info = read_stage(stage_dir)
    return [adapter.parent for adapter in adapter_chain(info.get("parent"))] + [stage_dir.resolve()]
