"""Time from a preemption signal to a saved checkpoint, on CPU, under the supervised launch.

    python -m bench.preemption [--trials 3] [--accumulation 16]

A 2-process DDP run of the tiny recipe (`python -m train supervise -- accelerate launch ...`, as
`make train-*` starts it) with long gradient accumulation is sent SIGTERM at a random moment inside
an optimizer step; the workers report how long after the signal their checkpoint was saved. The
optimizer step's duration (from metrics.jsonl) is what a check at step boundaries only would have
had to wait, on average half of it, before even starting to save. Writes a section of
bench/results/<date>-<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import free_port, write_results
from train.core.paths import REPO_ROOT

RECIPE = "recipes/tiny/stage1_medical.yaml"


def _step_times(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if "loss" in r]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def trial(root: Path, accumulation: int, rng: random.Random) -> dict:
    out = root / f"run-{rng.randrange(10**6)}"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [
        sys.executable, "-m", "train", "supervise", "--",
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/ddp.yaml",
        "--num_processes", "2", "--main_process_port", str(free_port()), "-m", "train", "sft", RECIPE,
        "training.max_steps=50", "training.logging_steps=1", "training.save_steps=1000",
        "training.per_device_train_batch_size=1", f"training.gradient_accumulation_steps={accumulation}",
        "data.max_length=256", f"data.processed_dir={root / 'data'}", f"output_dir={out}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    while not ((out / "metrics.jsonl").is_file() and len(_step_times(out)) >= 2):
        time.sleep(0.05)
    steps = _step_times(out)
    time.sleep(rng.uniform(0, statistics.median(steps)))  # somewhere inside an optimizer step
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    ended = time.monotonic() - sent
    saved = re.search(r"checkpoint saved in \S+ ([\d.]+)s after the signal", stderr)
    if proc.returncode != 0 or saved is None:
        raise SystemExit(f"trial failed (exit {proc.returncode}):\n{stderr[-2000:]}")
    return {
        "accumulation": accumulation,
        "optimizer_step_s": round(statistics.median(steps), 3),
        "signal_to_checkpoint_s": float(saved.group(1)),
        "signal_to_exit_s": round(ended, 2),
        "exit_code": proc.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--accumulation", type=int, default=16)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bench-preempt-") as tmp:
        root = Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "data_prep", RECIPE, "data.max_length=256", f"data.processed_dir={root / 'data'}"],
            cwd=REPO_ROOT, check=True, capture_output=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
        )  # fmt: skip
        rows = [trial(root, args.accumulation, rng) for _ in range(args.trials)]
    path = write_results(
        "preemption: signal to checkpoint (CPU, 2-process DDP, supervised launch)",
        rows,
        "SIGTERM sent to `python -m train supervise` at a random moment inside an optimizer step of the tiny "
        f"recipe (micro-batch 1, accumulation {args.accumulation}). signal_to_checkpoint_s: reported by the "
        "workers once the checkpoint is listed and renamed into place; optimizer_step_s: median step time, "
        "which a check at step boundaries only would wait up to (half on average) before starting to save.",
    )
    sys.stdout.write(json.dumps(rows, indent=2) + f"\nwritten to {path}\n")


if __name__ == "__main__":
    main()
