"""`train lm-eval`: lm-evaluation-harness on a trained tiny stage with the bundled KorMedMCQA-shaped task,
offline; its log-likelihoods are the stage's (adapters merged), checked against transformers directly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import train_tiny_stage

from train.core.errors import UserError
from train.evaluation.lm_eval import run_lm_eval

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def medical_stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("lme")
    train_tiny_stage("stage1_medical", root / "stage1", root / "data", max_steps=6, learning_rate=3e-3, warmup_steps=0)
    return root / "stage1"


def _continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), split where lm-eval splits: after the context's own tokens."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(logprobs[i - 1, whole[i]]) for i in range(n_ctx, len(whole)))


def test_stage_loglikelihoods_are_the_merged_models_and_differ_from_the_base(medical_stage, tmp_path):
    from transformers import AutoModelForCausalLM

    from train.inference.hf import load_stage_model
    from train.models.tiny import ensure_tiny_model

    report = run_lm_eval(str(medical_stage), ["kormedmcqa_sample"], tmp_path / "lme", log_samples=True)
    scores = report["results"]["kormedmcqa_sample"]
    assert report["n_samples"]["kormedmcqa_sample"]["effective"] == 12 and 0 <= scores["acc,none"] <= 1
    saved = json.loads((tmp_path / "lme" / "lm_eval_results.json").read_text(encoding="utf-8"))
    assert saved["target"]["stage"] == "stage1_medical" and saved["results"] == report["results"]
    assert "| kormedmcqa_sample | acc | none |" in report["table"]

    rows = [json.loads(line) for line in open(tmp_path / "lme" / "samples_kormedmcqa_sample.jsonl", encoding="utf-8")]
    assert len(rows) == 12 and all(len(r["arguments"]) == 5 for r in rows)
    stage_model, tokenizer, _ = load_stage_model(medical_stage)
    base = AutoModelForCausalLM.from_pretrained(ensure_tiny_model(), dtype=stage_model.dtype).eval()
    worst, moved = 0.0, 0.0
    for row in rows[:4]:
        for (context, continuation), response in zip(row["arguments"], row["filtered_resps"], strict=True):
            ours = _continuation_logprob(stage_model, tokenizer, context, continuation)
            worst = max(worst, abs(ours - float(response[0])))
            moved = max(moved, abs(_continuation_logprob(base, tokenizer, context, continuation) - ours))
    assert worst < 1e-3, f"lm-eval's log-likelihoods differ from transformers' by {worst}"
    assert moved > 1e-2, "the stage scores like the base model: its adapters were not applied"
    # acc is the share of rows whose target letter has the highest log-likelihood
    picked = [max(range(5), key=lambda i, r=r: float(r["filtered_resps"][i][0])) for r in rows]
    assert math.isclose(scores["acc,none"], sum(p == r["target"] for p, r in zip(picked, rows, strict=True)) / 12)


def test_cli_writes_into_the_stage_folder_and_bad_requests_fail_before_loading(medical_stage, tmp_path, capsys):
    from train.cli import main

    main(["lm-eval", str(medical_stage), "--tasks", "kormedmcqa_sample", "--limit", "3"])
    out = capsys.readouterr().out
    assert "| kormedmcqa_sample | acc | none |" in out
    saved = json.loads((medical_stage / "lm_eval" / "lm_eval_results.json").read_text(encoding="utf-8"))
    assert saved["n_samples"]["kormedmcqa_sample"]["effective"] == 3
    with pytest.raises(UserError, match="unknown lm-eval task"):
        run_lm_eval(str(medical_stage), ["kormedmcqa_sampel"], tmp_path)
    from train.models.tiny import ensure_tiny_model  # a model folder (merged or base) is scored as it is

    base = run_lm_eval(str(ensure_tiny_model()), ["kormedmcqa_sample"], tmp_path / "base", limit=2)
    assert (
        base["target"] == {"model": str(ensure_tiny_model())}
        and base["n_samples"]["kormedmcqa_sample"]["effective"] == 2
    )
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UserError, match="merged folder"):
        run_lm_eval(str(gguf), ["kormedmcqa_sample"], tmp_path)
