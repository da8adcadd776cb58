"""What can be generated from or evaluated: a stage folder (base + its adapter chain, or a full fine-tuning
stage's model), one of a
stage's checkpoints, a merged model folder, or a GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.core.config import Recipe, recipe_from_dict
from train.core.errors import UserError
from train.models.lineage import is_full_stage, read_stage, stage_weights

TRUST_REMOTE_CODE_FLAG = "--trust-remote-code"


def stage_recipe(stage_dir: str | Path, info: dict | None = None, trust_remote_code: bool = False) -> Recipe:
    """The recipe stored in a stage folder's stage.json (`info`: that file, already read).

    A stage folder may come from someone else: its `model.trust_remote_code: true` would run the base model's
    own Python code here. It is obeyed only when the caller opts in (merge, generate, eval and lm-eval:
    --trust-remote-code); without that the stage is refused before anything loads.
    """
    origin = Path(stage_dir) / "stage.json"
    recipe = recipe_from_dict((info or read_stage(stage_dir))["recipe"], origin=str(origin))
    if recipe.model.trust_remote_code and not trust_remote_code:
        raise UserError(
            f"{origin} sets model.trust_remote_code: true (the code of '{recipe.model.name_or_path}' would run "
            f"here); if you trust that stage folder and its base model, pass {TRUST_REMOTE_CODE_FLAG}"
        )
    return recipe


@dataclass
class Target:
    label: str
    kind: str  # stage | merged | gguf
    path: Path
    adapter: Path | None = None  # a stage's checkpoint adapter instead of its final one
    trust_remote_code: bool = False  # the user's opt-in to a stage recipe's model.trust_remote_code


def resolve_targets(specs: list[str], checkpoints: bool, trust_remote_code: bool = False) -> list[Target]:
    """Targets for `specs`; a stage whose stored recipe wants remote code is refused here, before any model
    loads, unless `trust_remote_code`."""
    targets = []
    for spec in specs:
        path = Path(spec)
        if path.suffix == ".gguf" and path.is_file():
            targets.append(Target(path.name, "gguf", path))
        elif (path / "stage.json").is_file():
            stage_recipe(path, trust_remote_code=trust_remote_code)
            trust = {"trust_remote_code": trust_remote_code}
            if checkpoints:  # earliest first: a tie goes to the earlier checkpoint
                # A LoRA stage's checkpoints hold its adapter; a full fine-tuning stage's hold the model (except
                # under FSDP, whose checkpoints keep only the sharded state for resuming).
                marker = "config.json" if is_full_stage(path) else "adapter_config.json"
                ckpts = sorted(
                    (p for p in path.glob("checkpoint-*") if (p / marker).is_file()),
                    key=lambda p: int(p.name.split("-")[1]),
                )
                if not ckpts:
                    raise UserError(f"--checkpoints: {path} has no checkpoint-N folders with weights ({marker})")
                targets.extend(Target(f"{path.name}/{c.name}", "stage", path, c, **trust) for c in ckpts)
                targets.append(Target(f"{path.name} (final)", "stage", path, stage_weights(path), **trust))
            else:
                targets.append(Target(path.name, "stage", path, **trust))
        elif (path / "config.json").is_file():
            targets.append(Target(path.name, "merged", path))
        else:
            raise UserError(f"{spec} is not a stage folder (stage.json), a merged model (config.json) or a .gguf file")
    return targets
