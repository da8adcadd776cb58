"""GPU tier (`make test-gpu`, on a machine with CUDA): the shipped GPU settings on the tiny model.

- packed attention is exact on the GPU kernels too (sdpa_packed, stock sdpa, flex attention, flash-attn where
  installed), and flex attention's gradients equal sdpa_packed's;
- Liger's fused kernels give the loss the plain path gives, and QLoRA with them trains;
- the GPU benchmark harness reads the CUDA allocator.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from conftest import make_recipe
from test_training import _sequence_logits

from data_prep.build import load_processed
from train.methods.sft import run_sft
from train.methods.trainers import StageSFTTrainer, build_sft_config
from train.models.loading import load_model_for_training, load_tokenizer, peft_lora_config

pytestmark = pytest.mark.gpu

ATTENTIONS = ["sdpa", "sdpa_packed", "flex_attention"] + (
    ["flash_attention_2"] if importlib.util.find_spec("flash_attn") else []
)


def _to_cuda(batch: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


@pytest.fixture
def gpu_stage1(stage1_dict) -> dict:
    stage1_dict["model"].update({"dtype": "bfloat16", "quantization": "nf4"})
    return stage1_dict


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_packed_equals_unpacked_on_gpu(gpu_stage1, tiny_dir, tmp_path, attention):
    from transformers import AutoModelForCausalLM

    import train.models.attention  # noqa: F401

    recipe = make_recipe(gpu_stage1)
    tokenizer = load_tokenizer(recipe.model)
    train, _, _ = load_processed(recipe, tokenizer, allow_build=True)
    examples = train.select(range(12))
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir, dtype=torch.bfloat16, attn_implementation=attention, device_map={"": 0}
    ).eval()
    logits = {}
    for packing in (True, False):
        r = make_recipe(gpu_stage1, [f"training.packing={packing}", "data.max_length=512"])
        trainer = StageSFTTrainer(
            model=model,
            args=build_sft_config(r, str(tmp_path / str(packing)), False),
            train_dataset=examples,
            processing_class=tokenizer,
        )
        logits[packing] = {}
        for batch in trainer.get_train_dataloader():
            logits[packing].update({k: v.float() for k, v in _sequence_logits(model, _to_cuda(batch)).items()})
    assert logits[True].keys() == logits[False].keys() and len(logits[True]) == 12
    worst = max(float((logits[True][k] - logits[False][k]).abs().max()) for k in logits[True])
    scale = max(float(v.abs().max()) for v in logits[False].values())
    assert worst < 0.02 * scale, f"{attention}: packed vs padded max logit diff {worst} (max logit {scale})"


def test_flex_attention_gradients_equal_sdpa_packed(tiny_dir):
    """The CUDA kernel for packed rows trains like the per-sequence loop (CPU has no flex backward)."""
    from transformers import AutoModelForCausalLM

    import train.models.attention  # noqa: F401

    torch.manual_seed(0)
    lengths = [250, 200, 150]
    ids = torch.randint(10, 2000, (1, sum(lengths)), device="cuda")
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0).cuda()
    cuts = torch.tensor([0, 250, 450, 600], dtype=torch.int32, device="cuda")
    grads, losses = {}, {}
    for attention in ("sdpa_packed", "flex_attention"):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_dir, dtype=torch.float32, attn_implementation=attention, device_map={"": 0}
        )
        extra = {"cu_seq_lens_q": cuts, "cu_seq_lens_k": cuts, "max_length_q": 250, "max_length_k": 250}
        out = model(
            input_ids=ids,
            position_ids=positions,
            labels=ids,
            use_cache=False,
            **(extra if attention == "sdpa_packed" else {}),
        )
        out.loss.backward()
        losses[attention] = float(out.loss)
        grads[attention] = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    assert abs(losses["flex_attention"] - losses["sdpa_packed"]) < 1e-4, losses
    worst = max(
        float((grads["flex_attention"][n] - g).abs().max() / (g.abs().max() + 1e-12))
        for n, g in grads["sdpa_packed"].items()
    )
    assert worst < 1e-3, f"flex vs sdpa_packed gradients differ by {worst:.2e} (relative)"


def test_liger_loss_equals_the_plain_loss(gpu_stage1, tmp_path):
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    gpu_stage1["model"]["attn_implementation"] = "sdpa_packed"
    losses = {}
    for liger in (False, True):  # plain first: Liger patches the Qwen2 classes it touches
        recipe = make_recipe(gpu_stage1, [f"model.use_liger={str(liger).lower()}"])
        tokenizer = load_tokenizer(recipe.model)
        train, _, _ = load_processed(recipe, tokenizer, allow_build=True)
        torch.manual_seed(0)
        trainer = StageSFTTrainer(
            model=load_model_for_training(recipe),
            args=build_sft_config(recipe, str(tmp_path / str(liger)), False),
            train_dataset=train.select(range(16)),
            processing_class=tokenizer,
            peft_config=peft_lora_config(recipe.lora),
        )
        batch = _to_cuda(next(iter(trainer.get_train_dataloader())))
        with torch.no_grad():
            losses[liger] = float(trainer.compute_loss(trainer.model, batch))
        norm = trainer.model.get_base_model().model.norm
        assert (getattr(norm.forward, "__func__", None) is LigerRMSNorm.forward) == liger  # patched only when asked
    assert abs(losses[True] - losses[False]) < 0.02 * abs(losses[False]), losses


def test_qlora_with_liger_and_packed_attention_trains(gpu_stage1):
    gpu_stage1["model"].update({"use_liger": True, "attn_implementation": "sdpa_packed"})
    gpu_stage1["training"].update({"max_steps": 12, "learning_rate": 3e-3, "warmup_steps": 0})
    recipe = make_recipe(gpu_stage1)
    metrics = run_sft(recipe)["metrics"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.5, metrics
    stage = json.load(open(f"{recipe.output_dir}/stage.json"))
    assert stage["quantization"] == "nf4"


def test_gpu_bench_harness_reads_the_allocator():
    from bench.gpu_bench import OURS, run_variant

    run = run_variant(
        {
            "shape": "tiny",
            "distribution": "medical_reasoning",
            "tokens": 512,
            "steps": 4,
            "warmup": 1,
            "rows": 300,
            "path": OURS,
            "attn": "sdpa_packed",
            "liger": True,
        }
    )
    assert run["peak_gb"] > run["weights_gb"] > 0
    assert run["mfu"] is None or 0 < run["mfu"] < 1
