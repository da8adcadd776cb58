"""Distillation on CPU: the tiny stage-1 teacher, the smaller tiny-student sharing its tokenizer."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from conftest import make_recipe, recipe_dict, train_tiny_stage
from safetensors.torch import load_file

from train.core.errors import UserError

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    train_tiny_stage("stage1_medical", root / "teacher", root / "teacher_data", max_steps=80, logging_steps=20)
    return root / "teacher"


def distill_recipe(teacher: Path, out: Path, data: Path | None = None, **settings):
    d = copy.deepcopy(recipe_dict("distill"))
    d["output_dir"] = str(out)
    d["distill"].update(teacher=str(teacher), **settings)
    d["data"].update(processed_dir=str(data or out.parent / "distill_data"), max_length=256)
    d["training"].update(max_steps=20, logging_steps=1, save_steps=1000)
    return d


def run(d: dict, **training):
    from train.methods.distill import run_distill

    d = copy.deepcopy(d)
    d["training"].update(training)
    return run_distill(make_recipe(d))


def logged(out: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def distilled(teacher) -> Path:
    out = teacher.parent / "student"
    run(distill_recipe(teacher, out))
    return out


def test_distill_kl_falls_and_the_stage_records_its_teacher(distilled, teacher):
    record = json.loads((distilled / "stage.json").read_text())
    m = record["metrics"]
    divergence = logged(distilled, "teacher_divergence")
    assert len(divergence) == 20
    assert sum(divergence[-5:]) / 5 < 0.7 * sum(divergence[:5]) / 5, divergence  # the KL to the teacher falls
    assert record["method"] == "distill" and record["base_model"] == "tiny-student"
    assert m["distill"]["teacher"] == str(teacher) and m["distill"]["teacher_chain"] == [str(teacher.resolve())]
    assert (
        m["distill"]["mode"] == "logit" and m["distill"]["top_k"] == 32 and len(m["distill"]["teacher_identity"]) == 16
    )
    agreement = m["teacher_agreement"]["student"]
    assert agreement["token_kl_to_teacher"] > 0 and 0 <= agreement["answer_char_f1_to_teacher"] <= 1


@pytest.mark.export
def test_distilled_stage_merges_exports_and_evaluates_like_any_other(distilled, tmp_path):
    from train.core.config import DecodingConfig, EvalConfig
    from train.core.paths import REPO_ROOT
    from train.evaluation.task_eval import run_eval
    from train.export.gguf import export_gguf
    from train.export.merge import merge_stage

    report = merge_stage(distilled, tmp_path / "merged", dtype="float32")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["num_hidden_layers"] == 2  # the student
    assert report["merged_vs_base_plus_adapter"]["max_abs_diff"] < 1e-4, report
    assert report["adapter_effect"]["max_abs_diff"] > 0 and report["lineage"] == [str(distilled.resolve())]
    q8 = export_gguf(tmp_path / "merged", ["q8_0"])["files"]["student-q8_0.gguf"]  # named after the stage
    assert q8["tokenization_identical"] and q8["within_tolerance"] and q8["chat"]["template_renders_identically"]
    cfg = EvalConfig(
        data=str(REPO_ROOT / "data_prep/samples/medical_eval_sample.jsonl"),
        decodings=[DecodingConfig(name="greedy", max_new_tokens=16)],
        max_examples=2,
    )
    members = run_eval([str(distilled)], cfg, tmp_path / "eval")["members"]
    assert len(members) == 1 and next(iter(members.values()))["metrics"]["examples"] == 2


def test_cached_teacher_logits_give_the_live_loss(teacher, distilled, monkeypatch):
    import train.models.teacher as teacher_module

    root = teacher.parent
    live, cached = root / "live", root / "cached"
    run(distill_recipe(teacher, live, report_prompts=0), max_steps=4)
    run(distill_recipe(teacher, cached, report_prompts=0, teacher_logits="cached"), max_steps=4)
    a, b = logged(live), logged(cached)
    assert len(a) == len(b) == 4 and max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4, (a, b)
    x = load_file(live / "adapter" / "adapter_model.safetensors")
    y = load_file(cached / "adapter" / "adapter_model.safetensors")
    assert x.keys() == y.keys() and max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-4
    index = json.loads((cached / "teacher_cache" / "index.json").read_text())
    assert index["shards"] >= 1 and index["meta"]["top_k"] == 32 and len(index["rows"]) > 100
    # Another run with the complete cache reuses it: the teacher is never loaded.
    shutil.copytree(cached / "teacher_cache", root / "cached2" / "teacher_cache")
    monkeypatch.setattr(teacher_module, "load_teacher", lambda *a, **k: pytest.fail("teacher loaded again"))
    run(distill_recipe(teacher, root / "cached2", report_prompts=0, teacher_logits="cached"), max_steps=4)
    assert logged(root / "cached2") == b


def test_distilled_student_agrees_with_the_teacher_more_than_raw_sft(distilled, teacher):
    from train.methods.distill_report import run_report

    raw = teacher.parent / "raw_sft"
    d = copy.deepcopy(recipe_dict("stage1_medical"))
    d.update(output_dir=str(raw))
    d["model"]["name_or_path"] = "tiny-student"
    d["data"].update(processed_dir=str(teacher.parent / "raw_data"), max_length=256)
    d["training"].update(max_steps=20, logging_steps=5, save_steps=1000)
    from train.methods.sft import run_sft

    run_sft(make_recipe(d))
    report = run_report(str(distilled), [str(raw)], prompts=8)
    assert report["distilled"]["token_kl_to_teacher"] < report["raw_sft"]["token_kl_to_teacher"], report
    assert report["distilled"]["answer_char_f1_to_teacher"] > report["raw_sft"]["answer_char_f1_to_teacher"], report
    assert (distilled / "distill_report.md").read_text().count("|") > 20


def test_sequence_distillation_keeps_checked_answers_and_resumes(teacher, tmp_path, monkeypatch):
    import train.models.teacher as teacher_module
    from train.methods.distill_sequence import ANSWERS, DATA_DIR

    d = distill_recipe(teacher, tmp_path / "seq", mode="sequence", max_new_tokens=160, report_prompts=0)
    record = run(d, max_steps=2)
    answers = (tmp_path / "seq" / ANSWERS).read_text().splitlines()
    manifest = json.loads((tmp_path / "seq" / DATA_DIR / "manifest.json").read_text())
    rejected = manifest["teacher_rejected"]
    assert len(answers) == manifest["teacher_answers"] == manifest["train_rows"] + sum(rejected.values())
    assert set(rejected) <= {"unfinished", "no_closed_think", "too_long", "wrong_answer"} and manifest["train_rows"] > 0
    rejects = (tmp_path / "seq" / DATA_DIR / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == sum(rejected.values()) and all("reason" in json.loads(r) for r in rejects)
    assert record["metrics"]["distill"]["mode"] == "sequence"

    # Interrupted after 5 answers: a rerun keeps them and asks the teacher only for the rest.
    (tmp_path / "seq2").mkdir()
    (tmp_path / "seq2" / ANSWERS).write_text("\n".join(answers[:5]) + "\n")
    calls = []
    real = teacher_module.load_teacher
    monkeypatch.setattr(teacher_module, "load_teacher", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(d | {"output_dir": str(tmp_path / "seq2")}, max_steps=1)
    again = (tmp_path / "seq2" / ANSWERS).read_text().splitlines()
    assert again[:5] == answers[:5] and len(again) == len(answers) and calls
    assert sorted(again) == sorted(answers)  # greedy: the same answers, whichever run wrote them


def test_distill_refusals(teacher, tmp_path, tokenizer):
    with pytest.raises(UserError, match="distill.teacher"):
        make_recipe(distill_recipe(teacher, tmp_path / "x") | {"distill": {"teacher": None}})
    with pytest.raises(UserError, match="teacher_logits: live"):
        make_recipe(distill_recipe(teacher, tmp_path / "x", on_policy=0.5, teacher_logits="cached"))
    with pytest.raises(UserError, match="packing: false"):
        make_recipe(distill_recipe(teacher, tmp_path / "x", on_policy=0.5))

    from transformers import AutoModelForCausalLM

    from train.models.tiny import ensure_tiny_model

    other = tmp_path / "other_family"  # the same weights, a tokenizer with one token more
    AutoModelForCausalLM.from_pretrained(ensure_tiny_model()).save_pretrained(other)
    changed = copy.deepcopy(tokenizer)
    changed.add_tokens(["<extra_token>"])
    changed.save_pretrained(other)
    with pytest.raises(UserError, match="tokenizes differently.*distill.mode: sequence"):
        run(distill_recipe(other, tmp_path / "y"), max_steps=1)
    with pytest.raises(UserError, match="generation_backend: vllm needs"):  # CPU, no vLLM: one line, the fix
        run(distill_recipe(teacher, tmp_path / "z", mode="sequence", generation_backend="vllm"), max_steps=1)


def test_on_policy_distillation_trains_on_the_students_own_answers(teacher, tmp_path):
    d = distill_recipe(teacher, tmp_path / "onp", on_policy=1.0, max_new_tokens=16, report_prompts=0)
    d["training"]["packing"] = False
    record = run(d, max_steps=3)
    divergence = logged(tmp_path / "onp", "teacher_divergence")
    assert len(divergence) == 3 and all(v > 0 for v in divergence)
    assert logged(tmp_path / "onp", "on_policy") == [1.0, 1.0, 1.0]  # every batch was the student's own answers
    assert record["metrics"]["distill"]["on_policy"] == 1.0


def test_a_4bit_teacher_stage_is_merged_once_then_quantized(teacher, tmp_path):
    from train.models.teacher import load_teacher

    model = load_teacher(str(teacher), "nf4", tmp_path)
    merged = tmp_path / "teacher_merged"
    assert (merged / "teacher.json").is_file() and (merged / "tokenizer.json").is_file()  # vLLM loads it too
    assert sum("4bit" in type(m).__name__ for m in model.modules()) == 4 * 7  # every projection in 4-bit
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    written = (merged / "model.safetensors").stat().st_mtime_ns
    load_teacher(str(teacher), "nf4", tmp_path)
    assert (merged / "model.safetensors").stat().st_mtime_ns == written  # the same teacher: not merged again
