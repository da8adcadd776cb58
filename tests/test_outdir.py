"""An output folder belongs to one run: another run's checkpoints, another stage's folder and a
running job are refused; --overwrite moves the earlier run aside and deletes nothing."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_recipe

from train.core.errors import UserError
from train.methods import outdir
from train.methods.reliability import newest_complete_checkpoint
from train.methods.sft import run_sft

pytestmark = pytest.mark.e2e


@pytest.fixture
def first_run(stage1_dict):
    """A finished run with stamped checkpoints (steps 1 and 2)."""
    stage1_dict["training"].update(max_steps=2, save_steps=1, save_total_limit=3)
    run_sft(make_recipe(stage1_dict))
    return stage1_dict


def test_a_fresh_run_never_mixes_with_another_runs_checkpoints(first_run):
    out = Path(first_run["output_dir"])
    assert (outdir.checkpoint_identity(out / "checkpoint-2") or {})["recipe"] == outdir.recipe_identity(
        make_recipe(first_run)
    )
    other = json.loads(json.dumps(first_run))
    other["training"]["learning_rate"] = 1e-3  # another run
    with pytest.raises(UserError, match="holds an earlier run .*--overwrite"):
        run_sft(make_recipe(other))
    with pytest.raises(UserError, match="holds checkpoints of another run"):
        run_sft(make_recipe(other, ["training.resume_from_checkpoint=auto"]))
    # The old run's checkpoint-600 (the bug: rotation kept it, auto-resume picked it) is never this run's.
    assert newest_complete_checkpoint(out, outdir.recipe_identity(make_recipe(other))) is None
    before = sorted(p.name for p in out.iterdir())

    other["training"]["max_steps"] = 1
    record = run_sft(make_recipe(other), overwrite=True)
    assert record["metrics"]["global_steps"] == 1
    (aside,) = out.parent.glob(f"{out.name}.replaced-*")
    assert sorted(p.name for p in aside.iterdir()) == before  # moved, nothing deleted
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert outdir.checkpoint_identity(out / "checkpoint-1")["recipe"] == outdir.recipe_identity(make_recipe(other))
    assert not (out / outdir.LOCK_FILE).exists() and not (aside / outdir.LOCK_FILE).exists()


def test_a_stage_never_writes_into_another_stages_folder(first_run, tmp_path):
    grandparent = Path(first_run["output_dir"])
    child = json.loads(json.dumps(first_run))
    child.update(stage="stage2_korean", parent=str(grandparent), output_dir=str(tmp_path / "stage2"))
    child["training"].update(max_steps=1, save_steps=1000)
    run_sft(make_recipe(child))
    grandchild = {**child, "stage": "stage3", "parent": str(tmp_path / "stage2"), "output_dir": str(grandparent)}
    with pytest.raises(UserError, match="belongs to another stage: it is the folder of the ancestor stage"):
        run_sft(make_recipe(grandchild), overwrite=True)
    grandchild["output_dir"] = str(tmp_path / "elsewhere")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "stage.json").write_text(json.dumps({"stage": "stage_x"}))
    with pytest.raises(UserError, match="holds stage 'stage_x'"):
        run_sft(make_recipe(grandchild), overwrite=True)
    assert (grandparent / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "elsewhere" / "stage.json").is_file()


def test_a_second_run_in_a_busy_folder_is_refused_with_the_first_ones_pid(stage1_dict, tmp_path):
    out = Path(stage1_dict["output_dir"])
    out.mkdir(parents=True)
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {"pid": busy.pid, "host": socket.gethostname(), "started": "2026-11-30T00:00:00"}
        (out / outdir.LOCK_FILE).write_text(json.dumps(lock))
        with pytest.raises(UserError, match=f"in use by another run \\(pid {busy.pid} on {socket.gethostname()}"):
            run_sft(make_recipe(stage1_dict))
        assert json.loads((out / outdir.LOCK_FILE).read_text())["pid"] == busy.pid  # still theirs
    finally:
        busy.kill()
        busy.wait()
    # The holder is gone: its lock is stale and the next run takes the folder, then lets it go.
    stage1_dict["training"]["max_steps"] = 1
    run_sft(make_recipe(stage1_dict))
    assert not (out / outdir.LOCK_FILE).exists()


def test_a_failed_adapter_save_keeps_the_earlier_adapter(tmp_path):
    """adapter/ is written aside and swapped in: a full disk mid-save leaves the earlier one in place."""
    import errno
    from types import SimpleNamespace

    from train.methods.runner import save_weights

    earlier = tmp_path / "adapter"
    earlier.mkdir()
    (earlier / "adapter_model.safetensors").write_bytes(b"earlier weights")

    def full_disk(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer = SimpleNamespace(
        is_world_process_zero=lambda: True,
        accelerator=SimpleNamespace(wait_for_everyone=lambda: None),
        save_model=full_disk,
    )
    with pytest.raises(OSError, match="No space left"):
        save_weights(trainer, tmp_path, tokenizer=None, full=False)
    assert (earlier / "adapter_model.safetensors").read_bytes() == b"earlier weights"

    def fine(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "adapter_model.safetensors").write_bytes(b"new weights")

    trainer.save_model = fine
    save_weights(trainer, tmp_path, tokenizer=SimpleNamespace(save_pretrained=lambda folder: None), full=False)
    assert (earlier / "adapter_model.safetensors").read_bytes() == b"new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
