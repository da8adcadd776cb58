"""GPU evidence in one command, for a short lent GPU window (one GPU, <= 10 minutes a command).

    make gpu-wheels                  # here: wheels the GPU image lacks -> .cache/gpu-wheels (Python 3.12, x86_64)
    make gpu-evidence OUT=DIR        # on the GPU machine: install them, then every part under its own budget
    make gpu-evidence-rehearsal      # here, on a CPU: the same script end to end on the tiny shape

The GPU machine has no package registry and no .venv: its image's python3 holds torch, transformers, peft
and accelerate, but not trl, datasets, bitsandbytes or liger-kernel. `make gpu-wheels` downloads exactly
the versions this project pins (constraints.txt, pyproject's extras) with --no-deps; the run installs them
with --no-index. Parts, in order, each in its own process group killed at its budget (seconds):

    env        install the carried wheels (pip --target, first on PYTHONPATH); versions, GPU and driver
    gpu-tier   pytest -m gpu (tests/test_gpu.py), with a junit report gpu_tier.xml
    bench-7b   QLoRA on the Qwen2.5-7B shape: baseline vs ours (sdpa_packed with and without Liger, flex
               attention), alternated rounds
    bench-32b  one round of ours (and the baseline if time remains) on the 32B shape
    cap-24gb   the longest trainable 32B sequence with the allocator capped at 23 GiB (a 4090 simulation)

Every part writes into OUT as it goes (the benchmark rewrites its results file after each measured
variant), so a run cut off by its budget still returns what it measured. OUT holds at most 5 files (the
device returns 8): summary.json (environment, each part's status and duration), parts.log (every part's
output), gpu_tier.xml, and the benchmark's <date>-<gpu>.json and .md (bench/common.py's format).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".cache" / "gpu-wheels"
# What the GPU image lacks (or holds at another version than we pin), and the small packages they need
# that it also lacks. Versions come from constraints.txt / pyproject.toml, never from here.
CARRIED = [
    "trl",
    "datasets",
    "dill",
    "multiprocess",
    "bitsandbytes",
    "liger-kernel",
    "transformers",
    "peft",
    "openpyxl",
    "et-xmlfile",
]
# manylinux tags the GPU machine's glibc accepts (bitsandbytes ships manylinux_2_24, most others 2_17 / 2_28)
MANYLINUX = ["2_17", "2_24", "2_27", "2_28", "2_31", "2_34", "2_35"]
WHEEL_BUDGET_MIB = 60  # the device tool carries 64 MiB in all, the working tree included
PARTS_LOG = "parts.log"
SITE = Path("/tmp/gpu-evidence-site")  # the carried wheels are installed here, ahead of the image's packages
BUDGETS = {"env": 45, "gpu-tier": 90, "bench-7b": 200, "bench-32b": 110, "cap-24gb": 95}  # 540 s: under 9 minutes


def pins() -> dict[str, str]:
    """name -> pinned version, from constraints.txt and pyproject's dependency and extra pins."""
    found = {}
    texts = [
        (REPO / "constraints.txt").read_text(encoding="utf-8"),
        (REPO / "pyproject.toml").read_text(encoding="utf-8"),
    ]
    for text in texts:
        for name, version in re.findall(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([0-9][^\s\"',;]*)", text):
            found.setdefault(name.lower().replace("_", "-"), version)
    return found


def download_wheels(dest: Path = WHEELS) -> dict:
    """The carried wheels for the GPU machine's Python 3.12 on x86_64, checked against the carry budget."""
    versions = pins()
    missing = [n for n in CARRIED if n not in versions]
    if missing:
        raise SystemExit(f"no pinned version for {missing} in constraints.txt or pyproject.toml")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--abi",
        "cp312",
        "--abi",
        "abi3",
        "--abi",
        "none",
        *[arg for tag in MANYLINUX for arg in ("--platform", f"manylinux_{tag}_x86_64")],
        "--platform",
        "manylinux2014_x86_64",
        "--platform",
        "any",
        "-d",
        str(dest),
        *[f"{n}=={versions[n]}" for n in CARRIED],
    ]
    subprocess.run(cmd, check=True)
    files = {p.name: p.stat().st_size for p in sorted(dest.glob("*.whl"))}
    total = sum(files.values()) / 2**20
    manifest = {"python": "3.12", "platform": "x86_64", "wheels": files, "mib": round(total, 1)}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if total > WHEEL_BUDGET_MIB:
        raise SystemExit(f"the carried wheels take {total:.1f} MiB, over the {WHEEL_BUDGET_MIB} MiB budget: {files}")
    return manifest


def run_part(name: str, cmd: list[str], out: Path, budget: float, env: dict | None = None) -> dict:
    """Run one part in its own process group; kill the whole group at its budget. Its output is appended to
    OUT/parts.log (the device returns at most 8 files, so the parts share one log)."""
    import tempfile

    started = time.monotonic()
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=budget)
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"stopped at its {budget:.0f} s budget"
        log.seek(0)
        text = log.read()
    seconds = round(time.monotonic() - started, 1)
    with open(out / PARTS_LOG, "a", encoding="utf-8") as f:
        f.write(f"\n===== {name}: {status} after {seconds} s\n$ {' '.join(cmd)}\n{text}")
    sys.stderr.write(f"[gpu-evidence] {name}: {status} after {seconds} s\n")
    return {"part": name, "status": status, "seconds": seconds, "budget_s": budget, "output_tail": text[-1500:]}


def environment(out: Path, rehearse: bool, budget: float) -> dict:
    """Install the carried wheels (not when rehearsing) and record what the machine has; `problems` lists
    what went wrong (the part's status says so)."""
    result: dict = {"python": platform.python_version(), "rehearsal": rehearse, "problems": []}
    if not rehearse:
        wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
        if not wheels:
            result["install"] = f"no wheels in {WHEELS}: run `make gpu-wheels` here and carry .cache/gpu-wheels"
            result["problems"].append("install")
        else:
            cmd = [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--no-cache-dir",
                "--upgrade",
                "--target",
                str(SITE),
                *wheels,
            ]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
                result["install"] = "ok" if proc.returncode == 0 else proc.stderr[-2000:]
            except subprocess.TimeoutExpired:
                result["install"] = f"pip install took longer than {budget:.0f} s"
            if result["install"] != "ok":
                result["problems"].append("install")
            # every later process (pytest, the benchmark and its children) sees the carried versions first
            os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SITE), os.environ.get("PYTHONPATH")]))
    probe = (
        "import json, importlib.metadata as md, torch; names = ['torch', 'transformers', 'peft', 'trl', "
        "'accelerate', 'datasets', 'bitsandbytes', 'liger-kernel', 'pyarrow', 'huggingface-hub', 'flash-attn']\n"
        "def v(n):\n    try: return md.version(n)\n    except md.PackageNotFoundError: return None\n"
        "print(json.dumps({'versions': {n: v(n) for n in names}, 'cuda': torch.cuda.is_available(), "
        "'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', "
        "'torch_cuda': torch.version.cuda}))"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=budget)
        result.update(json.loads(proc.stdout) if proc.returncode == 0 else {"probe_error": proc.stderr[-2000:]})
    except subprocess.TimeoutExpired:
        result["probe_error"] = f"no answer within {budget:.0f} s"
    if "probe_error" in result:
        result["problems"].append("probe")
    smi = shutil.which("nvidia-smi")
    if smi:
        result["nvidia_smi"] = subprocess.run(
            [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv"], capture_output=True, text=True
        ).stdout.strip()
    return result


def plan(out: Path, rehearse: bool) -> list[tuple[str, list[str], dict]]:
    """(part, command, extra environment) for every part after `env`."""
    py = sys.executable
    bench = [py, "-m", "bench.gpu_bench", "--results-dir", str(out)]
    if rehearse:  # the tiny shape on a CPU: the same commands, seconds instead of minutes, no figures
        small = ["--allow-cpu", "--tokens", "256", "--steps", "3", "--warmup", "1", "--timeout", "120"]
        return [
            ("gpu-tier", [py, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "tests/test_gpu.py"], {}),
            (
                "bench-7b",
                [
                    *bench,
                    *small,
                    "--shapes",
                    "tiny",
                    "--distributions",
                    "medical_reasoning",
                    "--rounds",
                    "2",
                    "--variants",
                    "baseline,ours",
                    "--skip-cap",
                    "--label",
                    "tiny-as-7b",
                ],
                {},
            ),
            (
                "bench-32b",
                [
                    *bench,
                    *small,
                    "--shapes",
                    "tiny",
                    "--distributions",
                    "medical_reasoning",
                    "--rounds",
                    "1",
                    "--variants",
                    "ours",
                    "--skip-cap",
                    "--label",
                    "tiny-as-32b",
                ],
                {},
            ),
            (
                "cap-24gb",
                [*bench, *small, "--shapes", "tiny", "--only-cap", "--variants", "ours", "--cap-lengths", "64,128"],
                {},
            ),
        ]
    return [
        (
            "gpu-tier",
            [
                py,
                "-m",
                "pytest",
                "-m",
                "gpu",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/test_gpu.py",
                f"--junitxml={out / 'gpu_tier.xml'}",
            ],
            {},
        ),
        (
            "bench-7b",
            [
                *bench,
                "--shapes",
                "qwen2.5-7b",
                "--distributions",
                "medical_reasoning",
                "--rounds",
                "2",
                "--variants",
                "baseline,ours+liger,ours,ours-flex+liger",  # most telling first: a budget cuts the end
                "--skip-cap",
                "--timeout",
                "150",
            ],
            {},
        ),
        (
            "bench-32b",
            [
                *bench,
                "--shapes",
                "qwen2.5-32b",
                "--distributions",
                "medical_reasoning",
                "--rounds",
                "1",
                "--variants",
                "ours+liger,baseline",
                "--skip-cap",
                "--timeout",
                "100",
            ],
            {},
        ),
        (
            "cap-24gb",
            [
                *bench,
                "--shapes",
                "qwen2.5-32b",
                "--only-cap",
                "--variants",
                "ours+liger,baseline",
                "--cap-lengths",
                "2048,4096,8192,12288,16384,24576,32768",
                "--timeout",
                "90",
            ],
            {},
        ),
    ]


def run(out: Path, rehearse: bool, budgets: dict[str, float]) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTS_LOG).unlink(missing_ok=True)
    started = time.monotonic()
    summary: dict = {"rehearsal": rehearse, "budgets_s": budgets, "parts": []}
    env_started = time.monotonic()
    summary["environment"] = env = environment(out, rehearse, budgets["env"])
    status = "ok" if not env["problems"] else f"problems: {', '.join(env['problems'])} (see environment)"
    summary["parts"].append({"part": "env", "status": status, "seconds": round(time.monotonic() - env_started, 1)})
    if not rehearse and not summary["environment"].get("cuda"):
        summary["parts"].append({"part": "all", "status": "no CUDA GPU visible: nothing measured"})
    else:
        for name, cmd, env in plan(out, rehearse):
            summary["parts"].append(run_part(name, cmd, out, budgets[name], {"PYTHONUNBUFFERED": "1", **env}))
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if rehearse:  # the CPU's stand-in for the GPU tier lists the tests instead of running them
        tier = (out / PARTS_LOG).read_text(encoding="utf-8").split("===== gpu-tier")[1].split("\n===== ")[0]
        summary["gpu_tests_collected"] = len(re.findall(r"::test_", tier))
    summary["seconds"] = round(time.monotonic() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("wheels", help="download the carried wheels into .cache/gpu-wheels (here, with a registry)")
    r = sub.add_parser("run", help="install the wheels and run every part (on the GPU machine)")
    r.add_argument("--out", default=os.environ.get("OUT") or "bench/results/gpu-evidence")
    r.add_argument("--rehearse", action="store_true", help="on a CPU: tiny shape, no install, tests collected only")
    r.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", help="override a part's budget")
    args = parser.parse_args()
    if args.command == "wheels":
        manifest = download_wheels()
        sys.stdout.write(f"{len(manifest['wheels'])} wheels, {manifest['mib']} MiB in {WHEELS}\n")
        return
    budgets = dict(BUDGETS)
    for item in args.budget:
        part, _, seconds = item.partition("=")
        if part not in budgets:
            raise SystemExit(f"--budget {item}: no part '{part}' (parts: {', '.join(budgets)})")
        budgets[part] = float(seconds)
    summary = run(Path(args.out), args.rehearse, budgets)
    sys.stdout.write(json.dumps({p["part"]: p["status"] for p in summary["parts"]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
