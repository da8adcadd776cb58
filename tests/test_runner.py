"""The shared stage runner: reward, DPO and GRPO stages get SFT's guards (preemption and resume,
non-finite policy, stop_at_step, atomic checkpoints) and start-up checks (report_to backends)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import child_recipe, make_recipe, train_tiny_stage
from safetensors.torch import load_file
from transformers import TrainerCallback

from train.core.errors import UserError
from train.methods import preference
from train.methods.launch import check_report_to
from train.methods.preference import run_preference
from train.methods.reliability import checkpoint_problem
from train.methods.trainers import StageRewardTrainer

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def sft_parent(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    train_tiny_stage("stage1_medical", root / "sft", root / "sft_data", max_steps=4, logging_steps=2)
    return root


def _recipe(name: str, root: Path, out: str, **training):
    return child_recipe(name, root, out, **{"logging_steps": 1, "save_steps": 1000, **training})


def _losses(folder: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _adapter(folder: Path) -> dict:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


class _SigtermAt(TrainerCallback):
    """Sends this process a real SIGTERM at the end of one optimizer step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_dpo_stopped_by_sigterm_resumes_to_the_same_adapter(sft_parent, monkeypatch):
    full = run_preference(_recipe("dpo", sft_parent, "dpo_full", max_steps=5))
    assert full["metrics"]["global_steps"] == 5

    build = preference.Preference.trainer

    def with_sigterm(self, *args, **kwargs):
        trainer = build(self, *args, **kwargs)
        trainer.add_callback(_SigtermAt(2))
        return trainer

    monkeypatch.setattr(preference.Preference, "trainer", with_sigterm)
    stopped = run_preference(_recipe("dpo", sft_parent, "dpo_cut", max_steps=5))
    # The signal arrives after the step-2 boundary was checked: it is honoured at the next one.
    assert stopped["status"] == "interrupted" and stopped["step"] == 3
    assert "python -m train dpo" in stopped["resume"]
    assert checkpoint_problem(sft_parent / "dpo_cut" / "checkpoint-3") is None
    assert not (sft_parent / "dpo_cut" / "adapter").exists()
    monkeypatch.setattr(preference.Preference, "trainer", build)
    resumed = run_preference(_recipe("dpo", sft_parent, "dpo_cut", max_steps=5, resume_from_checkpoint="auto"))
    assert resumed["metrics"]["resumed_from"].endswith("checkpoint-3")
    a, b = _adapter(sft_parent / "dpo_full"), _adapter(sft_parent / "dpo_cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The resumed process trained steps 4-5 only: the log holds each step once, with the uninterrupted losses.
    assert _losses(sft_parent / "dpo_cut") == _losses(sft_parent / "dpo_full")


def _nan_at(monkeypatch, bad_step: int, seen: dict):
    original = StageRewardTrainer.compute_loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        step = self.state.global_step + 1
        seen.setdefault(step, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        result = original(self, model, inputs, return_outputs, num_items_in_batch)
        if step != bad_step:
            return result
        return (result[0] * float("nan"), result[1]) if return_outputs else result * float("nan")

    monkeypatch.setattr(StageRewardTrainer, "compute_loss", compute_loss)


def test_nan_in_a_reward_model_step_is_skipped_or_aborts_per_policy(sft_parent, monkeypatch):
    seen: dict = {}
    _nan_at(monkeypatch, 2, seen)
    record = run_preference(_recipe("reward", sft_parent, "reward_skip", max_steps=3, nonfinite="skip"))
    assert record["metrics"]["nonfinite_skipped_steps"] == 1
    assert all(torch.equal(seen[2][n], seen[3][n]) for n in seen[2])  # the bad step changed nothing
    assert all(torch.isfinite(t).all() for t in _adapter(sft_parent / "reward_skip").values())

    seen.clear()
    with pytest.raises(UserError, match=r"non-finite loss or gradient at step 2 .*python -m train reward"):
        run_preference(_recipe("reward", sft_parent, "reward_abort", max_steps=3, nonfinite="abort"))
    # The skipped update left the weights of before step 2: that is the checkpoint the abort wrote.
    checkpoint = sft_parent / "reward_abort" / "checkpoint-2"
    assert checkpoint_problem(checkpoint) is None
    saved = load_file(checkpoint / "adapter_model.safetensors")
    last_good = {n.replace(".default", ""): t for n, t in seen[2].items() if "lora_" in n}
    assert last_good and all(torch.equal(saved[k], t) for k, t in last_good.items())


def test_stop_at_step_stops_a_grpo_stage(sft_parent):
    record = run_preference(_recipe("grpo", sft_parent, "grpo", max_steps=4, stop_at_step=2))
    assert record["status"] == "interrupted" and record["step"] == 2
    out = sft_parent / "grpo"
    assert checkpoint_problem(out / "checkpoint-2") is None and not (out / "adapter").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2


def test_report_to_backends_are_checked_before_loading_and_tensorboard_writes_events(stage1_dict, monkeypatch):
    import transformers.integrations.integration_utils as hf_integrations

    from train.methods.sft import run_sft

    monkeypatch.setattr(hf_integrations, "is_wandb_available", lambda: False)  # as on a machine without it
    stage1_dict["training"].update(max_steps=2)
    with pytest.raises(UserError, match=r"report_to lists wandb, which is not installed: pip install -e '.\[wandb\]'"):
        check_report_to(["wandb"])
    stage1_dict["training"]["report_to"] = ["tensorbord"]
    with pytest.raises(UserError, match="unknown backend 'tensorbord'"):
        run_sft(make_recipe(stage1_dict))
    stage1_dict["training"]["report_to"] = ["tensorboard"]
    run_sft(make_recipe(stage1_dict))
    events = list(Path(stage1_dict["output_dir"]).rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
