"""Preemption that beats the scheduler: a signal is honoured at the next micro-batch (inside a long
gradient accumulation) and inside evaluation, and the resumed run equals an uninterrupted one."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import make_recipe
from safetensors.torch import load_file
from transformers import TrainerCallback

from train.methods import sft
from train.methods.reliability import checkpoint_problem
from train.methods.sft import run_sft

pytestmark = pytest.mark.e2e

ACCUMULATION = {"max_steps": 3, "gradient_accumulation_steps": 4, "per_device_train_batch_size": 1}


class _Signal(TrainerCallback):
    """Sends this process `sig` at the first micro-batch (or evaluation batch) after optimizer step `step`."""

    def __init__(self, sig, step: int, during: str):
        self.sig, self.step, self.during, self.sent = sig, step, during, False

    def _maybe(self, state):
        if not self.sent and state.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.sig)

    def on_substep_end(self, args, state, control, **kwargs):
        if self.during == "accumulation":
            self._maybe(state)

    def on_prediction_step(self, args, state, control, **kwargs):
        if self.during == "evaluation":
            self._maybe(state)


def _with_signal(monkeypatch, callback):
    build = sft.SFT.trainer

    def trainer(self, *args, **kwargs):
        t = build(self, *args, **kwargs)
        t.callback_handler.callbacks.insert(0, callback)  # before the preemption check of the same batch
        return t

    monkeypatch.setattr(sft.SFT, "trainer", trainer)
    return build


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _log(out) if "loss" in r}


def _same_adapter(a: Path, b: Path) -> bool:
    x, y = (
        load_file(a / "adapter" / "adapter_model.safetensors"),
        load_file(b / "adapter" / "adapter_model.safetensors"),
    )
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from conftest import recipe_dict

    root = tmp_path_factory.mktemp("preempt")
    data = copy.deepcopy(recipe_dict("stage1_medical"))
    data["data"].update(processed_dir=str(root / "data"), max_length=256)
    data["training"].update(logging_steps=1, save_steps=1000, warmup_steps=0, **ACCUMULATION)
    full = {**copy.deepcopy(data), "output_dir": str(root / "full")}
    run_sft(make_recipe(full))
    return root, data


def _resume_and_compare(data: dict, out: Path, full: Path) -> None:
    resumed = run_sft(make_recipe(data, ["training.resume_from_checkpoint=auto"]))
    assert resumed["metrics"]["global_steps"] == ACCUMULATION["max_steps"]
    assert _losses(out) == _losses(full)
    assert _same_adapter(out, full)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["usr1", "term"])
def test_a_signal_inside_gradient_accumulation_stops_at_the_next_micro_batch(base, monkeypatch, capfd, sig):
    root, data = base
    out = root / f"cut-{signal.Signals(sig).name}"
    data = {**copy.deepcopy(data), "output_dir": str(out)}
    build = _with_signal(monkeypatch, _Signal(sig, step=1, during="accumulation"))
    record = run_sft(make_recipe(data))
    # Signalled after the first of step 2's four micro-batches: stopped there, not after three more.
    assert record["status"] == "interrupted" and record["step"] == 1
    assert checkpoint_problem(out / "checkpoint-1") is None and not (out / "adapter").exists()
    assert "s after the signal" in capfd.readouterr().err
    monkeypatch.setattr(sft.SFT, "trainer", build)
    _resume_and_compare(data, out, root / "full")  # step 2 trained again from its first micro-batch


def test_a_signal_during_evaluation_drops_it_and_saves_the_step(base, monkeypatch):
    root, data = base
    out = root / "cut-eval"
    data = {**copy.deepcopy(data), "output_dir": str(out)}
    data["training"]["eval_steps"] = 1
    build = _with_signal(monkeypatch, _Signal(signal.SIGTERM, step=2, during="evaluation"))
    record = run_sft(make_recipe(data))
    assert record["status"] == "interrupted" and record["step"] == 2
    assert checkpoint_problem(out / "checkpoint-2") is None
    evaluated = [r["step"] for r in _log(out) if "eval_loss" in r]
    assert evaluated == [1]  # step 2's evaluation was dropped, not finished
    monkeypatch.setattr(sft.SFT, "trainer", build)
    _resume_and_compare(data, out, root / "full")
