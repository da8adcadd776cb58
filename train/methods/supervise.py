"""Stand in front of `accelerate launch` so that a preemption signal ends in a checkpoint and exit 0.

    python -m train supervise -- accelerate launch --config_file accelerate_configs/ddp.yaml -m train sft RECIPE

`make train-*` and accelerate_configs/slurm.sbatch start every launch this way. Why: the launcher's
agent (torchrun's) answers SIGTERM by sending SIGTERM to the workers, SIGKILLing them 30 s later and
exiting non-zero, and it dies at once on SIGUSR1 (SLURM's usual early-warning signal), leaving its
workers behind. Here:
- a signal to this process (SIGTERM, SIGUSR1, Ctrl-C) becomes SIGUSR1 for every process of the launch; the agent
  ignores it (an ignored signal stays ignored across exec), the workers save a checkpoint at the next
  micro-batch boundary and exit 0, and so do the agent and this process; a second Ctrl-C kills the launch;
- a SIGTERM sent to the launcher itself (or to every process of a job, as SLURM does at its time limit)
  still goes to the workers through the agent, which now waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT (300 s
  here, not 30) before SIGKILL; the agent then exits non-zero although the workers saved: rank 0 leaves
  a marker saying so, and this process exits 0.

Written by hand: accelerate and torchrun have no graceful-preemption mode to switch on, and SLURM's
`--signal` needs a process that turns the warning into the workers' signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from train.core.errors import UserError
from train.core.log import get_logger

log = get_logger("supervise")

MARKER_ENV = "TRAIN_PREEMPTION_MARKER"  # rank 0 writes {"step", "output_dir"} there after a preemption save
FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def write_marker(step: int, output_dir: str) -> None:
    """Called by rank 0 of a stage once its preemption checkpoint is saved (no-op when not supervised)."""
    path = os.environ.get(MARKER_ENV)
    if path:
        Path(path).write_text(json.dumps({"step": step, "output_dir": output_dir}), encoding="utf-8")


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _signal_tree(pid: int, sig: signal.Signals) -> None:
    """The launcher and every process under it (torchrun starts each worker in a session of its own, so a
    process-group signal would not reach them)."""
    import psutil

    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def supervise(command: list[str]) -> int:
    """Run `command` (a launcher) in its own process group; forward preemption signals to the workers."""
    if not command:
        raise UserError("supervise: give the launch command after --, e.g. -- accelerate launch ... -m train sft R")
    marker = Path(tempfile.mkstemp(prefix="preemption-", suffix=".json")[1])
    marker.unlink()
    env = dict(os.environ, **{MARKER_ENV: str(marker)})
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "300")
    try:
        child = subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=_ignore_usr1)  # noqa: PLW1509
    except FileNotFoundError:
        raise UserError(
            f"supervise: {command[0]} not found; is the virtual environment installed (make install)?"
        ) from None
    interrupts = 0

    def forward(signum, frame):
        nonlocal interrupts
        interrupts += signum == signal.SIGINT
        if interrupts >= 2:
            log.warning("second Ctrl-C: killing the launch")
            _signal_tree(child.pid, signal.SIGKILL)
            return
        log.warning("received %s: asking the workers to checkpoint and stop", signal.Signals(signum).name)
        _signal_tree(child.pid, signal.SIGUSR1)  # the agent ignores it; every worker saves and exits 0

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0 and marker.is_file():
        saved = json.loads(marker.read_text(encoding="utf-8"))
        log.warning(
            "the launcher was signalled and exited %s, but the workers saved checkpoint-%s in %s: exit 0",
            code,
            saved["step"],
            saved["output_dir"],
        )
        code = 0
    marker.unlink(missing_ok=True)
    return code


def main(argv: list[str]) -> None:
    code = supervise(argv[1:] if argv[:1] == ["--"] else argv)
    sys.exit(code if code >= 0 else 128 - code)
