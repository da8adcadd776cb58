"""What can be generated from or evaluated: a stage folder (base + its adapter chain), one of a
stage's checkpoints, a merged model folder, or a GGUF file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from train.core.errors import UserError
from train.models.lineage import ADAPTER_DIR


@dataclass
class Target:
    label: str
    kind: str  # stage | merged | gguf
    path: Path
    adapter: Path | None = None  # a stage's checkpoint adapter instead of its final one


def resolve_targets(specs: list[str], checkpoints: bool) -> list[Target]:
    targets = []
    for spec in specs:
        path = Path(spec)
        if path.suffix == ".gguf" and path.is_file():
            targets.append(Target(path.name, "gguf", path))
        elif (path / "stage.json").is_file():
            if checkpoints:  # earliest first: a tie goes to the earlier checkpoint
                ckpts = sorted(
                    (p for p in path.glob("checkpoint-*") if (p / "adapter_config.json").is_file()),
                    key=lambda p: int(p.name.split("-")[1]),
                )
                if not ckpts:
                    raise UserError(f"--checkpoints: {path} has no checkpoint-N folders with an adapter")
                targets.extend(Target(f"{path.name}/{c.name}", "stage", path, c) for c in ckpts)
                targets.append(Target(f"{path.name} (final)", "stage", path, path / ADAPTER_DIR))
            else:
                targets.append(Target(path.name, "stage", path))
        elif (path / "config.json").is_file():
            targets.append(Target(path.name, "merged", path))
        else:
            raise UserError(f"{spec} is not a stage folder (stage.json), a merged model (config.json) or a .gguf file")
    return targets
