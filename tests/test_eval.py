"""`train eval` / `train generate` end to end on the tiny model: decodings, voting, checkpoint choice, GGUF."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, make_recipe, write_jsonl

from train.core.config import DecodingConfig, recipe_from_dict
from train.core.errors import UserError
from train.evaluation.task_eval import format_eval, load_examples, parse_decoding, run_eval
from train.inference.targets import Target

pytestmark = pytest.mark.e2e

QA_RECIPE = REPO / "recipes" / "tiny" / "qa_context.yaml"


@pytest.fixture(scope="module")
def qa_stage(tmp_path_factory):
    """The tiny QA recipe trained for 60 steps with checkpoints at 20, 40, 60."""
    from train.methods.sft import run_sft

    root = tmp_path_factory.mktemp("qa")
    data = yaml.safe_load(QA_RECIPE.read_text(encoding="utf-8"))
    data["output_dir"] = str(root / "qa")
    data["data"]["processed_dir"] = str(root / "data")
    run_sft(make_recipe(data))
    return root / "qa"


@pytest.fixture(scope="module")
def untrained_adapter(qa_stage, tmp_path_factory):
    """A freshly initialised LoRA (B = 0): the same pipeline and template, nothing learned."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from train.models.loading import peft_lora_config
    from train.models.tiny import ensure_tiny_model

    recipe = recipe_from_dict(json.loads((qa_stage / "stage.json").read_text())["recipe"])
    out = tmp_path_factory.mktemp("untrained")
    get_peft_model(
        AutoModelForCausalLM.from_pretrained(ensure_tiny_model()), peft_lora_config(recipe.lora)
    ).save_pretrained(out)
    return out


def _cfg(qa_stage, **changes):
    cfg = copy.deepcopy(recipe_from_dict(json.loads((qa_stage / "stage.json").read_text())["recipe"]).eval)
    cfg.data = str(REPO / cfg.data)
    cfg.max_examples = 12
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


def test_trained_model_beats_untrained_and_best_checkpoint_is_written(
    qa_stage, untrained_adapter, tmp_path, monkeypatch
):
    import train.evaluation.task_eval as evaluation

    cfg = _cfg(
        qa_stage,
        decodings=[
            DecodingConfig(name="greedy", max_new_tokens=12),
            DecodingConfig(name="beam2", num_beams=2, num_return_sequences=2, max_new_tokens=12),
        ],
    )
    original = evaluation.resolve_targets

    def with_untrained(specs, checkpoints, **kwargs):  # the untrained adapter joins as one more "checkpoint"
        return [Target("untrained", "stage", qa_stage, untrained_adapter)] + original(specs, checkpoints, **kwargs)

    monkeypatch.setattr(evaluation, "resolve_targets", with_untrained)
    report = run_eval([str(qa_stage)], cfg, tmp_path / "eval", checkpoints=True)
    members = report["members"]
    trained, untrained = members["qa (final) | greedy"]["metrics"], members["untrained | greedy"]["metrics"]
    assert trained["f1"] > untrained["f1"] + 0.3, (trained, untrained)
    assert trained["exact_match"] > untrained["exact_match"]
    assert "vote_over_candidates" in members["qa (final) | beam2"]
    assert report["ensemble"]["members"] == 2 * 5  # (untrained, 3 checkpoints, final) x 2 decodings

    best = json.loads((qa_stage / "best_checkpoint.json").read_text())
    assert best == report["best_checkpoint"] and best["metric"] == "f1"
    assert best["score"] == max(best["scores"].values()) and best["best"] != "untrained"
    # among tied best scores the earliest checkpoint wins (scores are listed earliest first)
    assert best["best"] == next(label for label, score in best["scores"].items() if score == best["score"])
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "predictions.jsonl", encoding="utf-8")]
    assert len(rows) == 12 * 10 and all(r["completions"] and "scores" in r for r in rows)
    beam_rows = [r for r in rows if r["member"] == "qa (final) | beam2"]
    assert all(len(r["completions"]) == 2 for r in beam_rows)  # every candidate kept
    assert "ensemble vote (10 members)" in format_eval(report)

    from train.export.merge import merge_stage

    merged = merge_stage(qa_stage, tmp_path / "merged_best", adapter="best", dtype="float32")
    assert merged["adapter"] == best["adapter"]


def test_prompt_variants_are_voted(qa_stage, tmp_path):
    cfg = _cfg(
        qa_stage,
        max_examples=6,
        decodings=[DecodingConfig(name="greedy", max_new_tokens=12)],
        prompt_variants=["{context}{question}", "{context}질문: {question}"],
    )
    report = run_eval([str(qa_stage)], cfg, tmp_path / "eval")
    assert {"qa | greedy | prompt 0", "qa | greedy | prompt 1", "qa | greedy | vote over prompts"} <= set(
        report["members"]
    )
    assert "ensemble" in report  # two members


def test_sampling_returns_seeded_distinct_candidates_and_votes_over_them(qa_stage, tmp_path):
    def sampled(seed, out):
        dec = DecodingConfig(
            name="sc5",
            do_sample=True,
            temperature=1.5,
            top_k=0,
            top_p=1.0,
            num_return_sequences=5,
            max_new_tokens=8,
            seed=seed,
        )
        report = run_eval([str(qa_stage)], _cfg(qa_stage, max_examples=6, decodings=[dec]), tmp_path / out)
        rows = [json.loads(line) for line in open(tmp_path / out / "predictions.jsonl", encoding="utf-8")]
        return report, [[c["text"] for c in r["completions"]] for r in rows]

    report, texts = sampled(7, "a")
    assert len(texts) == 6 and all(len(t) == 5 for t in texts)
    assert any(len(set(t)) > 1 for t in texts), "five samples per prompt all identical: sampling is not on"
    assert "vote_over_candidates" in report["members"]["qa | sc5"]
    assert sampled(7, "b")[1] == texts  # the decoding's seed makes samples reproducible
    assert sampled(8, "c")[1] != texts


def test_eval_data_problems_are_counted_and_written_aside(tmp_path, qa_stage):
    data = write_jsonl(
        tmp_path / "qa.jsonl",
        [
            {"question": "수도는?", "answers": ["서울"]},
            "{broken",
            {"question": "", "answers": ["x"]},
            {"question": "q", "answers": []},
        ],
    )
    examples = load_examples(data, _cfg(qa_stage), tmp_path / "out")
    assert len(examples) == 1 and examples[0]["references"] == ["서울"]
    reasons = [json.loads(line)["reason"] for line in open(tmp_path / "out" / "rejects.jsonl")]
    assert reasons == ["malformed_json", "missing_question", "missing_answer"]
    with pytest.raises(UserError, match="no usable rows"):
        load_examples(write_jsonl(tmp_path / "bad.jsonl", ["{}"]), _cfg(qa_stage), tmp_path / "out2")


def test_decoding_specs_and_recipe_eval_section_are_strict():
    dec = parse_decoding("sc:do_sample=true,top_p=0.9,temperature=0.7,num_return_sequences=5")
    assert dec.name == "sc" and dec.do_sample and dec.top_p == 0.9 and dec.num_return_sequences == 5
    with pytest.raises(UserError, match="did you mean 'num_beams'"):
        parse_decoding("beam:num_beam=3")
    data = yaml.safe_load(QA_RECIPE.read_text(encoding="utf-8"))
    data["eval"]["decodings"][1]["num_beams"] = 1  # 3 candidates from 1 beam without sampling
    with pytest.raises(UserError, match="num_return_sequences"):
        make_recipe(data)
    data["eval"]["primary_metric"] = "bleu"
    with pytest.raises(UserError, match="eval.primary_metric"):
        make_recipe(data)


def test_generate_cli_reads_jsonl_and_writes_candidates(qa_stage, tmp_path):
    questions = write_jsonl(
        tmp_path / "q.jsonl",
        [
            {"question": "대한민국의 수도는 서울이다.\n\n대한민국의 수도는 어디인가요?"},
            {"prompt": "일본의 수도는 도쿄이다.\n\n일본의 수도는 어디인가요?"},
        ],
    )
    out = tmp_path / "answers.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "generate",
            str(qa_stage),
            "--input",
            str(questions),
            "--out",
            str(out),
            "--num-beams",
            "2",
            "--num-return-sequences",
            "2",
            "--max-new-tokens",
            "8",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-1500:]
    rows = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert len(rows) == 2 and all(len(r["completions"]) == 2 for r in rows)
    assert rows[0]["prompt"].startswith("<｜begin▁of▁sentence｜>### Instruction:\n주어진 글을 읽고")
    assert rows[0]["completions"][0]["logprob"] >= rows[0]["completions"][1]["logprob"]  # beams come best first


@pytest.mark.export
def test_eval_runs_on_a_gguf_file(qa_stage, tmp_path):
    from train.export.gguf import export_gguf
    from train.export.merge import merge_stage

    merge_stage(qa_stage, tmp_path / "merged", dtype="float32")
    export = export_gguf(tmp_path / "merged", ["q8_0"])
    gguf = next(p for p in (tmp_path / "merged" / "gguf").glob("*-q8_0.gguf"))
    assert export["files"][gguf.name]["within_tolerance"]
    cfg = _cfg(qa_stage, decodings=[DecodingConfig(name="greedy", max_new_tokens=12)])
    report = run_eval([str(tmp_path / "merged"), str(gguf)], cfg, tmp_path / "eval")
    hf = report["members"]["merged | greedy"]["metrics"]
    llama = report["members"][f"{gguf.name} | greedy"]["metrics"]
    assert hf["f1"] > 0.3 and abs(llama["f1"] - hf["f1"]) <= 0.15, (hf, llama)
    with pytest.raises(UserError, match="no beam search"):
        run_eval([str(gguf)], _cfg(qa_stage, decodings=[DecodingConfig(name="b", num_beams=2)]), tmp_path / "e2")
