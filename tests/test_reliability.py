"""Reliability: exact resume, atomic checkpoints, preemption, non-finite losses, start-up checks, secrets,
determinism. Each test can fail: it compares against an uninterrupted run or an injected fault."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_recipe
from safetensors.torch import load_file

from train.core.errors import UserError
from train.methods.reliability import checkpoint_problem, newest_complete_checkpoint
from train.methods.sft import run_sft
from train.methods.trainers import StageSFTTrainer

pytestmark = pytest.mark.e2e

RECIPE = "recipes/tiny/stage1_medical.yaml"
RUN = [
    "training.max_steps=8",
    "training.gradient_accumulation_steps=2",
    "training.per_device_train_batch_size=1",
    "training.logging_steps=1",
    "training.save_steps=100",
    "training.warmup_steps=2",
    "data.max_length=256",
]


def sft(out: Path, data: Path, *extra: str, env_extra: dict | None = None, background: bool = False):
    cmd = [
        sys.executable,
        "-m",
        "train",
        "sft",
        RECIPE,
        *RUN,
        f"output_dir={out}",
        f"data.processed_dir={data}",
        *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    if background:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def step_losses(out: Path) -> dict[int, float]:
    return {
        r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    }


def same_adapter(a: Path, b: Path) -> bool:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    data = root / "data"
    proc = sft(root / "full", data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, data


@pytest.fixture(scope="module")
def stopped_run(uninterrupted):
    """A run stopped after step 3 of 8: its checkpoint-3 is a real, complete checkpoint; and its stderr."""
    root, data = uninterrupted
    out = root / "stopped"
    first = sft(out, data, "training.stop_at_step=3")
    assert first.returncode == 0 and "stopped (training.stop_at_step) at step 3" in first.stderr
    assert (out / "checkpoint-3" / "checkpoint.json").is_file() and not (out / "adapter").exists()
    return out, first.stderr


@pytest.fixture(scope="module")
def stopped(stopped_run):
    return stopped_run[0]


def test_exact_resume_in_a_new_process_with_the_printed_command(uninterrupted, stopped_run):
    root, data = uninterrupted
    out, stderr = stopped_run
    printed = shlex.split(stderr.split("resume with: ")[1].splitlines()[0])
    # The command as it was run: same recipe and overrides (output_dir!), resumed, without the time box.
    assert printed[:5] == ["python", "-m", "train", "sft", RECIPE] and f"output_dir={out}" in printed
    assert "training.resume_from_checkpoint=auto" in printed and not any("stop_at_step" in a for a in printed)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    second = subprocess.run(
        [sys.executable, *printed[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert second.returncode == 0, second.stderr[-2000:]
    assert step_losses(out) == step_losses(root / "full")  # identical, steps 1-8 (accumulation 2)
    assert same_adapter(out / "adapter", root / "full" / "adapter")
    full, resumed = (json.loads((d / "stage.json").read_text())["metrics"] for d in (root / "full", out))
    assert resumed["train_tokens"] == full["train_tokens"] and resumed["token_slots"] == full["token_slots"]
    assert abs(resumed["train_loss"] - full["train_loss"]) < 1e-5, (resumed["train_loss"], full["train_loss"])
    # The same command on the finished stage: it says so and trains nothing.
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    again = subprocess.run(
        [sys.executable, *printed[1:]], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0 and "is already complete" in again.stderr, again.stderr[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == checkpoints
    assert step_losses(out) == step_losses(root / "full")


def test_stage_json_records_the_accumulation_actually_used(stage1_dict):
    stage1_dict["training"].update(
        max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=4, global_batch_size=6
    )
    record = run_sft(make_recipe(stage1_dict))
    assert record["metrics"]["gradient_accumulation_steps"] == 3
    assert record["recipe"]["training"]["gradient_accumulation_steps"] == 3


def test_preemption_saves_exits_0_and_resumes_to_the_same_result(uninterrupted):
    root, data = uninterrupted
    out = root / "preempted"
    proc = sft(out, data, background=True)
    deadline = time.time() + 300
    while time.time() < deadline and len(step_losses(out) if (out / "metrics.jsonl").is_file() else {}) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-2000:]
    assert "received SIGTERM" in stderr and "preempted at step" in stderr and "resume_from_checkpoint=auto" in stderr
    step = int(stderr.split("preempted at step ")[1].split(";")[0])
    assert 2 <= step < 8
    assert checkpoint_problem(out / f"checkpoint-{step}") is None
    resumed = sft(out, data, "training.resume_from_checkpoint=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert same_adapter(out / "adapter", root / "full" / "adapter")
    assert step_losses(out) == step_losses(root / "full")


def test_interrupted_or_truncated_checkpoints_are_never_chosen(stopped, tmp_path):
    source = stopped / "checkpoint-3"  # a real, complete checkpoint
    assert checkpoint_problem(source) is None
    for step in (2, 4, 6):
        shutil.copytree(source, tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-6" / "checkpoint.json").unlink()  # the save never finished
    weights = tmp_path / "checkpoint-4" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated after it was listed
    shutil.copytree(source, tmp_path / "tmp-checkpoint-8")  # still being written
    assert "has 100 bytes" in checkpoint_problem(tmp_path / "checkpoint-4")
    assert newest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"


def test_checkpoints_are_staged_and_rotation_keeps_last_k_and_best(stage1_dict):
    stage1_dict["training"].update(max_steps=5, save_steps=1, eval_steps=1, save_total_limit=2)
    recipe = make_recipe(stage1_dict)
    run_sft(recipe)
    out = Path(recipe.output_dir)
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert not list(out.glob("tmp-checkpoint-*"))
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"]).name
    assert "checkpoint-5" in kept and best in kept and len(kept) <= 3
    assert all(checkpoint_problem(out / name) is None for name in kept)


def _inject_nan(monkeypatch, bad_steps: set[int], seen: dict):
    original = StageSFTTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step + 1
        params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        seen.setdefault(step, params)
        loss = original(self, model, inputs, return_outputs, num_items_in_batch)
        return loss * float("nan") if step in bad_steps else loss

    monkeypatch.setattr(StageSFTTrainer, "compute_loss", compute_loss)


def test_nonfinite_skip_leaves_weights_unchanged(stage1_dict, monkeypatch):
    stage1_dict["training"].update(max_steps=4, nonfinite="skip")
    seen: dict = {}
    _inject_nan(monkeypatch, {2}, seen)
    metrics = run_sft(make_recipe(stage1_dict))["metrics"]
    assert metrics["nonfinite_skipped_steps"] == 1
    assert all(torch.equal(seen[2][n], seen[3][n]) for n in seen[2])  # step 2 changed nothing
    assert not all(torch.equal(seen[3][n], seen[4][n]) for n in seen[3])  # step 3 did train
    adapter = load_file(Path(stage1_dict["output_dir"]) / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_nonfinite_abort_saves_last_good_state(stage1_dict, monkeypatch):
    stage1_dict["training"].update(max_steps=4, nonfinite="abort")
    seen: dict = {}
    _inject_nan(monkeypatch, {3}, seen)
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step 3 .*checkpoint-3"):
        run_sft(make_recipe(stage1_dict))
    saved = load_file(Path(stage1_dict["output_dir"]) / "checkpoint-3" / "adapter_model.safetensors")
    last_good = {n.replace(".default", ""): t for n, t in seen[3].items()}
    assert saved.keys() == last_good.keys() and all(torch.equal(saved[k], last_good[k]) for k in saved)


def test_too_many_consecutive_skips_abort(stage1_dict, monkeypatch):
    stage1_dict["training"].update(max_steps=6, nonfinite="skip", max_consecutive_nonfinite=2)
    _inject_nan(monkeypatch, {2, 3, 4, 5, 6}, {})
    with pytest.raises(UserError, match=r"at step 4 .*3 bad steps"):
        run_sft(make_recipe(stage1_dict))


def test_startup_checks_fail_in_one_line(stage1_dict, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        ({"output_dir": str(blocker / "out")}, "is not writable"),
        ({"parent": str(tmp_path / "no_such_stage")}, "has no stage.json; train that stage first"),
    ]
    for changes, message in cases:
        with pytest.raises(UserError, match=message) as err:
            run_sft(make_recipe({**stage1_dict, **changes}))
        assert "\n" not in str(err.value)
    import shutil as shutil_module

    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: shutil_module._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(UserError, match=r"GiB free, a checkpoint of this adapter needs about"):
        run_sft(make_recipe(stage1_dict))


def test_tokens_never_reach_logs_or_saved_files(uninterrupted, tmp_path):
    _, data = uninterrupted
    sentinel = "hf_SENTINEL_do_not_leak_0123456789"
    env = {"HF_TOKEN": sentinel, "HUGGING_FACE_HUB_TOKEN": sentinel, "WANDB_API_KEY": "wandb_" + sentinel}
    proc = sft(tmp_path / "out", data, "training.max_steps=2", "training.save_steps=1", env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sentinel not in proc.stdout + proc.stderr
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert any(p.name == "stage.json" for p in files) and any(p.name == "training_args.bin" for p in files)
    leaked = [str(p) for p in files if sentinel.encode() in p.read_bytes()]
    assert not leaked


def test_weights_are_safetensors_and_torch_load_is_safe(uninterrupted, stopped):
    root, _ = uninterrupted
    for folder in (root / "full" / "adapter", stopped / "checkpoint-3"):
        assert (folder / "adapter_model.safetensors").is_file()
        assert not list(folder.glob("*.bin")) or {p.name for p in folder.glob("*.bin")} == {"training_args.bin"}
    for source in list((REPO / "train").rglob("*.py")) + list((REPO / "data_prep").rglob("*.py")):
        for line in source.read_text(encoding="utf-8").splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{source}: {line.strip()}"


def test_same_seed_same_losses_other_seed_different(stage1_dict, tmp_path):
    def losses(seed: int, name: str) -> list[float]:
        d = {**stage1_dict, "output_dir": str(tmp_path / name)}
        d["training"] = {**stage1_dict["training"], "seed": seed, "max_steps": 3}
        run_sft(make_recipe(d))
        return list(step_losses(tmp_path / name).values())

    first, again, other = losses(1, "a"), losses(1, "b"), losses(2, "c")
    assert first == again
    assert first != other


def test_a_damaged_last_line_in_metrics_log_does_not_break_resume(tmp_path):
    from train.methods.record import trim_metrics_log

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo')
    trim_metrics_log(log, str(checkpoint))  # a disk that filled up mid-line, then a resume
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


def test_parent_merged_is_merged_again_when_the_parent_changes(tmp_path):
    from conftest import recipe_dict, train_tiny_stage

    from train.models.loading import PARENT_CHAIN, parent_chain, parent_merged_dir

    train_tiny_stage("stage1_medical", tmp_path / "parent", tmp_path / "data1", max_steps=2)
    child = recipe_dict("stage2_korean")
    child.update(output_dir=str(tmp_path / "child"), parent=str(tmp_path / "parent"))
    child["model"]["quantization"] = "nf4"
    recipe = make_recipe(child)
    merged = Path(parent_merged_dir(recipe, parent_chain(recipe)))
    first = json.loads((merged / PARENT_CHAIN).read_text())["fingerprint"]
    weights = (merged / "model.safetensors").stat().st_mtime_ns
    parent_merged_dir(recipe, parent_chain(recipe))
    assert (merged / "model.safetensors").stat().st_mtime_ns == weights  # same chain: reused
    train_tiny_stage(
        "stage1_medical", tmp_path / "parent", tmp_path / "data1", max_steps=2, seed=7, overwrite=True
    )  # retrained
    parent_merged_dir(recipe, parent_chain(recipe))
    assert json.loads((merged / PARENT_CHAIN).read_text())["fingerprint"] != first
    assert (merged / "model.safetensors").stat().st_mtime_ns != weights
