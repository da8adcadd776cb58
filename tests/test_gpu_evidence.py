"""`make gpu-evidence` rehearsed on a CPU: the one command a lent GPU gets must not fail on a typo.

The rehearsal runs the same script with the tiny shape: every part in its own process group under its
budget, results written as they come, at most the 8 files the device returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from bench.gpu_evidence import BUDGETS, CARRIED, pins

pytestmark = pytest.mark.e2e


def test_carried_wheels_are_the_pinned_versions():
    versions = pins()
    assert all(name in versions for name in CARRIED), [n for n in CARRIED if n not in versions]
    constraints = (REPO / "constraints.txt").read_text()
    assert f"transformers=={versions['transformers']}" in constraints and versions["liger-kernel"] == "0.8.5"
    assert sum(BUDGETS.values()) <= 9 * 60  # one device command is at most 10 minutes


def test_rehearsal_runs_every_part_and_a_budget_stops_only_its_part(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.gpu_evidence",
            "run",
            "--rehearse",
            "--out",
            str(out),
            "--budget",
            "cap-24gb=0.5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {p["part"]: p["status"] for p in summary["parts"]}
    assert status == {
        "env": "ok",
        "gpu-tier": "ok",
        "bench-7b": "ok",
        "bench-32b": "ok",
        "cap-24gb": "stopped at its 0 s budget",
    }, status
    assert summary["gpu_tests_collected"] >= 6  # the GPU tier collects (it cannot run here)
    assert summary["environment"]["versions"]["trl"] == pins()["trl"]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir())  # what the device gives back
    data = json.loads(next(p for p in out.glob("*.json") if p.name != "summary.json").read_text())
    rows = data["sections"]["gpu_train_tiny-as-7b"]["rows"]
    assert {r["path"] for r in rows} == {"baseline", "ours"} and all(r["tokens_per_s"] > 0 for r in rows)
    assert data["sections"]["gpu_train_tiny-as-32b"]["rows"][0]["path"] == "ours"
    log = (out / "parts.log").read_text()
    assert all(f"===== {part}:" in log for part in ("gpu-tier", "bench-7b", "bench-32b", "cap-24gb"))
