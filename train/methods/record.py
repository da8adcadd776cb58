"""What a stage leaves behind: stage.json (lineage), metrics.jsonl, loss_curve.png, the resolved recipe.

stage.json never holds secrets: the recipe has no token fields (tokens come from the
environment), and nothing from the environment is copied into it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml
from transformers import TrainerCallback

from train.core.config import Recipe, is_tiny, recipe_to_dict
from train.core.io import write_json, write_jsonl
from train.core.log import get_logger, is_main_process
from train.core.paths import REPO_ROOT
from train.models.lineage import ADAPTER_DIR, MODEL_DIR

log = get_logger("record")


def _tiny_build(name: str) -> str:
    from train.models.tiny import tiny_build_name

    return tiny_build_name(name)


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MetricsLogCallback(TrainerCallback):
    """Append every Trainer log record to `metrics.jsonl` as it happens (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or not state.is_world_process_zero:
            return
        record = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}
        write_jsonl(self.path, [record], append=True)


def losses(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(rec["step"], rec["loss"]) for rec in log_history if "loss" in rec and "step" in rec]


def plot_loss_curve(log_history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = losses(log_history)
    evals = [(rec["step"], rec["eval_loss"]) for rec in log_history if "eval_loss" in rec]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#4c72b0")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss", color="#c44e52")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_stage_outputs(recipe: Recipe, out: Path, manifest: dict, metrics: dict, log_history: list[dict]) -> dict:
    """Write stage.json, recipe.yaml and loss_curve.png; return the stage record."""
    record = {
        "stage": recipe.stage,
        "description": recipe.description,
        "method": recipe.method,
        "backend": recipe.backend,
        "base_model": recipe.model.name_or_path,
        "base_model_build": _tiny_build(recipe.model.name_or_path) if is_tiny(recipe.model.name_or_path) else None,
        "quantization": recipe.model.quantization,
        "parent": str(Path(recipe.parent).resolve()) if recipe.parent else None,
        "finetune": "full" if recipe.full_finetune else "lora",
        "weights": MODEL_DIR if recipe.full_finetune else ADAPTER_DIR,  # the folder of this stage's own weights
        "recipe_path": recipe.source_path,
        "recipe": recipe_to_dict(recipe),
        "data": {
            "fingerprint": manifest["fingerprint"],
            "processed_dir": recipe.data.processed_dir,
            "train_rows": manifest["train_rows"],
            "eval_rows": manifest["eval_rows"],
        },
        "git_commit": git_commit(),
        "metrics": metrics,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if is_main_process():
        write_json(out / "stage.json", record)
        (out / "recipe.yaml").write_text(
            yaml.safe_dump(recipe_to_dict(recipe), allow_unicode=True, sort_keys=False), encoding="utf-8"
        )
        plot_loss_curve(log_history, out / "loss_curve.png", f"{recipe.stage}")
    return record


def trim_metrics_log(path: Path, resume: str | None) -> None:
    """Keep the log of the steps the checkpoint holds; drop steps that will be trained again."""
    if resume is None:
        path.unlink(missing_ok=True)
        return
    if not path.is_file():
        return
    step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
    kept, damaged = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut short (a full disk, a kill mid-write): not a step to keep
            damaged += 1
    if damaged:
        log.warning("%s: dropped %d damaged line(s) while resuming", path, damaged)
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def mean_logged_loss(history: list[dict]) -> float | None:
    """The mean step loss of the whole run from its log (each logged loss covers the steps since the last)."""
    total, steps, last = 0.0, 0, 0
    for rec in history:
        if "loss" in rec and "step" in rec and rec["step"] > last:
            total += rec["loss"] * (rec["step"] - last)
            steps += rec["step"] - last
            last = rec["step"]
    return total / steps if steps else None
