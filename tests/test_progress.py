"""Long work shows progress: data_prep one line per phase and the streaming merge one line per shard when
the output is a log (not a terminal); rows, seconds and rows/s for data_prep."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.e2e


def test_data_prep_logs_each_phase_with_rows_and_rate(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "recipes/tiny/stage1_medical.yaml", f"data.processed_dir={tmp_path}"],
        cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    phases = dict(re.findall(r"data_prep (\w+)\s+(\d+) rows\s+[\d.]+ s\s+\d+ rows/s", proc.stderr))
    assert {"read", "tokenize", "dedup", "spill", "write"} <= phases.keys(), proc.stderr[-2000:]
    assert int(phases["read"]) > 100 and int(phases["write"]) > 100
    assert "it/s" not in proc.stderr and "rows/s]" not in proc.stderr  # no bar drawn into a log
