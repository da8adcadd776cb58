"""The demo pipeline end to end (fast variant: the plumbing, not the learning), merge and GGUF included."""

from __future__ import annotations

import json

import pytest

from train.demo import format_report, run_demo

pytestmark = pytest.mark.e2e

REQUIRED = {"train_loss_first", "train_loss_last", "train_tokens", "padding_efficiency", "seconds", "output_dir"}


@pytest.mark.export
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
    evaluation = saved["eval"]["members"]
    assert {"stage1_medical | greedy", "stage2_korean | beam3"} <= set(evaluation)
    assert (
        evaluation["stage2_korean | beam3"]["examples"] == 4
        and "vote_over_candidates" in evaluation["stage2_korean | beam3"]
    )
    assert saved["eval"]["ensemble"]["members"] == 4
    merge = saved["merge"]
    assert merge["merged_vs_base_plus_adapter"]["relative_diff"] <= 0.02 and merge["adapter_effect_max_abs_diff"] > 0
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "README.md").is_file()
    ((name, gguf),) = saved["gguf"]["files"].items()
    assert name == "stage2_korean-q4_k_m.gguf" and (tmp_path / "merged" / "gguf" / name).stat().st_size == gguf["bytes"]
    assert gguf["tokenization_identical"] and gguf["within_tolerance"] and gguf["fallback_tensors"] == {}
    assert gguf["tensor_types"]["Q4_K"] > 0
    assert (tmp_path / "merged" / "gguf" / gguf["ollama_modelfile"]).read_text().startswith("# Ollama: ollama create")
    report = format_report(summary)
    assert "stage1_medical" in report and "pad eff" in report and "q4_k_m" in report and "ensemble vote" in report
