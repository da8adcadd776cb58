"""Distillation under DDP and ZeRO-3 on CPU: two processes at micro-batch 1 equal one process at micro-batch 2."""

from __future__ import annotations

import json

import pytest
from conftest import run_train
from safetensors.torch import load_file
from test_distributed import losses

pytestmark = pytest.mark.dist

COMMON = [
    "training.max_steps=4",
    "training.logging_steps=1",
    "training.warmup_steps=0",
    "training.learning_rate=2e-4",
    "data.max_length=256",
    "distill.report_prompts=0",
]


def _run(args: list[str], processes: int, strategy: str = "ddp") -> None:
    run_train(args, strategy if processes > 1 else None, processes)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A briefly trained teacher stage, and a one-process distillation from it (live teacher, micro-batch 2)."""
    root = tmp_path_factory.mktemp("distill-dist")
    teacher = root / "teacher"
    sft = ["sft", "recipes/tiny/stage1_medical.yaml", f"output_dir={teacher}", f"data.processed_dir={root / 'td'}"]
    _run([*sft, "training.max_steps=10", "data.max_length=256"], 1)
    common = [*COMMON, f"distill.teacher={teacher}", f"data.processed_dir={root / 'data'}"]
    _run(
        [
            "distill",
            "recipes/tiny/distill.yaml",
            *common,
            f"output_dir={root / 'single'}",
            "training.per_device_train_batch_size=2",
        ],
        1,
    )
    return root, common


@pytest.mark.parametrize(("strategy", "teacher_logits"), [("ddp", "live"), ("ddp", "cached"), ("zero3", "live")])
def test_distill_two_processes_equal_one(reference, strategy, teacher_logits):
    """Under ZeRO-3 the teacher stage is merged once on one process, then sharded like the student."""
    root, common = reference
    single, multi = root / "single", root / f"{strategy}-{teacher_logits}"
    args = [
        "distill",
        "recipes/tiny/distill.yaml",
        *common,
        f"distill.teacher_logits={teacher_logits}",
        f"output_dir={multi}",
    ]
    if teacher_logits == "cached":  # built once before a launch (the launch refuses to build it on every rank)
        _run([*args, "--prepare-only"], 1)
        assert (multi / "teacher_cache" / "index.json").is_file() and not (multi / "stage.json").exists()
    _run([*args, "training.per_device_train_batch_size=1"], 2, strategy)
    record = json.loads((multi / "stage.json").read_text())
    assert record["metrics"]["world_size"] == 2 and record["metrics"]["sharding"] == strategy
    a, b = losses(single), losses(multi)
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    x, y = (load_file(p / "adapter" / "adapter_model.safetensors") for p in (single, multi))
    assert x.keys() == y.keys() and len(x) == 2 * 7 * 2  # the student's 2 layers x 7 modules x (A, B)
    assert max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-4
