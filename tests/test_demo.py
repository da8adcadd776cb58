"""The demo pipeline end to end (fast variant: the plumbing, not the learning)."""

from __future__ import annotations

import json

from train.demo import format_report, run_demo

REQUIRED = {"train_loss_first", "train_loss_last", "train_tokens", "padding_efficiency", "seconds", "output_dir"}


def test_demo_fast_end_to_end(tmp_path):
    summary = run_demo(out=tmp_path, fast=True)
    saved = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert saved["stages"].keys() == {"stage1_medical", "stage2_korean"}
    for name, stage in saved["stages"].items():
        assert REQUIRED <= stage.keys(), name
        assert stage["global_steps"] == 3 and stage["train_tokens"] > 0
        assert 0.99 <= stage["padding_efficiency"] <= 1.0  # padding-free packing
        assert (tmp_path / name / "adapter" / "adapter_model.safetensors").is_file()
        assert (tmp_path / name / "loss_curve.png").stat().st_size > 0
        assert (tmp_path / "data" / name / "manifest.json").is_file()
    assert saved["stages"]["stage2_korean"]["parent"] == str(tmp_path / "stage1_medical")
    samples = saved["generation"]["samples"]
    assert len(samples) == 2 and all(isinstance(s["completion"], str) for s in samples)
    report = format_report(summary)
    assert "stage1_medical" in report and "pad eff" in report
