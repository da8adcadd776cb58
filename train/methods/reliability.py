"""Surviving interruption: atomic checkpoints, preemption, non-finite losses, start-up disk checks.

- Checkpoints are written to `tmp-checkpoint-N`, listed in `checkpoint.json` (every file and its
  size) and renamed to `checkpoint-N` only when complete. Resuming takes the newest checkpoint whose
  listing matches the files on disk, so a save cut short or a truncated file is never chosen.
- SIGTERM / SIGINT / SIGUSR1 set a flag; at the next micro-batch boundary (or evaluation batch) every
  rank agrees, the run saves a full checkpoint of the last finished step and stops; the stage command
  (sft, reward, dpo, grpo) then exits 0 saying how to resume.
- A non-finite loss or gradient before an optimizer step is either skipped (the weights and the
  optimizer state do not change; counted) or aborts the run with a checkpoint of the last good state.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from train.core.errors import UserError
from train.core.log import get_logger

log = get_logger("reliability")

MANIFEST = "checkpoint.json"
STAGE_STATE = "stage_state.json"  # in each checkpoint: the run's identity and our counters (tokens seen)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------------------------------------
# Checkpoints


def write_manifest(folder: Path, step: int) -> None:
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from, or None when it is complete."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no checkpoint.json (the save did not finish)"
    try:
        listed = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "checkpoint.json is damaged"
    for name, size in listed.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
    return None


def checkpoint_identity(folder: Path) -> dict | None:
    try:
        return json.loads((folder / STAGE_STATE).read_text(encoding="utf-8")).get("run")
    except (OSError, ValueError, AttributeError):
        return None


def newest_complete_checkpoint(output_dir: Path, identity: str | None = None) -> Path | None:
    """The newest checkpoint that is complete and, with `identity`, was written by that run (recipe identity)."""
    found = sorted(
        (
            (int(m.group(1)), p)
            for p in output_dir.glob("checkpoint-*")
            if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))
        ),
        reverse=True,
    )
    for _, folder in found:
        if identity is not None and (checkpoint_identity(folder) or {}).get("recipe") != identity:
            log.warning("skipping %s: another run's checkpoint", folder)
            continue
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log.warning("skipping %s: %s", folder, problem)
    return None


def commit_checkpoint(staging: Path, final: Path, step: int) -> None:
    """Rank 0: list the files, then rename the staged folder into place."""
    write_manifest(staging, step)
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)


# ---------------------------------------------------------------------------------------------
# Preemption


class EvaluationPreempted(Exception):
    """Raised between evaluation batches when a preemption signal arrived: the evaluation is dropped."""


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class PreemptionCallback(TrainerCallback):
    """SIGTERM, SIGINT or SIGUSR1 (SLURM's early warning) -> save a checkpoint and stop, on every rank.

    The ranks agree at every micro-batch boundary (one all-reduce of a flag), not only at the end of an
    optimizer step: with long accumulation a step can outlast the scheduler's grace period. Stopping
    inside an accumulation saves the state of the last finished step (weights, optimizer, scheduler,
    data position); the partial gradients are dropped and that step is trained again on resume.
    During evaluation, the check runs after every evaluation batch and drops the evaluation.
    """

    def __init__(self):
        self.requested = False
        self.signalled_at: float | None = None  # time.monotonic() of the first signal
        self.preempted_at: int | None = None
        self._previous = {}
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if not self.requested:
            self.signalled_at = time.monotonic()
            log.warning(
                "received %s: saving a checkpoint at the next micro-batch boundary, then stopping",
                signal.Signals(signum).name,
            )
        self.requested = True

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _stop(self, state, control):
        if self.preempted_at is None and _any_rank(self.requested):
            self.preempted_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        return self._stop(state, control)

    def on_substep_end(self, args, state, control, **kwargs):
        # The Trainer leaves its micro-batch loop when should_training_stop is set; the save then
        # happens at the epoch's end (its _maybe_log_save_evaluate), with the last finished step's state.
        return self._stop(state, control)

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.preempted_at is None and _any_rank(self.requested):
            self.preempted_at = state.global_step
            raise EvaluationPreempted(f"preempted during evaluation at step {state.global_step}")
        return control


def _any_rank(flag: bool) -> bool:
    """True if the flag is set on any rank (all ranks must call this at the same point)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        device = "cuda" if torch.cuda.is_available() and torch.distributed.get_backend() == "nccl" else "cpu"
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())
    return flag


# ---------------------------------------------------------------------------------------------
# Non-finite loss / gradients


class NonFiniteGuard(TrainerCallback):
    """Checks the step's losses and gradients right before the optimizer step."""

    def __init__(self, trainer, policy: str, max_consecutive: int):
        self.trainer, self.policy, self.max_consecutive = trainer, policy, max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.aborted_at: int | None = None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        bad = self.trainer.step_loss_nonfinite or not _grads_finite(self.trainer.model)
        bad = _any_rank(bad)
        self.trainer.step_loss_nonfinite = False
        self.trainer.skip_optimizer_step = bad
        if not bad:
            self.consecutive = 0
            return control
        step = state.global_step + 1
        self.skipped += 1
        self.consecutive += 1
        if self.policy == "abort" or self.consecutive > self.max_consecutive:
            self.aborted_at = step
            control.should_save = True  # the skipped update leaves the last good weights to save
            control.should_training_stop = True
            return control
        log.warning("non-finite loss or gradient at step %d: update skipped (%d in a row)", step, self.consecutive)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.aborted_at is not None:
            control.should_save = True
            control.should_training_stop = True
        return control


def _grads_finite(model) -> bool:
    for param in model.parameters():
        if param.requires_grad and param.grad is not None:
            grad = param.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            if not torch.isfinite(local).all():
                return False
    return True


def guard_optimizer_step(trainer, optimizer) -> None:
    """Make the optimizer's step a no-op while the trainer marks the step as skipped."""
    original = optimizer.step

    def step(*args, **kwargs):
        if trainer.skip_optimizer_step:
            trainer.skip_optimizer_step = False
            return None
        return original(*args, **kwargs)

    optimizer.step = step


# ---------------------------------------------------------------------------------------------
# Start-up checks


def lora_parameter_estimate(config, lora) -> int:
    from train.methods.launch import lora_target_shapes

    per_layer = sum(lora.r * (i + o) for i, o in lora_target_shapes(config, lora.target_modules).values())
    return per_layer * config.num_hidden_layers


def stage_disk_estimate(config, recipe) -> tuple[int, str]:
    """(bytes, what): the disk a stage's checkpoint and final weights need."""
    if recipe.full_finetune:
        from train.methods.launch import parameter_count

        params = sum(parameter_count(config))
        # A checkpoint: the fp32 master weights (or 16-bit weights + DeepSpeed's fp32 copy) and two Adam moments;
        # save_total_limit of them, plus the one being written before the oldest is rotated out; the final model.
        checkpoints = (recipe.training.save_total_limit or 1) + 1
        return int(params * (16 * checkpoints + 4)), f"{checkpoints} checkpoints of this fully fine-tuned model"
    # A checkpoint: fp32 adapter + two Adam moments; the final adapter again; 2x margin.
    return int(lora_parameter_estimate(config, recipe.lora) * 4 * 4 * 2), "a checkpoint of this adapter"


def check_free_disk(output_dir: Path, estimate: tuple[int, str]) -> None:
    need, what = estimate[0] + 64 * 2**20, estimate[1]
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise UserError(
            f"{output_dir} has {free / 2**30:.2f} GiB free, {what} needs about "
            f"{need / 2**30:.2f} GiB; free some space or point output_dir elsewhere"
        )
