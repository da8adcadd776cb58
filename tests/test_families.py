"""Model families: tiny Llama, Mistral, Gemma-3, Qwen3 and GPT-2 (train/models/tiny.py, same tokenizer as the
embedded Qwen2) through data_prep -> SFT LoRA -> QLoRA NF4 child -> merge (parity) -> GGUF q8_0 (parity,
tokenization) -> eval; and, without training, what makes them work: PEFT's all-linear default, the launch
estimates on configs without Qwen2's names, the FSDP wrap class taken from the model, Qwen3's chat template."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_recipe, recipe_dict

from train.core.config import (
    TINY_FAMILIES,
    TINY_GEMMA3,
    TINY_GPT2,
    TINY_LLAMA,
    TINY_MISTRAL,
    TINY_MODEL,
    TINY_QWEN3,
    DecodingConfig,
    LoraConfig,
)
from train.core.errors import UserError

# What PEFT's all-linear adapts in each family (module names inside a decoder block), and llama.cpp's name
# for the architecture (Mistral converts as llama).
LLAMA_STYLE = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TARGETS = {name: LLAMA_STYLE for name in (TINY_MODEL, *TINY_FAMILIES)} | {TINY_GPT2: {"c_attn", "c_proj", "c_fc"}}
GGUF_ARCH = {TINY_LLAMA: "llama", TINY_MISTRAL: "llama", TINY_GEMMA3: "gemma3", TINY_QWEN3: "qwen3", TINY_GPT2: "gpt2"}
DECODER_LAYER = {
    TINY_MODEL: "Qwen2DecoderLayer",
    TINY_LLAMA: "LlamaDecoderLayer",
    TINY_MISTRAL: "MistralDecoderLayer",
    TINY_GEMMA3: "Gemma3DecoderLayer",
    TINY_QWEN3: "Qwen3DecoderLayer",
    TINY_GPT2: "GPT2Block",
}


def _peft_model(name: str, lora: LoraConfig):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from train.models.loading import peft_lora_config
    from train.models.tiny import ensure_tiny_model

    return get_peft_model(AutoModelForCausalLM.from_pretrained(ensure_tiny_model(name)), peft_lora_config(lora))


def _adapted(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


# --- without training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [TINY_MODEL, *TINY_FAMILIES])
def test_all_linear_default_adapts_every_family_and_the_estimates_agree(name):
    """A recipe naming no target_modules gets PEFT's all-linear: every family (GPT-2's Conv1D too) gets its
    adapters without knowing its layer names, and the start-up disk estimate counts exactly those parameters."""
    from transformers.pytorch_utils import Conv1D

    from train.methods.launch import parameter_count
    from train.methods.memory import activation_bytes_per_token, lora_parameters
    from train.methods.reliability import lora_parameter_estimate

    lora = make_recipe(recipe_dict("qa_context")).lora  # it names no target_modules
    assert lora.target_modules == ["all-linear"]
    model = _peft_model(name, lora)
    assert _adapted(model) == TARGETS[name]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.config
    assert lora_parameter_estimate(config, lora) == trainable == lora_parameters(config, lora.r)
    decoder, _ = parameter_count(config)  # linear weights and norms, biases left out
    real = sum(p.numel() for n, p in model.base_model.model.named_parameters() if ".h." in n or ".layers." in n)
    assert 0.97 < decoder / (real - trainable) <= 1.0
    assert activation_bytes_per_token(config) > 0
    if name == TINY_GPT2:  # PEFT adapts the Conv1D layers, transposed as PEFT knows
        layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        assert all(isinstance(m.base_layer, Conv1D) and m.fan_in_fan_out for m in layers)


def test_explicit_target_lists_still_work_and_all_linear_is_not_mixed():
    from train.methods.reliability import lora_parameter_estimate

    data = recipe_dict("qa_context")
    data["model"]["name_or_path"] = TINY_LLAMA
    lora = make_recipe(data, ["lora.target_modules=[q_proj,v_proj]"]).lora
    model = _peft_model(TINY_LLAMA, lora)
    assert _adapted(model) == {"q_proj", "v_proj"}
    assert lora_parameter_estimate(model.config, lora) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    gpt2 = _peft_model(TINY_GPT2, LoraConfig(target_modules=["c_attn"]))
    assert _adapted(gpt2) == {"c_attn"} and lora_parameter_estimate(gpt2.config, LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(UserError, match=r"lora.target_modules .* mixes 'all-linear' with layer names"):
        make_recipe(data, ["lora.target_modules=[all-linear,q_proj]"])


@pytest.mark.parametrize("name", [TINY_MODEL, *TINY_FAMILIES])
def test_shipped_fsdp_config_wraps_each_familys_decoder_layer(name):
    """accelerate_configs/fsdp.yaml names no wrap class: accelerate's own FSDP2 policy then wraps the model's
    `_no_split_modules`, one unit per decoder layer, for every family (a Qwen2 class name broke all others)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    fsdp = yaml.safe_load((REPO / "accelerate_configs" / "fsdp.yaml").read_text(encoding="utf-8"))["fsdp_config"]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"],
        transformer_cls_names_to_wrap=fsdp.get("fsdp_transformer_layer_cls_to_wrap"),
    )
    model = _peft_model(name, LoraConfig())
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
    assert wrapped == [DECODER_LAYER[name]] * model.config.num_hidden_layers


def test_fsdp_wrap_class_the_model_lacks_is_refused_at_start_up(stage1_dict, monkeypatch):
    from train.methods.launch import Launch, check_launch

    llama = copy.deepcopy(stage1_dict)
    llama["model"]["name_or_path"] = TINY_LLAMA
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "Qwen2DecoderLayer")
    with pytest.raises(UserError, match=r"names Qwen2DecoderLayer, which tiny-llama does not have .*LlamaDecoderLayer"):
        check_launch(make_recipe(llama), Launch("fsdp", 2))
    check_launch(make_recipe(stage1_dict), Launch("fsdp", 2))  # the Qwen2 default has it
    check_launch(make_recipe(llama), Launch("ddp", 2))  # only FSDP wraps
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer")
    check_launch(make_recipe(llama), Launch("fsdp", 2))
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP")
    check_launch(make_recipe(llama), Launch("fsdp", 2))  # unset: accelerate takes _no_split_modules


def test_check_launch_refuses_the_configs_wrap_class_before_the_launch(tmp_path, capsys):
    """`python -m train check-launch --config-file` (what make train runs first) reads the config's wrap class."""
    from train.cli import main

    config = tmp_path / "fsdp_qwen2.yaml"
    config.write_text(
        "distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 2\n  fsdp_transformer_layer_cls_to_wrap: Qwen2DecoderLayer\n"
    )
    recipe = str(REPO / "recipes" / "tiny" / "stage1_medical.yaml")
    args = ["check-launch", recipe, f"model.name_or_path={TINY_GPT2}", f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--strategy", "fsdp", "--processes", "2", "--config-file", str(config)])
    assert exit_info.value.code == 2 and "set it to GPT2Block" in capsys.readouterr().err


def test_families_share_the_tokenizer_and_qwen3_templates_as_qwen3_does():
    """Same tokenizer files (so processed data is comparable); tiny-qwen3's chat template renders exactly what
    Qwen3's own does (TRL's copy, qwen3.jinja), with the tokenizer's EOS where Qwen3 ends a turn."""
    from pathlib import Path as P

    import trl
    from transformers import AutoTokenizer

    from train.models.tiny import ensure_tiny_model

    text = "당뇨병의 진단 기준은? <think>\n공복 혈당</think> A 45-year-old man's chest pain 123,456"
    base = AutoTokenizer.from_pretrained(ensure_tiny_model(TINY_MODEL))
    for name in TINY_FAMILIES:
        folder = ensure_tiny_model(name)
        assert (folder / "tokenizer.json").read_bytes() == (
            ensure_tiny_model(TINY_MODEL) / "tokenizer.json"
        ).read_bytes()
        tok = AutoTokenizer.from_pretrained(folder)
        assert tok(text)["input_ids"] == base(text)["input_ids"] and tok.eos_token_id == base.eos_token_id

    qwen3 = AutoTokenizer.from_pretrained(ensure_tiny_model(TINY_QWEN3))
    reference = (P(trl.__file__).parent / "chat_templates" / "qwen3.jinja").read_text(encoding="utf-8")
    chats = [
        [{"role": "user", "content": "Q1"}],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>\nold reasoning\n</think>\n\nA1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "<think>r2</think>A2"},
        ],
        [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2", "reasoning_content": "why"},
        ],
    ]
    for chat in chats:
        for generation_prompt in (False, True):
            for thinking in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
                ours = qwen3.apply_chat_template(
                    chat, tokenize=False, add_generation_prompt=generation_prompt, **thinking
                )
                theirs = qwen3.apply_chat_template(
                    chat, tokenize=False, add_generation_prompt=generation_prompt, chat_template=reference, **thinking
                )
                assert ours == theirs.replace("<|im_end|>", qwen3.eos_token)
    history = qwen3.apply_chat_template(chats[1], tokenize=False)
    assert "old reasoning" not in history and "<think>\nr2\n</think>\n\nA2" in history  # only the last turn's
    assert qwen3.apply_chat_template(
        chats[0], tokenize=False, add_generation_prompt=True, enable_thinking=False
    ).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    masked = qwen3.apply_chat_template(chats[1], return_dict=True, return_assistant_tokens_mask=True)
    kept = [t for t, keep in zip(masked["input_ids"], masked["assistant_masks"], strict=True) if keep]
    assert qwen3.decode(kept) == f"A1{qwen3.eos_token}\n<think>\nr2\n</think>\n\nA2{qwen3.eos_token}\n"


# --- the pipeline, per family ----------------------------------------------------------------------------


def _stage(root: Path, name: str, stage: str, quantization: str, parent: Path | None = None):
    """The tiny QA recipe on family `name`, a few steps; no lora.target_modules (the all-linear default)."""
    data = copy.deepcopy(recipe_dict("qa_context"))
    data.update(output_dir=str(root / name / stage), parent=str(parent) if parent else None)
    data["model"].update(name_or_path=name, quantization=quantization)
    assert "target_modules" not in data["lora"]
    # Families with the very same tokenizer files share one processed dataset (its fingerprint covers the
    # tokenizer and chat template); tiny-qwen3's template differs, so it prepares its own.
    shared = "data-qwen3" if name == TINY_QWEN3 else "data"
    data["data"].update(processed_dir=str(root / shared), max_length=128)
    data["training"].update(
        max_steps=3 if quantization == "none" else 2, save_steps=1000, logging_steps=1, per_device_train_batch_size=2
    )
    return make_recipe(data)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.mark.e2e
@pytest.mark.export
@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_family_trains_merges_exports_and_evaluates(name, root):
    from data_prep.build import build, fingerprint, processed_state
    from train.evaluation.task_eval import run_eval
    from train.export.gguf import export_gguf, gguf_contents
    from train.export.merge import merge_stage
    from train.methods.sft import run_sft
    from train.models.loading import load_tokenizer

    # data_prep, once per tokenizer: a family sharing the files finds the data fresh
    lora_recipe = _stage(root, name, "lora", "none")
    tokenizer = load_tokenizer(lora_recipe.model)
    if processed_state(lora_recipe, tokenizer) != "fresh":
        build(lora_recipe, tokenizer)
    manifest = json.loads((Path(lora_recipe.data.processed_dir) / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["fingerprint"] == fingerprint(lora_recipe, tokenizer) and manifest["train_rows"] > 0

    # SFT LoRA (all-linear), then a QLoRA NF4 child: its parent merged in 16-bit, then quantized again
    lora = run_sft(lora_recipe)
    qlora = run_sft(_stage(root, name, "qlora", "nf4", parent=root / name / "lora"))
    for record in (lora, qlora):
        assert record["metrics"]["global_steps"] >= 2 and record["metrics"]["train_loss"] > 0
    adapter = json.loads((root / name / "qlora" / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    assert {t.rsplit(".", 1)[-1] for t in adapter["target_modules"]} == TARGETS[name]

    # merge: the streamed merge equals base + both adapters (merge_stage refuses beyond the tolerance)
    merged = root / name / "merged"
    report = merge_stage(root / name / "qlora", merged, dtype="float32")
    assert report["merged_vs_base_plus_adapter"]["relative_diff"] <= 1e-4
    assert report["adapter_effect"]["max_abs_diff"] > 0  # and the adapters did change the model
    # --dequantize: into the NF4 weights the child trained against (GPT-2's Conv1D layers were Linear4bit then)
    dequantized = merge_stage(root / name / "qlora", root / name / "merged-dq", dtype="float32", dequantize=True)
    assert dequantized["dequantized_base"] and dequantized["merged_vs_base_plus_adapter"]["relative_diff"] <= 1e-4

    # GGUF q8_0 through llama.cpp: tokenization, logits, chat template and EOS checked (export_gguf refuses on failure)
    export = export_gguf(merged, ["q8_0"])
    (file_name, entry), *_ = export["files"].items()
    assert entry["tokenization_identical"] and entry["within_tolerance"] and entry["pre_tokenizer"] == "qwen2"
    assert entry["chat_template_in_metadata"] and entry["eos_in_metadata"]
    assert entry["chat"]["template_renders_identically"]
    assert entry["fallback_tensors"] == {} and entry["tensor_types"]["Q8_0"] >= 4 * 4 + 1
    gguf = merged / "gguf" / file_name
    assert gguf_contents(gguf)["architecture"] == GGUF_ARCH[name]

    # eval: the stage (base + adapters, transformers) and the GGUF file (llama.cpp) on two QA rows
    cfg = copy.deepcopy(lora_recipe.eval)
    cfg.data, cfg.max_examples = str(REPO / cfg.data), 2
    cfg.decodings = [DecodingConfig(name="greedy", max_new_tokens=4)]
    members = run_eval([str(root / name / "qlora"), str(gguf)], cfg, root / name / "eval")["members"]
    assert [m["metrics"]["examples"] for m in members.values()] == [2, 2]
