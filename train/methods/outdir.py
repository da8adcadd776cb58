"""An output folder belongs to one run: identity stamps, refusals, `--overwrite`, and a lock.

The Trainer's checkpoint rotation keeps the highest step numbers and `resume_from_checkpoint=auto`
takes the newest checkpoint, whoever wrote it. So a fresh run in a folder holding another run's
`checkpoint-600` would lose its own checkpoints to rotation, and a later resume would continue the
OLD run. Here every checkpoint carries the run's identity (recipe + data fingerprint, in
stage_state.json), a fresh run refuses a folder with another run's files (or moves them aside with
`--overwrite`, never deleting them), auto-resume only takes this run's checkpoints, no recipe may
write into another stage's folder, and a lock file keeps a second run out while one is running.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from train.core.config import Recipe, recipe_to_dict
from train.core.errors import UserError
from train.core.log import get_logger, is_main_process
from train.methods.reliability import checkpoint_identity, checkpoint_problem, newest_complete_checkpoint

log = get_logger("outdir")

LOCK_FILE = ".run.lock"
# How a run is started, stopped, logged or stored: none of these makes it another run.
NOT_IDENTITY = {
    "resume_from_checkpoint",
    "stop_at_step",
    "gradient_accumulation_steps",  # derived from global_batch_size and the world size
    "max_steps",  # a resumed run may be extended
    "num_train_epochs",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "eval_steps",
    "report_to",
    "dataloader_num_workers",
}


def recipe_identity(recipe: Recipe) -> str:
    """A short hash of what makes this run this run (not where it is stored or how it is stopped)."""
    d = recipe_to_dict(recipe)
    d.pop("output_dir", None)
    d["training"] = {k: v for k, v in d.get("training", {}).items() if k not in NOT_IDENTITY}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_identity(recipe: Recipe, data_fingerprint: str | None) -> dict:
    return {"recipe": recipe_identity(recipe), "data": data_fingerprint}


def _checkpoints(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("checkpoint-*") if p.is_dir()) if out.is_dir() else []


def foreign_checkpoints(recipe: Recipe, out: Path) -> list[Path]:
    """Checkpoints in `out` that another run wrote (another recipe, or no identity stamp)."""
    mine = recipe_identity(recipe)
    return [p for p in _checkpoints(out) if (checkpoint_identity(p) or {}).get("recipe") != mine]


def _another_stage(recipe: Recipe, out: Path) -> str | None:
    from train.models.lineage import stage_lineage

    here = out.resolve()
    for ancestor in stage_lineage(recipe.parent) if recipe.parent else []:
        if ancestor == here:
            return f"it is the folder of the ancestor stage {ancestor}"
    stage_json = out / "stage.json"
    if stage_json.is_file():
        try:
            other = json.loads(stage_json.read_text(encoding="utf-8")).get("stage")
        except ValueError:
            other = "?"
        if other != recipe.stage:
            return f"it holds stage '{other}' (stage.json), not '{recipe.stage}'"
    return None


def claim(recipe: Recipe, out: Path, resume: str | None, overwrite: bool, move: bool = True) -> None:
    """Refuse an output folder this run must not write into (main process; before any heavy work).
    With `overwrite`, an earlier run of this stage is moved aside (`move=False`: checked only, as the
    pre-flight of a launch does; the launched run moves it)."""
    why = _another_stage(recipe, out)
    if why:
        raise UserError(
            f"output_dir {out} belongs to another stage: {why}; training here would replace its weights. "
            f"Set output_dir to a folder of its own"
        )
    if recipe.training.resume_from_checkpoint == "auto":
        foreign = foreign_checkpoints(recipe, out)
        if foreign:
            raise UserError(
                f"output_dir {out} holds checkpoints of another run ({', '.join(p.name for p in foreign[:3])}: "
                "another recipe, or written before runs were stamped); resuming would continue that run. "
                f"Choose another output_dir, or start fresh with --overwrite (moves the old files aside)"
            )
    if resume is not None:
        return
    earlier = [p.name for p in _checkpoints(out)] + [
        n for n in ("adapter", "model", "stage.json") if (out / n).exists()
    ]
    if not earlier:
        return
    if not overwrite:
        raise UserError(
            f"output_dir {out} holds an earlier run ({', '.join(earlier[:4])}); a fresh run would mix with it. "
            "Resume it with training.resume_from_checkpoint=auto, choose another output_dir, or pass --overwrite "
            "(moves the old files aside, deletes nothing)"
        )
    if move:
        move_aside(out)


def move_aside(out: Path) -> Path:
    """Rename `out` to a dated sibling (the lock held by this run goes with it and is dropped there)."""
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside, n = aside.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
    out.rename(aside)
    out.mkdir()
    held = aside / LOCK_FILE
    if held.is_file():
        held.rename(out / LOCK_FILE)  # the lock stays with the folder this run writes
    log.warning("--overwrite: the earlier run in %s was moved to %s (nothing deleted)", out, aside)
    return aside


def check_resume_data(resume: str | None, identity: dict) -> None:
    """A checkpoint of this recipe trained on other data is not this run: refuse to resume from it."""
    if resume is None:
        return
    stamped = checkpoint_identity(Path(resume)) or {}
    if stamped.get("data") and identity.get("data") and stamped["data"] != identity["data"]:
        raise UserError(
            f"{resume} was trained on other data (fingerprint {stamped['data']}, now {identity['data']}: the "
            "sources or data settings changed); resuming would mix two datasets. Restore the data, or start fresh "
            "with --overwrite"
        )


# ---------------------------------------------------------------------------------------------
# Where this run starts: writable, resumed from which checkpoint, or already complete.


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_probe.{os.getpid()}"  # one per process: ranks share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output_dir {out} is not writable ({err.strerror})") from None


def resume_point(recipe: Recipe, out: Path) -> str | None:
    wanted = recipe.training.resume_from_checkpoint
    if wanted is None:
        return None
    if wanted != "auto":
        problem = checkpoint_problem(Path(wanted)) if Path(wanted).is_dir() else "not a folder"
        if problem:
            raise UserError(f"training.resume_from_checkpoint: {wanted} cannot be resumed from: {problem}")
        return wanted
    last = newest_complete_checkpoint(out, recipe_identity(recipe)) if out.is_dir() else None
    log.info("resume: %s", f"from {last}" if last else "no complete checkpoint in output_dir, starting fresh")
    return str(last) if last else None


def _same_run(saved: dict, recipe: Recipe) -> bool:
    """The saved stage.json recipe is this recipe, apart from how the run was started or stopped."""

    def comparable(d: dict) -> dict:
        training = {
            k: v
            for k, v in d.get("training", {}).items()
            if k not in ("resume_from_checkpoint", "stop_at_step", "gradient_accumulation_steps")
        }
        return {**d, "training": training}

    return comparable(saved) == comparable(recipe_to_dict(recipe))


def finished_stage(recipe: Recipe, out: Path) -> dict | None:
    """The stage record when `resume_from_checkpoint: auto` finds this stage already complete (stage.json of
    the same recipe, all steps done): resuming would train past the end or redo finished steps."""
    if recipe.training.resume_from_checkpoint != "auto" or not (out / "stage.json").is_file():
        return None
    record = json.loads((out / "stage.json").read_text(encoding="utf-8"))
    steps = record.get("metrics", {}).get("global_steps") or 0
    if not _same_run(record.get("recipe", {}), recipe) or 0 < recipe.training.max_steps > steps:
        return None
    message = (
        f"stage {recipe.stage} in {out} is already complete ({steps} steps, stage.json written); nothing to resume"
    )
    log.warning(message)
    if is_main_process():
        sys.stderr.write(message + "\n")
    return {**record, "status": "complete"}


# ---------------------------------------------------------------------------------------------
# One run at a time per folder.
# Written by hand: fcntl locks are not reliable on the network filesystems clusters share
# checkpoints on, and a lock must name its holder; an O_EXCL file with pid and host does both.


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(out: Path) -> dict | None:
    """The live run holding `out`, or None (a lock of a dead process on this host is stale)."""
    try:
        info = json.loads((out / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", 0))):
        return None
    return info


def refuse_if_locked(out: Path) -> None:
    info = holder(out)
    if info is not None and not (info.get("host") == socket.gethostname() and info.get("pid") == os.getpid()):
        raise UserError(
            f"output_dir {out} is in use by another run (pid {info.get('pid')} on {info.get('host')}, since "
            f"{info.get('started')}); wait for it, or choose another output_dir. If that run is gone (another "
            f"host), delete {out / LOCK_FILE}"
        )


def acquire(out: Path) -> Path:
    """Take the folder for this process (the main process of a launch); refuse when a live run holds it."""
    lock = out / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            refuse_if_locked(out)
            log.warning("%s: removing the stale lock of a run that is gone", lock)
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%FT%T%z")}, f)
        return lock
    raise UserError(f"could not take {lock}: another run took it at the same moment; try again")


def release(out: Path) -> None:
    lock = out / LOCK_FILE
    try:
        if json.loads(lock.read_text(encoding="utf-8")).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass
