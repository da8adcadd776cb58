"""Training: packing is exact, QLoRA trains on CPU, and a stage continues from its parent's weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_recipe

from data_prep.build import load_processed
from train.methods.sft import run_sft
from train.methods.trainers import StageSFTTrainer, build_sft_config
from train.models.loading import load_model_for_training, load_tokenizer

pytestmark = pytest.mark.e2e


def _sequence_logits(model, batch) -> dict[tuple, torch.Tensor]:
    """Logits of every sequence in a (padded or packed) batch, keyed by its token ids."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    out = {}
    if "attention_mask" in batch:
        for row in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][row].sum())
            out[tuple(batch["input_ids"][row, :n].tolist())] = logits[row, :n]
    else:  # padding-free: one flattened row, sequences start where position_ids restart at 0
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            out[tuple(batch["input_ids"][0, a:b].tolist())] = logits[0, a:b]
    return out


def _summed_loss(model, batches) -> tuple[float, int]:
    total, count = 0.0, 0
    for batch in batches:
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        labels = batch["labels"][:, 1:]
        ce = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="sum", ignore_index=-100
        )
        total += float(ce)
        count += int((labels != -100).sum())
    return total, count


@pytest.mark.parametrize("attention", ["sdpa", "sdpa_packed"])
def test_packed_equals_unpacked_and_sequences_do_not_attend_to_each_other(stage1_dict, tiny_dir, tmp_path, attention):
    from transformers import AutoModelForCausalLM

    recipe = make_recipe(stage1_dict)
    tokenizer = load_tokenizer(recipe.model)
    train, _, _ = load_processed(recipe, tokenizer, allow_build=True)
    examples = train.select(range(12))
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation=attention).eval()
    results = {}
    for packing in (True, False):
        r = make_recipe(stage1_dict, [f"training.packing={packing}", "data.max_length=512"])
        args = build_sft_config(r, str(tmp_path / str(packing)), has_eval=False)
        trainer = StageSFTTrainer(model=model, args=args, train_dataset=examples, processing_class=tokenizer)
        batches = list(trainer.get_train_dataloader())
        if packing:
            assert all("attention_mask" not in b and "position_ids" in b for b in batches)
            assert any((b["position_ids"][0] == 0).sum() > 1 for b in batches), "nothing was packed"
        logits = {}
        for b in batches:
            logits.update(_sequence_logits(model, b))
        results[packing] = (_summed_loss(model, batches), logits)
    (loss_p, n_p), logits_p = results[True]
    (loss_u, n_u), logits_u = results[False]
    # Each packed sequence loses one label (its first token, masked at the boundary): never a completion token.
    assert n_p == n_u
    assert abs(loss_p / n_p - loss_u / n_u) < 1e-5
    assert logits_p.keys() == logits_u.keys() and len(logits_p) == 12
    worst = max(float((logits_p[k] - logits_u[k]).abs().max()) for k in logits_p)
    assert worst < 1e-4, f"packed sequences see each other: max logit diff {worst}"


def test_qlora_4bit_trains_on_cpu(stage1_dict):
    import bitsandbytes as bnb

    stage1_dict["model"]["quantization"] = "nf4"
    stage1_dict["training"].update({"max_steps": 8, "learning_rate": 3e-3, "warmup_steps": 0})
    recipe = make_recipe(stage1_dict)
    model = load_model_for_training(recipe)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    metrics = run_sft(recipe)["metrics"]
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 0.5
    assert (tmp := recipe.output_dir) and json.load(open(f"{tmp}/stage.json"))["quantization"] == "nf4"


def test_qlora_gradients_survive_an_evaluation(stage1_dict):
    """An eval forward must not switch 4-bit layers to another kernel: on CPUs with AVX512-BF16,
    bitsandbytes would repack them for a bf16 inference kernel without a backward, and training after
    an evaluation (eval_steps) would stop passing gradients to the LoRA weights below them. The
    reference is the same model's own gradient before the evaluation, so this holds on any CPU."""
    from peft import get_peft_model

    from train.models.loading import peft_lora_config

    stage1_dict["model"]["quantization"] = "nf4"
    recipe = make_recipe(stage1_dict)
    model = get_peft_model(load_model_for_training(recipe), peft_lora_config(recipe.lora))
    with torch.no_grad():  # LoRA B starts at zero; make every adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    ids = torch.tensor([list(range(5, 37))])

    def step():
        model.train()
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None
        }

    logits_before, grads_before = step()
    model.eval()
    with torch.no_grad():
        eval_logits = model(input_ids=ids, use_cache=False).logits
    logits_after, grads_after = step()
    assert float((eval_logits - logits_before).abs().max()) < 1e-4  # evaluation computes what training does
    assert grads_after.keys() == grads_before.keys() and len(grads_before) == 4 * 7 * 2
    assert all(torch.allclose(grads_after[n], grads_before[n], atol=1e-6) for n in grads_before)


@pytest.fixture(scope="module")
def trained_stage1(tmp_path_factory):
    from conftest import recipe_dict

    root = tmp_path_factory.mktemp("lineage")
    data = copy.deepcopy(recipe_dict("stage1_medical"))
    data["output_dir"] = str(root / "stage1")
    data["data"]["processed_dir"] = str(root / "data1")
    data["data"]["max_length"] = 256
    data["training"].update({"max_steps": 30, "logging_steps": 5, "save_steps": 1000})
    recipe = make_recipe(data)
    run_sft(recipe)
    return recipe, root


def _eval_loss(model, recipe) -> float:
    tokenizer = load_tokenizer(recipe.model)
    _, eval_ds, _ = load_processed(recipe, tokenizer, allow_build=False)
    total, count = 0.0, 0
    model.eval()
    for row in eval_ds:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor(
            [[t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"], strict=True)]]
        )
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + float(out.loss) * n, count + n
    return total / count


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_stage2_continues_from_stage1(trained_stage1, quantization):
    stage1, root = trained_stage1
    info1 = json.load(open(f"{stage1.output_dir}/stage.json"))
    assert info1["parent"] is None and info1["base_model"] == "tiny"
    assert (root / "stage1" / "adapter" / "adapter_model.safetensors").is_file()

    from conftest import recipe_dict

    data = copy.deepcopy(recipe_dict("stage2_korean"))
    data["output_dir"] = str(root / f"stage2-{quantization}")
    data["parent"] = stage1.output_dir
    data["model"]["quantization"] = quantization
    data["data"]["processed_dir"] = str(root / "data2")
    data["data"]["max_length"] = 256
    data["training"].update({"max_steps": 2, "logging_steps": 1})
    stage2 = make_recipe(data)

    base = load_model_for_training(
        make_recipe({**copy.deepcopy(data), "parent": None, "output_dir": str(root / f"base-{quantization}")})
    )
    start = load_model_for_training(stage2)
    base_loss, start_loss = _eval_loss(base, stage1), _eval_loss(start, stage1)
    assert start_loss < base_loss - 1.0, (start_loss, base_loss)
    if quantization == "nf4":  # merged in 16-bit, then quantized again
        assert (root / "stage2-nf4" / "parent_merged" / "config.json").is_file()

    record = run_sft(stage2)
    assert record["parent"] == str((root / "stage1").resolve())
    saved = json.load(open(root / f"stage2-{quantization}" / "stage.json"))
    assert saved["parent"] == record["parent"] and saved["metrics"]["global_steps"] == 2


def test_a_stage_trained_on_another_build_of_the_embedded_model_is_refused(tmp_path):
    from train.core.errors import UserError
    from train.models.lineage import read_stage
    from train.models.tiny import tiny_build_name

    (tmp_path / "stage.json").write_text(json.dumps({"base_model": "tiny", "base_model_build": tiny_build_name()}))
    assert read_stage(tmp_path)["base_model_build"] == tiny_build_name()
    (tmp_path / "stage.json").write_text(json.dumps({"base_model": "tiny", "base_model_build": "tiny-qwen2-0"}))
    with pytest.raises(UserError, match="trained on the embedded model tiny-qwen2-0, but this checkout builds"):
        read_stage(tmp_path)


def test_sdpa_packed_reads_the_boundaries_once_per_batch_not_per_layer():
    """Reading cu_seq_lens to the host syncs a GPU: every layer of one forward must share one read."""
    from train.models.attention import packed_sdpa_forward

    class CountingTensor(torch.Tensor):
        reads = 0

        def tolist(self):
            CountingTensor.reads += 1
            return super().tolist()

    q = torch.randn(1, 4, 7, 8)
    kv = torch.randn(1, 2, 7, 8)
    module = torch.nn.Module().eval()
    first = torch.tensor([0, 3, 7]).as_subclass(CountingTensor)
    outs = [packed_sdpa_forward(module, q, kv, kv, None, cu_seq_lens_q=first)[0] for _ in range(4)]  # 4 "layers"
    assert CountingTensor.reads == 1
    assert all(torch.equal(outs[0], o) for o in outs)
    packed_sdpa_forward(module, q, kv, kv, None, cu_seq_lens_q=torch.tensor([0, 2, 7]).as_subclass(CountingTensor))
    assert CountingTensor.reads == 2  # a new batch's boundaries are read afresh
    # each sequence attends only to itself: the first 3 positions do not change when the rest does
    q2 = q.clone()
    q2[:, :, 3:] = 0
    kv2 = kv.clone()
    kv2[:, :, 3:] = 1
    again = packed_sdpa_forward(module, q2, kv2, kv2, None, cu_seq_lens_q=first)[0]
    assert torch.allclose(again[:, :3], outs[0][:, :3])


def test_flex_attention_masks_packed_sequences_like_sdpa_packed(tiny_dir, stage1_dict):
    """The CUDA kernel option for packed rows: transformers' flex attention builds a per-sequence mask from
    position_ids. Forward logits equal sdpa_packed's here (PyTorch has no flex backward on CPU: gradients
    are compared in the GPU tier), and training with it on a CPU is refused at start-up."""
    from transformers import AutoModelForCausalLM

    from train.core.errors import UserError

    torch.manual_seed(0)
    lengths = [25, 20, 15]
    ids = torch.randint(10, 2000, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    cuts = torch.tensor([0, 25, 45, 60], dtype=torch.int32)
    logits = {}
    for attention in ("sdpa_packed", "flex_attention"):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32, attn_implementation=attention)
        kwargs = {"cu_seq_lens_q": cuts, "cu_seq_lens_k": cuts, "max_length_q": 25, "max_length_k": 25}
        with torch.no_grad():
            logits[attention] = model(
                input_ids=ids, position_ids=positions, use_cache=False, **(kwargs if attention == "sdpa_packed" else {})
            ).logits
    with torch.no_grad():
        alone = model(input_ids=ids[:, 25:45], use_cache=False).logits  # the second sequence by itself
    assert float((logits["flex_attention"] - logits["sdpa_packed"]).abs().max()) < 1e-4
    assert float((logits["flex_attention"][:, 25:45] - alone).abs().max()) < 1e-4  # no attention across sequences
    stage1_dict["model"]["attn_implementation"] = "flex_attention"
    with pytest.raises(UserError, match="flex_attention trains on a CUDA GPU only"):
        load_model_for_training(make_recipe(stage1_dict))
