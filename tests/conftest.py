"""Shared fixtures: tiny offline model, sample recipes, small data files. CPU, one thread."""

from __future__ import annotations

import os

# Two threads fighting on two cores make a tiny step 20x slower (2.1 s instead of 0.07 s, measured here); set before torch loads.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import copy
import json
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    from train.models.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_train(args: list[str], strategy: str | None = None, processes: int = 2, timeout: int = 900) -> None:
    """`python -m train ARGS` in one process (strategy None), or under `accelerate launch` with the shipped
    config of `strategy` (gloo on CPU; FSDP2 through the test shim); fails with the command's stderr."""
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "train", *args]
    if strategy is not None:
        launcher = ["-m", "accelerate.commands.launch", "--config_file", f"accelerate_configs/{strategy}.yaml"]
        launcher += ["--num_processes", str(processes), "--main_process_port", str(_free_port())]
        cmd = [sys.executable, *launcher, "-m", "train", *args]
        if strategy == "fsdp":
            env.update(FSDP_CPU_SHIM="1", PYTHONPATH=str(REPO / "tests" / "fsdp_cpu_shim"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def recipe_dict(name: str) -> dict:
    return yaml.safe_load((REPO / "recipes" / "tiny" / f"{name}.yaml").read_text(encoding="utf-8"))


@pytest.fixture
def stage1_dict(tmp_path) -> dict:
    """The tiny stage-1 recipe as a dict, writing into tmp_path, short and fast."""
    data = copy.deepcopy(recipe_dict("stage1_medical"))
    data["output_dir"] = str(tmp_path / "stage1")
    data["data"]["processed_dir"] = str(tmp_path / "data1")
    data["data"]["max_length"] = 256
    data["training"].update({"max_steps": 4, "logging_steps": 1, "save_steps": 1000})
    return data


def make_recipe(data: dict, overrides: list[str] | None = None):
    from train.core.config import recipe_from_dict

    return recipe_from_dict(copy.deepcopy(data), "test-recipe", overrides)


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def train_tiny_stage(
    recipe_name: str,
    out: Path,
    data_dir: Path,
    parent: Path | None = None,
    model: dict | None = None,
    overwrite: bool = False,
    **training,
) -> dict:
    """Train a shipped tiny recipe briefly into `out` (max_length 256, no intermediate checkpoints)."""
    from train.methods.sft import run_sft

    data = copy.deepcopy(recipe_dict(recipe_name))
    data.update(output_dir=str(out), parent=str(parent) if parent else None)
    data["model"].update(model or {})
    data["data"].update(processed_dir=str(data_dir), max_length=256)
    data["training"].update({"save_steps": 1000, **training})
    return run_sft(make_recipe(data), overwrite=overwrite)


def child_recipe(name: str, root: Path, out: str | None = None, **training):
    """A shipped tiny recipe (reward, dpo, grpo, ...) continuing from the SFT stage in `root / "sft"`."""
    data = copy.deepcopy(recipe_dict(name))
    data.update(output_dir=str(root / (out or name)), parent=str(root / "sft"))
    data["data"]["processed_dir"] = str(root / f"{name}_data")
    data["training"].update(training)
    return make_recipe(data)


@pytest.fixture(scope="session")
def bwrap() -> str:
    """bubblewrap, which the CodeI/O sandbox needs: a clear failure (not a skip) where it is missing."""
    import shutil

    path = shutil.which("bwrap")
    if path is None:
        pytest.fail("bubblewrap is not installed: run `make install` (it installs it) or `apt-get install bubblewrap`")
    return path
