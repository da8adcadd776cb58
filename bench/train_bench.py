"""Training-step benchmarks on CPU, each against a plain baseline measured in the same run.

    python -m bench.train_bench            (make bench runs it)

1. Padding efficiency (real tokens / token slots) of our padding-free packing vs padding to the
   batch's longest row and to max_length, on two length distributions: medical reasoning (long
   chain-of-thought tail) and KoCommercial-shaped instructions.
2. Effective (non-pad) tokens/s of our training step (TRL SFTTrainer, padding-free packing) vs a plain
   Transformers `Trainer` + PEFT with padding to the batch's longest row. Same tiny model, same rows,
   same LoRA, same machine; runs alternated; median over rounds; the first steps of every run are
   warm-up and not timed.
3. Peak RSS of one loss step at Qwen's real vocabulary (152,064) with a tiny hidden size: TRL's loss
   path (no full-vocabulary logits) vs the plain forward with labels (fp32 logits for every token).
   Each in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def lengths(kind: str, n: int, max_length: int, seed: int = 0) -> list[int]:
    """Token lengths shaped like each dataset (log-normal body, clipped to max_length)."""
    rng = np.random.default_rng(seed)
    if kind == "medical_reasoning":  # long <think> tail: p50 ~ 0.17, p99 ~ 0.8 of max_length
        raw = rng.lognormal(mean=np.log(0.17 * max_length), sigma=0.65, size=n)
    else:  # kocommercial: short instructions, p50 ~ 0.06 of max_length
        raw = rng.lognormal(mean=np.log(0.06 * max_length), sigma=0.7, size=n)
    return [int(x) for x in np.clip(raw, 16, max_length)]


def padding_efficiency(lens: list[int], max_length: int, batch: int) -> dict:
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    real = sum(lens)
    rng = np.random.default_rng(1)
    order = rng.permutation(len(lens))
    longest = sum(
        max(lens[j] for j in order[i : i + batch]) * len(order[i : i + batch]) for i in range(0, len(order), batch)
    )
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    ds = Dataset.from_dict({"input_ids": [[1] * n for n in lens]})
    packed = pack_dataset(ds, max_length, "bfd")
    n_packs = len(packed)
    packed_tokens = sum(len(x) for x in packed["input_ids"])
    # Slots as TRL's padding-free collator actually lays them out, two packs per micro-batch.
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    rows = packed.to_list()
    slots = sum(collator([dict(r) for r in rows[i : i + 2]])["input_ids"].numel() for i in range(0, n_packs, 2))
    return {
        "rows": len(lens),
        "p50": int(np.percentile(lens, 50)),
        "p99": int(np.percentile(lens, 99)),
        "packed_padding_free": round(real / slots, 3),
        "pack_fill": round(packed_tokens / (n_packs * max_length), 3),
        "pad_to_longest": round(real / longest, 3),
        "pad_to_max_length": round(real / (len(lens) * max_length), 3),
    }


# ---------------------------------------------------------------------------------------------
# Throughput


def _rows(kind: str, n: int, max_length: int, vocab: int) -> list[dict]:
    rng = np.random.default_rng(2)
    out = []
    for n_tok in lengths(kind, n, max_length, seed=3):
        ids = rng.integers(10, vocab - 10, size=n_tok).tolist()
        cut = max(1, n_tok // 4)  # a quarter prompt, the rest completion
        out.append({"input_ids": ids, "completion_mask": [0] * cut + [1] * (n_tok - cut)})
    return out


# The baselines' LoRA targets: every projection, as our recipes do.
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def padded_labels(row: dict) -> dict:
    """A bench row as a plain script feeds it: mask of ones, prompt labels -100 (the collator pads)."""
    ids = row["input_ids"]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [t if m else -100 for t, m in zip(ids, row["completion_mask"], strict=True)],
    }


class _Timer:
    """Times optimizer steps after `warmup` and counts real tokens of the timed steps."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == warmup:
                    timer.start = time.perf_counter()
                    timer.tokens_at_start = timer.tokens

        self.callback = Callback()
        self.tokens, self.tokens_at_start, self.start = 0, 0, None

    def rate(self) -> float:
        return (self.tokens - self.tokens_at_start) / (time.perf_counter() - self.start)


def _run_ours(rows, tiny, tokenizer, max_length, batch_tokens, steps, warmup, out) -> float:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    import train.models.attention  # noqa: F401  (registers sdpa_packed)
    from train.core.config import recipe_from_dict
    from train.methods.trainers import StageSFTTrainer, build_sft_config
    from train.models.loading import peft_lora_config

    # Same precision and no activation checkpointing on both sides: only the data path differs.
    recipe = recipe_from_dict(
        {
            "stage": "bench",
            "output_dir": out,
            "model": {"dtype": "float32", "gradient_checkpointing": False, "attn_implementation": "sdpa_packed"},
            "lora": {"r": 16, "alpha": 16},
            "data": {
                "sources": [
                    {"name": "x", "path": "data_prep/samples/kocommercial_sample.jsonl", "schema": "kocommercial"}
                ],
                "max_length": max_length,
            },
            "training": {
                "per_device_train_batch_size": max(1, batch_tokens // max_length),
                "gradient_accumulation_steps": 1,
                "max_steps": steps,
                "logging_steps": 1000,
                "save_steps": 100000,
                "report_to": ["none"],
            },
        }
    )
    ds = datasets.Dataset.from_list(rows)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32, attn_implementation="sdpa_packed")
    timer = _Timer(warmup)
    trainer = StageSFTTrainer(
        model=model,
        args=build_sft_config(recipe, out, False),
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=peft_lora_config(recipe.lora),
        callbacks=[timer.callback],
    )
    original = trainer.training_step

    def counted(model, inputs, num_items_in_batch=None):
        timer.tokens += inputs["input_ids"].numel()  # padding-free: every slot is a real token
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = counted
    trainer.train()
    return timer.rate()


def _run_baseline(rows, tiny, tokenizer, rows_per_batch, steps, warmup, out) -> float:
    """Plain Transformers Trainer + PEFT, padding to the batch's longest row (what most scripts do)."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    ds = datasets.Dataset.from_list([padded_labels(r) for r in rows])
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
        LoraConfig(r=16, lora_alpha=16, target_modules=ALL_PROJECTIONS),
    )
    timer = _Timer(warmup)
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=rows_per_batch,
        max_steps=steps,
        logging_steps=1000,
        save_steps=100000,
        report_to=[],
        use_cpu=True,
        learning_rate=2e-4,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
        callbacks=[timer.callback],
    )
    original = trainer.training_step

    def counted(model, inputs, num_items_in_batch=None):
        timer.tokens += int(inputs["attention_mask"].sum())
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = counted
    trainer.train()
    return timer.rate()


def throughput(kind: str, rounds: int, out: str) -> dict:
    from transformers import AutoTokenizer

    from train.models.tiny import ensure_tiny_model

    tiny = ensure_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    max_length, batch_tokens, steps, warmup = 1024, 2048, 8, 2
    rows = _rows(kind, 600, max_length, len(tokenizer))
    # The baseline gets the same number of rows per step as our packs hold on average.
    rows_per_batch = max(1, round(batch_tokens / (sum(len(r["input_ids"]) for r in rows) / len(rows))))
    ours, base = [], []
    for _ in range(rounds):  # alternated, so drift hits both alike
        ours.append(_run_ours(rows, tiny, tokenizer, max_length, batch_tokens, steps, warmup, out))
        base.append(_run_baseline(rows, tiny, tokenizer, rows_per_batch, steps, warmup, out))
    return {
        "distribution": kind,
        "ours_tokens_per_s": round(statistics.median(ours)),
        "baseline_tokens_per_s": round(statistics.median(base)),
        "speedup": round(statistics.median(ours) / statistics.median(base), 2),
        "rounds": rounds,
        "rows_per_baseline_batch": rows_per_batch,
        "ours_runs": [round(x) for x in ours],
        "baseline_runs": [round(x) for x in base],
    }


# ---------------------------------------------------------------------------------------------
# Cross-entropy memory at 152k vocabulary


def ce_memory(path: str) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=152064,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    seq = 4096
    ids = torch.randint(0, 152064, (1, seq))
    labels = ids.clone()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if path == "plain":
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
    else:  # TRL's loss path, as SFTTrainer.compute_loss calls it
        import datasets
        from transformers import AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from train.models.tiny import ensure_tiny_model

        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(output_dir="/tmp/ce-bench", use_cpu=True, report_to=[], max_length=seq),
            train_dataset=datasets.Dataset.from_dict({"input_ids": [[1, 2]]}),
            processing_class=AutoTokenizer.from_pretrained(ensure_tiny_model()),
        )
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        loss = trainer.compute_loss(
            trainer.model, {"input_ids": ids, "labels": labels, "position_ids": torch.arange(seq)[None]}
        )
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "path": path,
        "seq_tokens": seq,
        "vocab": 152064,
        "loss": round(float(loss), 3),
        "peak_rss_mb": round(peak / 1024),
        "step_rss_growth_mb": round((peak - before) / 1024),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ce", choices=["plain", "ours"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ce:
        sys.stdout.write(json.dumps(ce_memory(args.ce)) + "\n")
        return
    from bench.common import write_results

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pad = []
    for kind in ("medical_reasoning", "kocommercial"):
        lens = lengths(kind, 20000, 4096)
        pad.append(
            {"distribution": kind, "max_length": 4096, "batch_rows": 8, **padding_efficiency(lens, 4096, batch=8)}
        )
    write_results(
        "padding_efficiency",
        pad,
        (
            "Real tokens / token slots for 20,000 synthetic rows per distribution (log-normal lengths, clipped to "
            "4096). packed_padding_free: TRL best-fit-decreasing packing flattened without padding (our path); "
            "pack_fill: tokens per pack / max_length; pad_to_longest: batches of 8 random rows padded to their "
            "longest; pad_to_max_length: every row padded to 4096."
        ),
    )
    rates = []
    with __import__("tempfile").TemporaryDirectory() as tmp:
        for kind in ("medical_reasoning", "kocommercial"):
            rates.append(throughput(kind, args.rounds, tmp))
    write_results(
        "train_throughput",
        rates,
        (
            "Effective (non-pad) tokens/s of a LoRA training step on the tiny Qwen2 model (fp32, CPU, 1 thread): ours = "
            "TRL SFTTrainer with padding-free packing to 1024 tokens, 2 packs per step, sdpa_packed attention; baseline = plain "
            "Transformers Trainer + PEFT, DataCollatorForSeq2Seq padding to the longest row, the same rows per step "
            "on average. Same 600 synthetic rows per distribution (max 1024 tokens), 8 steps per run of which 2 "
            "warm-up, runs alternated, median over rounds."
        ),
    )
    ce = []
    for path in ("plain", "ours"):
        proc = subprocess.run(
            [sys.executable, "-m", "bench.train_bench", "--ce", path],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
        ce.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    write_results(
        "cross_entropy_memory",
        ce,
        (
            "One forward+backward of 4096 tokens at Qwen's vocabulary (152,064) with hidden size 64 (so the logits "
            "dominate), each path in its own process: plain = model(labels=...) materializing fp32 logits; ours = "
            "TRL SFTTrainer.compute_loss (what our trainer runs). peak_rss_mb is the process peak."
        ),
    )
    for section in (pad, rates, ce):
        for row in section:
            sys.stdout.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
