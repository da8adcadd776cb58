"""accelerate_configs/slurm.sbatch itself, under a real single-node SLURM (make test-slurm).

A 2-process CPU job of the tiny recipe is preempted by hand (`scancel --signal=USR1 --batch`) and by
its time limit (the script's `--signal=B:USR1@...` early warning); each time the job ends COMPLETED
with exit 0 and a complete checkpoint, and the resume command the job prints, submitted as printed,
finishes the stage with the losses and adapter of an uninterrupted job.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import slurm_cluster
import torch
from conftest import REPO
from safetensors.torch import load_file

from train.methods.reliability import checkpoint_problem

pytestmark = pytest.mark.slurm

RECIPE = "recipes/tiny/stage1_medical.yaml"
COMMON = [
    "training.logging_steps=1",
    "training.save_steps=1000",
    "training.warmup_steps=0",
    "training.per_device_train_batch_size=1",
    "training.gradient_accumulation_steps=4",
    "data.max_length=256",
]
# This machine has no GPUs and 2 CPUs: the script's GPU/CPU requests are overridden on the command line.
LOCAL = ["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if slurm_cluster.missing():
        pytest.fail(f"SLURM is not installed ({', '.join(slurm_cluster.missing())}): run `make test-slurm`")
    root = tmp_path_factory.mktemp("slurm")
    env = slurm_cluster.start(root / "cluster")
    env.update(GPUS_PER_NODE="2", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MASTER_PORT="29651")
    yield env, root
    slurm_cluster.stop(root / "cluster")


def submit(env: dict, root: Path, *args: str, options: tuple[str, ...] = ()) -> str:
    command = ["sbatch", "--parsable", *LOCAL, *options, f"--output={root}/slurm-%j.log", f"--chdir={REPO}"]
    proc = subprocess.run([*command, *args], env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip().split(";")[0]


def stage_job(env: dict, root: Path, *overrides: str, options: tuple[str, ...] = ()) -> str:
    """sbatch accelerate_configs/slurm.sbatch RECIPE ddp <COMMON> <overrides>."""
    return submit(env, root, "accelerate_configs/slurm.sbatch", RECIPE, "ddp", *COMMON, *overrides, options=options)


def job_state(env: dict, job: str) -> dict:
    text = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(JobState|ExitCode|RunTime)=(\S+)", text))


def wait_for(env: dict, job: str, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(env, job)
        if state.get("JobState") not in (None, "PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    raise AssertionError(f"job {job} still running after {timeout}s")


def finished_cleanly(env: dict, root: Path, job: str) -> tuple[dict, str]:
    """(state, log) of a job that ended COMPLETED with exit code 0."""
    state = wait_for(env, job)
    log = (root / f"slurm-{job}.log").read_text(errors="replace")  # tqdm bars cut mid-character
    assert (state["JobState"], state["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    return state, log


def first_loss_logged(out: Path, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = out / "metrics.jsonl"
        if log.is_file() and '"loss"' in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"no training step in {out} after {timeout}s")


def losses(out: Path) -> dict[int, float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def adapter_diff(a: Path, b: Path) -> float:
    x, y = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (a, b))
    assert x.keys() == y.keys()
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_scancel_early_warning_saves_exits_0_and_the_printed_resume_finishes_the_stage(cluster):
    env, root = cluster
    data = f"data.processed_dir={root}/data"
    full = root / "full"
    reference = stage_job(env, root, "training.max_steps=12", data, f"output_dir={full}")
    finished_cleanly(env, root, reference)

    out = root / "preempted"
    job = stage_job(env, root, "training.max_steps=12", data, f"output_dir={out}")
    first_loss_logged(out)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
    _, log = finished_cleanly(env, root, job)
    assert "USR1 received" in log and "received SIGUSR1" in log
    step = int(re.search(r"preempted at step (\d+)", log).group(1))
    assert step < 12 and checkpoint_problem(out / f"checkpoint-{step}") is None
    assert not (out / "adapter").exists()

    printed = shlex.split(log.split("checkpoint saved; resume with: ")[1].splitlines()[0])
    assert printed[0] == "sbatch" and printed[-1] == "training.resume_from_checkpoint=auto"
    resumed = submit(env, root, *printed[1:])  # as printed (plus this machine's CPU/GPU overrides)
    finished_cleanly(env, root, resumed)
    assert json.loads((out / "stage.json").read_text())["metrics"]["resumed_from"].endswith(f"checkpoint-{step}")
    a, b = losses(full), losses(out)
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-4
    assert adapter_diff(full, out) < 1e-4


def test_the_time_limit_warning_ends_the_job_cleanly_before_slurm_kills_it(cluster):
    env, root = cluster
    out = root / "time-limited"
    # A 2-minute limit, warned 90 s before: the job must stop itself ~30 s in, long before its 400 steps end.
    job = stage_job(
        env,
        root,
        "training.max_steps=400",
        f"data.processed_dir={root}/data",
        f"output_dir={out}",
        options=("--time=2", "--signal=B:USR1@90"),
    )
    state, log = finished_cleanly(env, root, job)
    minutes, seconds = map(int, state["RunTime"].split(":")[-2:])
    assert minutes * 60 + seconds < 110  # ended by its own checkpoint-and-exit, not by SLURM's kill at 120 s
    step = int(re.search(r"preempted at step (\d+)", log).group(1))
    assert 0 < step < 400 and checkpoint_problem(out / f"checkpoint-{step}") is None
    assert torch.tensor(list(losses(out).values())).isfinite().all()
