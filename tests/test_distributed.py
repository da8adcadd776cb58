"""DDP, ZeRO-2, ZeRO-3 and FSDP2 on CPU: two processes at micro-batch b equal one process at 2b.

Real `accelerate launch` subprocesses with the shipped configs (gloo). FSDP2 needs the test-only
shim in tests/fsdp_cpu_shim (accelerate falls back to DDP on CPU otherwise); each run records the
sharding the trainer actually set up, and the test checks it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, _free_port, run_train
from safetensors.torch import load_file

pytestmark = pytest.mark.dist

RECIPE = "recipes/tiny/stage1_medical.yaml"
COMMON = [
    "training.max_steps=4",
    "training.logging_steps=1",
    "training.save_steps=2",
    "training.warmup_steps=0",
    "training.learning_rate=2e-4",
    "data.max_length=256",
    "training.save_total_limit=null",
]
EXPECTED_SHARDING = {"ddp": "ddp", "zero2": "zero2", "zero3": "zero3", "fsdp": "fsdp2"}


def run(out: Path, data: Path, strategy: str | None, batch: int, extra: list[str] = (), timeout: int = 900) -> dict:
    args = [
        RECIPE,
        *COMMON,
        f"data.processed_dir={data}",
        f"output_dir={out}",
        f"training.per_device_train_batch_size={batch}",
        *extra,
    ]
    run_train(["sft", *args], strategy, timeout=timeout)
    return json.loads((out / "stage.json").read_text())


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def max_adapter_diff(a: Path, b: Path) -> float:
    x, y = (
        load_file(a / "adapter" / "adapter_model.safetensors"),
        load_file(b / "adapter" / "adapter_model.safetensors"),
    )
    assert x.keys() == y.keys() and len(x) == 56  # 4 layers x 7 modules x (A, B): nothing dropped or empty
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = root / "data"
    subprocess.run(
        [sys.executable, "-m", "data_prep", RECIPE, "data.max_length=256", f"data.processed_dir={data}"],
        cwd=REPO,
        check=True,
        capture_output=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    run(root / "single", data, None, batch=2)
    return root, data


@pytest.mark.parametrize("strategy", ["ddp", "zero2", "zero3", "fsdp"])
def test_two_processes_equal_one_and_resume(reference, strategy):
    root, data = reference
    out = root / strategy
    record = run(out, data, strategy, batch=1)
    metrics = record["metrics"]
    assert metrics["world_size"] == 2 and metrics["sharding"] == EXPECTED_SHARDING[strategy]
    single, multi = losses(root / "single"), losses(out)
    assert len(single) == len(multi) == 4
    assert max(abs(a - b) for a, b in zip(single, multi, strict=True)) < 1e-4, (single, multi)
    assert max_adapter_diff(root / "single", out) < 1e-4

    # Checkpoints hold the adapter and its optimizer state, never a copy of the frozen base.
    base_bytes = sum(p.stat().st_size for p in (REPO / ".cache").glob("tiny-qwen2-*/model.safetensors")) / max(
        1, len(list((REPO / ".cache").glob("tiny-qwen2-*/model.safetensors")))
    )
    checkpoint_bytes = sum(p.stat().st_size for p in (out / "checkpoint-2").rglob("*") if p.is_file())
    assert checkpoint_bytes < 0.5 * base_bytes, (checkpoint_bytes, base_bytes)

    # Resume from checkpoint-2 in a new launch: same losses for steps 3-4 and the same final adapter.
    resumed = root / f"{strategy}-resumed"
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    record = run(resumed, data, strategy, 1, ["training.resume_from_checkpoint=auto"])
    assert record["metrics"]["resumed_from"].endswith("checkpoint-2")
    assert max(abs(a - b) for a, b in zip(losses(resumed), multi[2:], strict=True)) < 1e-4
    assert max_adapter_diff(out, resumed) < 1e-4


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_a_child_stage_under_zero3_merges_its_parent_on_one_process(reference, quantization):
    """The parent chain is merged once, unsharded, on rank 0 (ZeRO-3 set aside): before, a quantized child
    hung (rank 0's from_pretrained waited for a ZeRO-3 collective the others never joined) and a 16-bit
    child merged its parent into sharded, empty weights."""
    root, data = reference
    extra = [f"parent={root / 'single'}", "training.max_steps=2"]
    if quantization == "nf4":
        extra += ["model.quantization=nf4", "model.quant_storage=float32"]
    one = run(root / f"child-one-{quantization}", data, None, 2, extra)
    sharded = run(root / f"child-zero3-{quantization}", data, "zero3", 1, extra, timeout=300)
    assert sharded["metrics"]["sharding"] == "zero3" and sharded["parent"] == one["parent"]
    a, b = losses(root / f"child-one-{quantization}"), losses(root / f"child-zero3-{quantization}")
    assert abs(a[0] - b[0]) < 1e-4, (a, b)  # step 1 starts from the same merged parent
    tolerance = 1e-4 if quantization == "none" else 1e-3  # 4-bit gradients round differently once sharded
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < tolerance, (a, b)


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_qlora_trains_under_sharding(reference, strategy):
    root, data = reference
    out = root / f"{strategy}-qlora"
    qlora = ["model.quantization=nf4", "model.quant_storage=float32", "training.learning_rate=2e-3"]
    metrics = run(out, data, strategy, 1, qlora)["metrics"]
    assert metrics["sharding"] == EXPECTED_SHARDING[strategy]
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.5
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 56 and all(float(t.float().abs().max()) > 0 for k, t in adapter.items() if "lora_B" in k)


def test_fsdp_without_gpu_or_shim_is_refused(reference, tmp_path):
    """accelerate silently turns FSDP into DDP on CPU: the trainer must say so, not train."""
    root, data = reference
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "accelerate_configs/fsdp.yaml",
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "train",
        "sft",
        RECIPE,
        *COMMON,
        f"data.processed_dir={data}",
        f"output_dir={tmp_path / 'out'}",
        "training.per_device_train_batch_size=1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert proc.stderr.count("asked for fsdp but accelerate set up ddp") == 1  # rank 0 says it, once


def _worker_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the training processes below an `accelerate launch`."""
    found = {}
    pending = [launcher_pid]
    while pending:
        parent = pending.pop()
        children = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
        for pid in map(int, children):
            pending.append(pid)
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank and b"train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found[int(rank[0].split(b"=")[1])] = pid
    return found


def test_preemption_of_one_rank_stops_all_ranks_at_the_same_step(reference):
    import signal
    import time

    root, data = reference
    out = root / "ddp-preempted"
    args = [
        RECIPE,
        *COMMON,
        "training.max_steps=12",
        "training.save_steps=100",
        f"data.processed_dir={data}",
        f"output_dir={out}",
        "training.per_device_train_batch_size=1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            "accelerate_configs/ddp.yaml",
            "--num_processes",
            "2",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "train",
            "sft",
            *args,
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and losses(out)):
        time.sleep(0.05)
    workers = _worker_pids(proc.pid)
    assert set(workers) == {0, 1}
    os.kill(workers[1], signal.SIGTERM)  # only rank 1 is told
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    step = int(stderr.split("preempted at step ")[1].split(";")[0])
    assert step < 12 and (out / f"checkpoint-{step}" / "checkpoint.json").is_file()
    assert not (out / "adapter").exists()  # rank 0 stopped too: nobody finished the stage
    # The printed resume command repeats the launcher, its options and every override: run it as printed.
    printed = shlex.split(stderr.split("resume with: ")[1].splitlines()[0])
    assert printed[:6] == [
        "accelerate",
        "launch",
        "--config_file",
        "accelerate_configs/ddp.yaml",
        "--num_processes",
        "2",
    ]
    assert printed[-1] == "training.resume_from_checkpoint=auto" and f"output_dir={out}" in printed
    port = printed.index("--main_process_port") + 1
    printed[port] = str(_free_port())  # the old port may still be in TIME_WAIT
    resumed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *printed[2:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = root / "ddp-12"
    run(full, data, "ddp", 1, ["training.max_steps=12", "training.save_steps=100"])
    assert max_adapter_diff(full, out) < 1e-4
    assert max(abs(a - b) for a, b in zip(losses(full), losses(out), strict=True)) < 1e-4


@pytest.mark.parametrize("target", ["launcher", "supervisor"])
def test_sigterm_to_the_launch_saves_mid_accumulation_exits_0_and_resumes_exactly(reference, target):
    """`make train-*` runs `python -m train supervise -- accelerate launch ...`: a SIGTERM to the launcher
    (torchrun's agent) or to the supervisor above it ends in a checkpoint and exit 0, not a kill 30 s later."""
    import signal
    import time

    root, data = reference
    accumulate = ["training.per_device_train_batch_size=1", "training.gradient_accumulation_steps=4"]
    settings = [*COMMON, "training.max_steps=6", "training.save_steps=100", *accumulate, f"data.processed_dir={data}"]
    out = root / f"sigterm-{target}"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launch = ["accelerate.commands.launch", "--config_file", "accelerate_configs/ddp.yaml", "--num_processes", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "train", "supervise", "--", sys.executable, "-m", *launch,
         "--main_process_port", str(_free_port()), "-m", "train", "sft", RECIPE, *settings, f"output_dir={out}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and losses(out)):
        time.sleep(0.05)
    launcher = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0])
    os.kill(launcher if target == "launcher" else proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    step = int(stderr.split("preempted at step ")[1].split(";")[0])
    assert step < 6 and (out / f"checkpoint-{step}" / "checkpoint.json").is_file()
    assert float(stderr.split("s after the signal")[0].rsplit(" ", 1)[1]) < 30  # well inside any grace period
    resumed = subprocess.run(
        [sys.executable, "-m", *launch, "--main_process_port", str(_free_port()), "-m", "train", "sft", RECIPE,
         *settings, f"output_dir={out}", "training.resume_from_checkpoint=auto"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full = root / "ddp-accumulate-6"
    if not (full / "stage.json").is_file():
        run(full, data, "ddp", 1, ["training.max_steps=6", "training.save_steps=100", *accumulate])
    assert max_adapter_diff(full, out) < 1e-4
    assert max(abs(a - b) for a, b in zip(losses(full), losses(out), strict=True)) < 1e-4
