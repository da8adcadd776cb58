"""GPU benchmarks: QLoRA training of Qwen2.5-7B- and 32B-shaped models with random weights (no Hub), our
training step against a plain Transformers + PEFT + bitsandbytes baseline measured in the same job.

    make bench-gpu                                        (= python -m bench.gpu_bench)
    python -m bench.gpu_bench --shapes qwen2.5-7b --rounds 2 --skip-cap

Variants, each in its own process (clean peak memory; Liger patches the model classes it touches):
- baseline: what a plain QLoRA script does: `prepare_model_for_kbit_training` + `get_peft_model`, transformers'
  `Trainer`, rows padded to the longest in the batch (DataCollatorForSeq2Seq), stock SDPA, the model's own loss.
- ours: the shipped recipe's settings (recipes/stage1_medical.yaml: NF4 double-quant, bf16, gradient checkpointing,
  LoRA r=16 on all projections) through our StageSFTTrainer: padding-free packing of 4k-token micro-batches,
  with and without Liger kernels, with each attention kernel available (sdpa_packed, stock sdpa over the packed
  row, flash_attention_2 where flash-attn is installed).
Both sides train on the same rows, hold the same real tokens per micro-batch on average, checkpoint activations
alike, and time optimizer steps after warm-up with the GPU synchronised at each step's ends.

MFU = model FLOPs of the real tokens / step time / the GPU's dense bf16 peak, with per token
    4 * N_matmul             (LoRA: forward 2N + input gradients 2N = 2/3 of 6N; frozen weights get no gradient)
  + 6 * N_lora               (the adapters are trained: 6 per parameter)
and per sequence of length L, attention 6 * n_layers * hidden * L^2 (causal: half the L^2 score and
value products; backward twice forward). N_matmul = every Linear weight of the decoder plus the LM head,
embeddings excluded. Recomputation from checkpointing and NF4 dequantisation are work the GPU does but
are not counted, as in every MFU figure.

The longest trainable sequence of the 32B shape on a 24 GB card (an RTX 4090) is searched on the lent GPU with
PyTorch's caching allocator capped at `--cap-gib` minus 1 GiB (CUDA context and workspace live outside the
allocator): a simulation, since the H100's kernels and allocator behaviour are not the 4090's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Architecture of Qwen2.5-7B and of Qwen2.5-32B (= DeepSeek-R1-Distill-Qwen-32B), from their config.json.
QWEN2_COMMON = {
    "vocab_size": 152064,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}
SHAPES = {
    "qwen2.5-7b": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
    },
    "qwen2.5-32b": {
        "hidden_size": 5120,
        "intermediate_size": 27648,
        "num_hidden_layers": 64,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
    },
    # Exercises this harness on a CPU (tests): same code, small enough for seconds.
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 4096,
    },
}

# Dense bf16 peak (TFLOP/s, no sparsity) by device name; --peak-tflops overrides.
PEAK_TFLOPS = {
    "H100 80GB HBM3": 989.4,
    "H100 SXM": 989.4,
    "H200": 989.4,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "RTX 4090": 165.2,
    "L40S": 362.1,
}

BASELINE = "baseline"
OURS = "ours"


def qwen2_config(shape: str, attn_implementation: str):
    from transformers import Qwen2Config

    config = Qwen2Config(**{**QWEN2_COMMON, **SHAPES[shape]})
    config._attn_implementation = attn_implementation
    return config


def matmul_params(config) -> int:
    """Weights of every Linear in the decoder plus the LM head (biases and embeddings excluded)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    return layers * per_layer + h * config.vocab_size


def train_flops(config, seq_lens: list[int], lora_params: int) -> float:
    """Model FLOPs of one LoRA training step over sequences of these lengths (formula in the module docstring)."""
    tokens = sum(seq_lens)
    attention = 6 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in seq_lens)
    return 4 * matmul_params(config) * tokens + 6 * lora_params * tokens + attention


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


# ---------------------------------------------------------------------------------------------
# Model with random weights through transformers' own loader


def random_state_dict(config, dtype, seed: int = 0) -> dict:
    """A state dict for `config` whose tensors are views into one random buffer at random offsets.

    No checkpoint of these shapes can be downloaded here, and 32B in bf16 (65 GB) exceeds the disk, so
    `from_pretrained(None, state_dict=...)` gets views: host memory stays at one buffer of twice the largest
    tensor, while transformers' bitsandbytes quantizer sees and quantizes every tensor as from a checkpoint.
    Norm weights are ones, as in a real checkpoint's scale; values do not change the speed of any kernel.
    """
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        skeleton = Qwen2ForCausalLM(config)
    shapes = {name: tensor.shape for name, tensor in skeleton.state_dict().items()}
    largest = max(s.numel() for s in shapes.values())
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(2 * largest, generator=generator) * 0.02).to(dtype)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(shape, dtype=dtype)
            continue
        offset = int(torch.randint(0, largest, (1,), generator=generator))
        state[name] = pool[offset : offset + shape.numel()].view(shape)
    return state


def load_random_model(shape: str, model_cfg):
    """The model as our loader builds it (train.models.loading's quantization config), weights random."""
    import torch
    from transformers import Qwen2ForCausalLM

    import train.models.attention  # noqa: F401  (registers sdpa_packed)
    from train.models.loading import quantization_config, torch_dtype

    dtype = torch_dtype(model_cfg.dtype)
    config = qwen2_config(shape, model_cfg.attn_implementation)
    kwargs = {"device_map": {"": 0}} if torch.cuda.is_available() else {}
    return Qwen2ForCausalLM.from_pretrained(
        None,
        config=config,
        state_dict=random_state_dict(config, dtype),
        dtype=dtype,
        quantization_config=quantization_config(model_cfg),
        attn_implementation=model_cfg.attn_implementation,
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# One variant's run (child process)


class StepClock:
    """Per optimizer step: wall time between consecutive step ends (GPU synchronised there), so data loading and
    collation between steps count as they do for a user; real tokens and sequence lengths of the step."""

    def __init__(self, warmup: int):
        import torch
        from transformers import TrainerCallback

        clock = self
        self.warmup, self.times, self.tokens, self.seq_lens = warmup, [], [], []
        self._pending_tokens, self._pending_lens, self._last_end = 0, [], None
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                sync()
                clock._last_end = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                sync()
                now = time.perf_counter()
                if state.global_step > clock.warmup:
                    clock.times.append(now - clock._last_end)
                    clock.tokens.append(clock._pending_tokens)
                    clock.seq_lens.extend(clock._pending_lens)
                clock._last_end, clock._pending_tokens, clock._pending_lens = now, 0, []

        self.callback = Callback()

    def count(self, inputs: dict) -> None:
        """Real tokens and sequence lengths of one micro-batch (packed rows split at position 0)."""
        mask = inputs.get("attention_mask")
        if mask is not None and "position_ids" not in inputs:
            lens = [int(n) for n in mask.sum(dim=1).tolist()]
        else:
            positions = inputs["position_ids"].flatten().tolist()
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
            lens = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
        self._pending_tokens += sum(lens)
        self._pending_lens.extend(lens)


def _counting(trainer, clock: StepClock) -> None:
    original = trainer.training_step

    def counted(model, inputs, num_items_in_batch=None):
        clock.count(inputs)
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = counted


def ours_recipe(attn: str, liger: bool, tokens: int, steps: int, out: str):
    """recipes/stage1_medical.yaml as shipped, with this variant's kernels and one pack of `tokens` per step."""
    from train.core.config import load_recipe

    return load_recipe(
        REPO / "recipes" / "stage1_medical.yaml",
        [
            f"model.attn_implementation={attn}",
            f"model.use_liger={str(liger).lower()}",
            f"output_dir={out}",
            f"data.max_length={tokens}",
            "training.per_device_train_batch_size=1",
            "training.gradient_accumulation_steps=1",
            f"training.max_steps={steps}",
            "training.warmup_steps=0",
            "training.logging_steps=100000",
            "training.save_steps=100000",
            "training.eval_steps=null",
        ],
    )


def run_ours(
    shape: str, attn: str, liger: bool, rows: list[dict], tokens: int, steps: int, warmup: int, out: str, model=None
):
    """(trainer, clock, extra) of our path; `model` = an already adapted model to train again (length search)."""
    import datasets
    from transformers import AutoTokenizer

    from train.methods.trainers import StageSFTTrainer, build_sft_config
    from train.models.loading import peft_lora_config
    from train.models.tiny import ensure_tiny_model

    recipe = ours_recipe(attn, liger, tokens, steps, out)
    clock = StepClock(warmup)
    trainer = StageSFTTrainer(
        model=model if model is not None else load_random_model(shape, recipe.model),
        args=build_sft_config(recipe, out, False),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(ensure_tiny_model()),
        peft_config=None if model is not None else peft_lora_config(recipe.lora),
        callbacks=[clock.callback],
    )
    _counting(trainer, clock)
    return trainer, clock, {}


def run_baseline(shape: str, rows: list[dict], tokens: int, steps: int, warmup: int, out: str):
    """The plain script: prepare_model_for_kbit_training, get_peft_model, Trainer, padding to the longest row."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from bench.train_bench import ALL_PROJECTIONS, padded_labels
    from train.core.config import ModelConfig
    from train.models.tiny import ensure_tiny_model

    cuda = torch.cuda.is_available()
    model_cfg = ModelConfig(dtype="bfloat16", quantization="nf4", double_quant=True, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(load_random_model(shape, model_cfg), use_gradient_checkpointing=True)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=ALL_PROJECTIONS)
    )
    mean_len = sum(len(r["input_ids"]) for r in rows) / len(rows)
    rows_per_batch = max(1, round(tokens / mean_len))  # the same real tokens per micro-batch on average
    tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model())
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=rows_per_batch,
        max_steps=steps,
        learning_rate=2e-4,
        bf16=True,
        use_cpu=not cuda,
        gradient_checkpointing=True,
        logging_steps=100000,
        save_steps=100000,
        report_to=[],
        disable_tqdm=True,
    )
    clock = StepClock(warmup)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list([padded_labels(r) for r in rows]),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100),
        callbacks=[clock.callback],
    )
    _counting(trainer, clock)
    return trainer, clock, {"rows_per_batch": rows_per_batch}


def lora_param_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def run_variant(spec: dict) -> dict:
    """Build, train `steps` optimizer steps, and report the timed ones (after `warmup`)."""
    import torch

    from bench.train_bench import _rows

    config = qwen2_config(spec["shape"], "sdpa")
    rows = _rows(spec["distribution"], spec.get("rows", 800), spec["tokens"], config.vocab_size)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        if spec["path"] == BASELINE:
            trainer, clock, extra = run_baseline(
                spec["shape"], rows, spec["tokens"], spec["steps"], spec["warmup"], out
            )
        else:
            trainer, clock, extra = run_ours(
                spec["shape"], spec["attn"], spec["liger"], rows, spec["tokens"], spec["steps"], spec["warmup"], out
            )
        weights_gb = torch.cuda.memory_allocated() / 2**30 if cuda else None
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak_gb = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    seconds = sum(clock.times)
    flops = train_flops(config, clock.seq_lens, lora_param_count(trainer.model))
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_tflops(device, spec.get("peak_tflops"))
    return {
        "shape": spec["shape"],
        "path": spec["path"],
        "attn": spec.get("attn", "sdpa"),
        "liger": bool(spec.get("liger", False)),
        "distribution": spec["distribution"],
        "tokens_per_s": round(sum(clock.tokens) / seconds, 1),
        "step_s_median": round(statistics.median(clock.times), 4),
        "timed_steps": len(clock.times),
        "real_tokens_per_step": round(sum(clock.tokens) / len(clock.times)),
        "mfu": round(flops / seconds / (peak * 1e12), 4) if peak else None,
        "peak_gb": round(peak_gb, 2) if peak_gb is not None else None,
        "weights_gb": round(weights_gb, 2) if weights_gb is not None else None,
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Longest trainable sequence under a memory cap (child process)


def longest_trainable(try_length, lengths: list[int]) -> dict:
    """Ascending lengths until the first out-of-memory; `try_length(n)` trains at n and returns False on OOM."""
    fits, failed = [], None
    for n in lengths:
        if try_length(n):
            fits.append(n)
        else:
            failed = n
            break
    return {
        "longest_fitting": max(fits) if fits else 0,
        "first_oom": failed,
        "tried": fits + ([failed] if failed else []),
    }


def run_cap(spec: dict) -> dict:
    """Our recipe (or the baseline) on the 32B shape with the allocator capped, one model, rising lengths."""
    import gc

    import torch

    if torch.cuda.is_available():  # (on a CPU only the search itself runs: the harness's test)
        cap_bytes = (spec["cap_gib"] - 1.0) * 2**30
        torch.cuda.set_per_process_memory_fraction(cap_bytes / torch.cuda.get_device_properties(0).total_memory)
    config = qwen2_config(spec["shape"], "sdpa")
    built: dict = {}

    def try_length(n: int) -> bool:
        ids = torch.randint(10, config.vocab_size - 10, (4, n)).tolist()
        # Rows of exactly n tokens (a quarter prompt): the worst case at this length.
        rows = [{"input_ids": row, "completion_mask": [0] * (n // 4) + [1] * (n - n // 4)} for row in ids]
        trainer = None
        try:
            with tempfile.TemporaryDirectory() as out:
                if spec["path"] == BASELINE:
                    trainer, _, _ = run_baseline(spec["shape"], rows, n, 2, 0, out)
                else:  # one quantized base and adapter for every length: loading 32B again costs minutes
                    trainer, _, _ = run_ours(
                        spec["shape"], spec["attn"], spec["liger"], rows, n, 2, 0, out, model=built.get("model")
                    )
                    built["model"] = trainer.model
                trainer.train()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del trainer
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    lengths = [int(x) for x in spec["lengths"]]
    found = longest_trainable(try_length, lengths)
    return {
        "shape": spec["shape"],
        "path": spec["path"],
        "attn": spec.get("attn", "sdpa"),
        "liger": bool(spec.get("liger", False)),
        "cap_gib": spec["cap_gib"],
        "allocator_cap_gib": spec["cap_gib"] - 1.0,
        **found,
    }


# ---------------------------------------------------------------------------------------------
# Orchestration (parent process)


def _child(spec: dict, timeout: int) -> dict | None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.gpu_bench", "--child", json.dumps(spec)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        sys.stderr.write(f"timed out after {timeout}s: {spec}\n")
        return None
    if proc.returncode != 0:
        sys.stderr.write(f"failed: {spec}\n{proc.stderr[-4000:]}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


VARIANTS = {  # name -> what the child runs
    "baseline": {"path": BASELINE},
    "ours": {"path": OURS, "attn": "sdpa_packed", "liger": False},
    "ours+liger": {"path": OURS, "attn": "sdpa_packed", "liger": True},
    "ours-sdpa+liger": {"path": OURS, "attn": "sdpa", "liger": True},
    "ours-flex+liger": {"path": OURS, "attn": "flex_attention", "liger": True},
    "ours-flash+liger": {"path": OURS, "attn": "flash_attention_2", "liger": True},
}


def variants(shape: str, names: list[str] | None = None) -> list[dict]:
    """The named variants, or the default set: baseline, ours with and without Liger, and on the 7B shape
    the attention kernels for packed rows (stock sdpa, flex, flash-attn where installed)."""
    import importlib.util

    if names:
        unknown = [n for n in names if n not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
        return [VARIANTS[n] for n in names]
    out = [VARIANTS["baseline"], VARIANTS["ours"], VARIANTS["ours+liger"]]
    if shape != "qwen2.5-32b":  # the attention comparison once, on the 7B shape
        out += [VARIANTS["ours-flex+liger"], VARIANTS["ours-sdpa+liger"]]
        if importlib.util.find_spec("flash_attn") is not None:
            out.append(VARIANTS["ours-flash+liger"])
    return out


def summarize(runs: list[dict]) -> list[dict]:
    """Median per variant over rounds, with ratios against the baseline of the same shape and distribution."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["shape"], r["distribution"], r["path"], r["attn"], r["liger"]), []).append(r)
    rows = []
    for group in groups.values():
        row = dict(group[0])
        for field in ("tokens_per_s", "step_s_median", "mfu", "peak_gb"):
            values = [g[field] for g in group if g[field] is not None]
            row[field] = round(statistics.median(values), 4) if values else None
        row["rounds"] = len(group)
        rows.append(row)
    for row in rows:
        base = next(
            (
                b
                for b in rows
                if b["path"] == BASELINE and b["shape"] == row["shape"] and b["distribution"] == row["distribution"]
            ),
            None,
        )
        row["speedup_vs_baseline"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2) if base else None
        row["peak_mem_vs_baseline"] = (
            round(row["peak_gb"] / base["peak_gb"], 2) if base and row["peak_gb"] and base["peak_gb"] else None
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="qwen2.5-7b,qwen2.5-32b")
    parser.add_argument(
        "--distributions",
        default="medical_reasoning,kocommercial",
        help="length distributions for the first shape; later shapes use the first only",
    )
    parser.add_argument("--tokens", type=int, default=4096, help="real tokens per micro-batch (one pack)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds per variant (median reported)")
    parser.add_argument("--cap-gib", type=float, default=24.0, help="card to simulate for the longest-sequence search")
    parser.add_argument("--cap-lengths", default="1024,2048,3072,4096,6144,8192,12288,16384,24576,32768")
    parser.add_argument("--skip-cap", action="store_true")
    parser.add_argument("--only-cap", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per child process")
    parser.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)} (default: a set per shape)")
    parser.add_argument("--results-dir", help="where the results files go (default bench/results/)")
    parser.add_argument("--allow-cpu", action="store_true", help="rehearse on a CPU (tiny shape; no figures)")
    parser.add_argument("--label", help="results section name instead of the shape's (rehearsals of both parts)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        result = run_cap(spec) if spec.get("mode") == "cap" else run_variant(spec)
        sys.stdout.write(json.dumps(result) + "\n")
        return

    import torch

    from bench.common import write_results

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("make bench-gpu needs a CUDA GPU; `make bench` is the CPU benchmark")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (rehearsal)"
    names = args.variants.split(",") if args.variants else None
    shapes = args.shapes.split(",")
    common = {"tokens": args.tokens, "steps": args.steps, "warmup": args.warmup, "peak_tflops": args.peak_tflops}
    if not args.only_cap:
        for i, shape in enumerate(shapes):
            runs = []
            for distribution in args.distributions.split(",")[: None if i == 0 else 1]:
                for _ in range(args.rounds):  # alternated, so drift hits every variant alike
                    for variant in variants(shape, names):
                        result = _child(
                            {**common, **variant, "shape": shape, "distribution": distribution}, args.timeout
                        )
                        if result:
                            runs.append(result)
                            sys.stdout.write(json.dumps(result) + "\n")
                            sys.stdout.flush()
                            # after every child: a run stopped by its time budget keeps what it measured
                            _write_train(shape, runs, device, args)

    if not args.skip_cap:
        caps = []
        lengths = args.cap_lengths.split(",")
        cap_variants = variants(shapes[-1], names) if names else [VARIANTS["ours+liger"], VARIANTS["baseline"]]
        for variant in cap_variants:
            result = _child(
                {**variant, "mode": "cap", "shape": shapes[-1], "cap_gib": args.cap_gib, "lengths": lengths},
                args.timeout,
            )
            if result:
                caps.append(result)
                sys.stdout.write(json.dumps(result) + "\n")
                sys.stdout.flush()
                write_results(
                    "gpu_longest_sequence_24gb",
                    caps,
                    (
                        f"Longest single sequence that trains (2 optimizer steps) for the {shapes[-1]} shape with "
                        f"PyTorch's allocator capped at {args.cap_gib - 1:.0f} GiB on {device} (a {args.cap_gib:.0f} "
                        "GB card minus 1 GiB for the CUDA context): a simulation of an RTX 4090, not a measurement "
                        "on one."
                    ),
                    results_dir=args.results_dir,
                )


def _write_train(shape: str, runs: list[dict], device: str, args) -> None:
    import torch

    from bench.common import write_results

    write_results(
        f"gpu_train_{args.label or shape}",
        summarize(runs),
        (
            f"{device}, torch {torch.__version__}. QLoRA (NF4, double quant, bf16 compute, LoRA r=16 on q,k,v,o,"
            f"gate,up,down) of a {shape}-shaped Qwen2 with random weights; {args.tokens} real tokens per "
            f"micro-batch, gradient checkpointing on both sides, {args.steps} steps of which {args.warmup} "
            f"warm-up, median over {args.rounds} alternated rounds. baseline = prepare_model_for_kbit_training + "
            "get_peft_model + Trainer, padding to the longest row, sdpa; ours = recipes/stage1_medical.yaml through "
            "StageSFTTrainer, padding-free packing (attn: sdpa_packed = SDPA per sequence, flex_attention = "
            "compiled flex attention with a document mask). MFU formula in bench/gpu_bench.py (LoRA = 2/3 of 6N "
            "plus causal attention). peak_gb = torch.cuda.max_memory_allocated during training, weights included."
        ),
        results_dir=args.results_dir,
    )


if __name__ == "__main__":
    main()
