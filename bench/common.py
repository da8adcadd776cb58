"""Shared helpers of the benchmarks: machine name, results file, markdown table."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from train.core.io import atomic_write_text, write_json

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).replace(" ", "-")
    import os

    return f"cpu{os.cpu_count()}-{platform.machine()}"


def _status_mb(pid: int | str, field: str) -> float | None:
    """A memory line of /proc/<pid>/status (VmHWM, VmRSS) in MB, or None where there is no /proc."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory since its exec (VmHWM). getrusage's ru_maxrss also counts the
    parent's size from before the fork, so a benchmark parent holding its input would inflate each child."""
    peak = _status_mb("self", "VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb(pid: int) -> float:
    """Another process's resident memory now (VmRSS), e.g. a server the benchmark started."""
    rss = _status_mb(pid, "VmRSS")
    return float("nan") if rss is None else rss


def free_port() -> int:
    """A loopback port nobody listens on (for a server or a launch's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_results(section: str, rows: list[dict], notes: str, results_dir: Path | None = None) -> Path:
    """Merge one section into <results_dir>/<date>-<machine>.json (default bench/results/) and rewrite the
    markdown next to it."""
    results_dir = Path(results_dir or RESULTS_DIR)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y-%m-%d')}-{machine()}"
    path = results_dir / f"{stem}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet (or cut short by a killed run): start the file again
        data = {"machine": machine(), "sections": {}}
    data["torch"] = torch.__version__
    data["sections"][section] = {"rows": rows, "notes": notes, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(path, data)  # atomic: a benchmark killed at its time budget never leaves half a file
    atomic_write_text(results_dir / f"{stem}.md", to_markdown(data))
    return path


def to_markdown(data: dict) -> str:
    out = [f"# Benchmarks on {data['machine']} (torch {data['torch']})", ""]
    for name, section in data["sections"].items():
        rows = section["rows"]
        out += [f"## {name}", "", section["notes"], ""]
        if rows:
            keys = list(rows[0])
            out.append("| " + " | ".join(keys) + " |")
            out.append("|" + "---|" * len(keys))
            out += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
        out.append("")
    return "\n".join(out)
