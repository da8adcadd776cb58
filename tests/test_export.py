"""Merge (LoRA chain -> 16-bit safetensors) and GGUF export (llama.cpp), with their parity checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, make_recipe, recipe_dict, train_tiny_stage

from train.core.errors import UserError
from train.export.merge import merge_stage
from train.export.parity import text_logits

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """stage 1 (float32) -> stage 2 (QLoRA NF4, so its parent is merged then quantized), briefly trained."""
    root = tmp_path_factory.mktemp("export")
    train_tiny_stage("stage1_medical", root / "stage1", root / "data1", max_steps=10, logging_steps=5)
    train_tiny_stage(
        "stage2_korean",
        root / "stage2",
        root / "data2",
        parent=root / "stage1",
        model={"quantization": "nf4"},
        max_steps=6,
        logging_steps=3,
    )
    return root


@pytest.fixture(scope="module")
def merged(lineage):
    """Stage 2 merged the default way (bf16, original base weights)."""
    merge_stage(lineage / "stage2", lineage / "merged", license_id="apache-2.0")
    return lineage / "merged"


@pytest.fixture(scope="module")
def merged32(lineage):
    merge_stage(lineage / "stage2", lineage / "merged32", dtype="float32")
    return lineage / "merged32"


def _logits(model_dir_or_model, tokenizer, texts):
    from transformers import AutoModelForCausalLM

    model = model_dir_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    return text_logits(model.eval(), tokenizer, texts)


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


TEXTS = ["당뇨병의 진단 기준은 무엇입니까?", "A 45-year-old man has chest pain. Diagnosis?"]


def test_merge_chain_equals_base_plus_every_adapter_in_order(lineage, merged32, tokenizer, tiny_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.inference.hf import load_stage_model

    report = json.loads((merged32 / "merge_report.json").read_text())
    assert report["merged_vs_base_plus_adapter"]["relative_diff"] < 1e-4
    assert report["adapter_effect"]["max_abs_diff"] > 0.1  # the adapter really changed the model
    assert report["lineage"] == [str(lineage / "stage1"), str(lineage / "stage2")]

    merged = _logits(merged32, tokenizer, TEXTS)
    stage_model, _, _ = load_stage_model(lineage / "stage2")  # base + stage-1 adapter + stage-2 adapter
    assert _max_diff(merged, _logits(stage_model, tokenizer, TEXTS)) < 1e-4
    # Only the last adapter, or the two in the wrong order of lineage, is a different model.
    last_only = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32), str(lineage / "stage2" / "adapter")
    ).merge_and_unload()
    assert _max_diff(merged, _logits(last_only, tokenizer, TEXTS)) > 0.1


def test_merged_folder_is_complete_and_prompts_like_training(merged):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from train.core.formats import render_prompt

    out = merged
    report = json.loads((out / "merge_report.json").read_text())
    assert report["dtype"] == "bfloat16" and report["merged_vs_base_plus_adapter"]["relative_diff"] <= 0.02
    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    assert "quantization_config" not in json.loads((out / "config.json").read_text())  # 16-bit, not 4-bit
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert GenerationConfig.from_pretrained(out).eos_token_id == tokenizer.eos_token_id
    # A reasoning-template stage gets a chat template that renders its training prompt.
    recipe = make_recipe(recipe_dict("stage2_korean"))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "흉통?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == render_prompt("흉통?", recipe.data.system_prompt, "reasoning", tokenizer)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "license: apache-2.0" in card and "base_model: tiny" in card
    assert card.index("### stage1_medical") < card.index("### stage2_korean")
    assert json.loads((out / "merge_report.json").read_text())["files"]["model.safetensors"] > 0


def test_dequantize_merges_into_the_weights_training_saw(lineage, merged32, tokenizer):
    """Stage 2 trained on NF4 weights: --dequantize reproduces that model; the original weights differ."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.models.loading import pin_4bit_cpu_path, quantization_config

    recipe = make_recipe(json.loads((lineage / "stage2" / "stage.json").read_text())["recipe"])
    base = AutoModelForCausalLM.from_pretrained(
        lineage / "stage2" / "parent_merged", dtype=torch.float32, quantization_config=quantization_config(recipe.model)
    )
    pin_4bit_cpu_path(base)  # the 4-bit path training ran on (as load_model_for_training loads it), on any CPU
    trained = PeftModel.from_pretrained(base, str(lineage / "stage2" / "adapter"))
    reference = _logits(trained, tokenizer, TEXTS)
    merge_stage(lineage / "stage2", lineage / "merged_dq", dtype="float32", dequantize=True)
    dequantized = _max_diff(reference, _logits(lineage / "merged_dq", tokenizer, TEXTS))
    original = _max_diff(reference, _logits(merged32, tokenizer, TEXTS))
    assert dequantized < 1e-3 < original


def test_merge_refuses_to_replace_what_it_did_not_write(lineage, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="was not written by this command"):
        merge_stage(lineage / "stage2", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="would replace the stage itself"):
        merge_stage(lineage / "stage2", lineage / "stage2")
    with pytest.raises(UserError, match="no LoRA adapter"):
        merge_stage(lineage / "stage2", tmp_path / "x", adapter=tmp_path)


def test_push_to_hub_uploads_through_the_real_client_and_never_shows_the_token(lineage, merged, tmp_path):
    from fake_hub import FakeHub

    sentinel = "hf_SENTINEL_export_0123456789"
    out = tmp_path / "pushed"
    with FakeHub() as hub:
        env = {**os.environ, "HF_TOKEN": sentinel, "HF_ENDPOINT": hub.endpoint, "OMP_NUM_THREADS": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "train",
                "merge",
                str(lineage / "stage2"),
                "--out",
                str(out),
                "--push-to-hub",
                "team/med-ko",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        uploaded = hub.committed_files()
        auth = {r["authorization"] for r in hub.requests if r["method"] == "POST"}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "merge_report.json"} <= set(uploaded)
    assert uploaded["model.safetensors"] == (out / "model.safetensors").stat().st_size
    assert auth == {f"Bearer {sentinel}"}
    assert sentinel not in proc.stdout + proc.stderr
    assert not [p for p in out.rglob("*") if p.is_file() and sentinel.encode() in p.read_bytes()]


def test_push_to_hub_without_a_token_fails_before_any_work(lineage, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "merge",
            str(lineage / "stage2"),
            "--out",
            str(tmp_path / "m"),
            "--push-to-hub",
            "team/x",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "HF_TOKEN" in proc.stderr and not (tmp_path / "m").exists()


# --- GGUF (needs the export extra: make install-export) ------------------------------------------


@pytest.mark.export
def test_gguf_export_matches_transformers(merged):
    from train.export.gguf import export_gguf

    report = export_gguf(merged, ["f16", "q8_0", "q4_k_m"])
    files = report["files"]
    assert set(files) == {"stage2-f16.gguf", "stage2-q8_0.gguf", "stage2-q4_k_m.gguf"}
    for name, entry in files.items():
        assert (merged / "gguf" / name).stat().st_size == entry["bytes"]
        assert entry["tokenization_identical"], entry["tokenization_mismatches"]
        assert entry["chat_template_in_metadata"] and entry["eos_in_metadata"] and entry["within_tolerance"]
        assert entry["chat"]["template_renders_identically"] and entry["pre_tokenizer"] == "qwen2"
    assert files["stage2-f16.gguf"]["vs_merged"]["relative_diff"] < 0.01
    assert files["stage2-f16.gguf"]["vs_merged"]["argmax_agreement"] >= 0.95
    q4 = files["stage2-q4_k_m.gguf"]
    assert q4["fallback_tensors"] == {} and q4["tensor_types"]["Q4_K"] >= 20 and "F16" not in q4["tensor_types"]
    assert files["stage2-q8_0.gguf"]["tensor_types"].keys() == {"Q8_0", "F32"}
    assert files["stage2-f16.gguf"]["bytes"] > files["stage2-q8_0.gguf"]["bytes"] > q4["bytes"]
    assert q4["vs_transformers_same_file"]["relative_diff"] <= 0.05
    card = (merged / "gguf" / "README.md").read_text(encoding="utf-8")
    assert "stage2-q4_k_m.gguf" in card and "### stage1_medical" in card


@pytest.mark.export
def test_q4_k_m_fallback_on_small_rows_is_reported(tmp_path, tiny_dir):
    """Rows of 64 values cannot hold a 256-value k-quant block: llama.cpp falls back; we say so."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from train.export.gguf import export_gguf

    config = AutoConfig.from_pretrained(
        tiny_dir,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "narrow")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path / "narrow")
    report = export_gguf(tmp_path / "narrow", ["q4_k_m"])
    (entry,) = report["files"].values()
    fallback = entry["fallback_tensors"]
    # every 2-D weight: 7 per layer, the embedding and the output head
    assert len(fallback) == 7 * config.num_hidden_layers + 2 and set(fallback.values()) == {"Q5_0", "Q8_0"}
    assert entry["within_tolerance"] and entry["tokenization_identical"]


@pytest.mark.export
def test_converter_still_refuses_a_tokenizer_it_cannot_identify(merged, tmp_path):
    """The wrapper answers 'qwen2' only for Qwen2's exact split; any other unknown tokenizer fails as upstream."""
    import shutil

    from train.export.gguf import export_gguf

    odd = tmp_path / "odd"
    shutil.copytree(merged, odd, ignore=shutil.ignore_patterns("gguf"))
    tok = json.loads((odd / "tokenizer.json").read_text(encoding="utf-8"))
    tok["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+|[^\w\s]+"
    (odd / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(UserError, match="pre-tokenizer was not recognized"):
        export_gguf(odd, ["f16"])
    assert not (odd / "gguf").exists()


def test_export_input_errors_name_the_problem(tmp_path, merged):
    from train.export.gguf import export_gguf, find_llama_cpp

    with pytest.raises(UserError, match="not a merged model folder"):
        export_gguf(tmp_path, ["f16"])
    with pytest.raises(UserError, match=r"--gguf q3_weird: choose from"):
        export_gguf(merged, ["q3_weird"])
    with pytest.raises(UserError, match="no convert_hf_to_gguf.py there"):
        find_llama_cpp(str(tmp_path))
