"""Merge a stage's LoRA (after every ancestor's) into 16-bit weights, checked against base + adapter; a full
fine-tuning stage (lora: none) has nothing to merge: its model is copied in the merge dtype and checked.

    python -m train merge outputs/stage2_korean --out outputs/stage2_korean/merged
    make merge STAGE=outputs/stage2_korean

Memory: the merge itself streams tensor by tensor from the base's shards (train/models/merging.py):
its peak is about the largest tensor, whatever the model size. The parity check then loads the model
once (base + adapter, then the written files, one at a time) where that fits in free memory, and
otherwise recomputes a sample of merged tensors in float64. A pre-quantized base or `--dequantize`
(the 4-bit weights training saw) merges in memory: one copy of the model in the merge dtype.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from train.core.errors import UserError
from train.core.formats import reasoning_chat_template
from train.core.io import TMP_MARKER, check_output_dir, claim_tmp, fresh_tmp, replace_output, write_json
from train.core.log import get_logger
from train.export.cards import write_model_card
from train.export.parity import PARITY_TEXTS, compare_logits, text_logits
from train.inference.targets import stage_recipe
from train.models.lineage import is_full_stage, read_stage, resolve_chain, stage_chain, stage_lineage, stage_weights
from train.models.loading import load_merged_16bit, resolve_model_path, torch_dtype
from train.models.merging import check_copy, stream_merge

log = get_logger("merge")

# Max |logit difference| allowed, as a fraction of the largest |logit|: rounding W + BA to the merge
# dtype is the only expected difference.
MERGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
MERGE_REPORT = "merge_report.json"


def held_out_texts(stage_dir: Path, limit: int = 3) -> list[str]:
    """The stage's own held-out examples (prompt + answer, as trained) followed by the fixed texts."""
    info = read_stage(stage_dir)
    eval_file = Path(info.get("data", {}).get("processed_dir") or "") / "eval.parquet"
    texts: list[str] = []
    if eval_file.is_file():
        import pyarrow.parquet as pq

        table = pq.read_table(eval_file, columns=["prompt", "completion"]).slice(0, limit).to_pylist()
        texts = [row["prompt"] + row["completion"] for row in table]
    return texts + PARITY_TEXTS


def _dequantized_base(stage_dir: Path, info: dict, recipe, dtype: str, source: str, prequantized: bool):
    """Base (+ merged ancestors) dequantized to `dtype`: the 4-bit weights training really saw (`--dequantize`,
    or a base that is itself a pre-quantized checkpoint)."""
    from transformers import AutoModelForCausalLM

    from train.models.loading import quantization_config

    parents = resolve_chain(info.get("parent"), info["base_model"], recipe.model.revision)
    model_cfg = replace(recipe.model, dtype=dtype)
    if parents.adapters:  # a quantized child trained on its parents merged in 16-bit, then quantized at load
        source = str(stage_dir / "parent_merged")
        if not (Path(source) / "config.json").is_file():
            raise UserError(f"--dequantize needs {source} (written when the stage trained); it is missing")
    quant = None if prequantized else quantization_config(model_cfg)
    if quant is None and not prequantized:
        raise UserError(f"--dequantize: stage {stage_dir} was not trained quantized (model.quantization: none)")
    log.info("loading %s quantized and dequantizing it to %s", source, dtype)
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quant, dtype=torch_dtype(dtype), low_cpu_mem_usage=True
    )
    return model.dequantize()


def _adapter_logits(model, tokenizer, texts) -> tuple:
    """(logits with the adapter, logits with it disabled) of a PeftModel."""
    with_adapter = text_logits(model, tokenizer, texts)
    with model.disable_adapter():
        return with_adapter, text_logits(model, tokenizer, texts)


def _merge_in_memory(stage_dir, info, recipe, adapter, tokenizer, texts, dtype, source, prequantized):
    """(merged model, parity, effect): one copy of the model; the parity logits come from that same copy,
    first with the adapter unmerged, then merged in place."""
    from peft import PeftModel

    base = _dequantized_base(stage_dir, info, recipe, dtype, source, prequantized)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    with_adapter, without_adapter = _adapter_logits(model, tokenizer, texts)
    merged = model.merge_and_unload()
    merged_logits = text_logits(merged, tokenizer, texts)
    return merged, compare_logits(with_adapter, merged_logits), compare_logits(without_adapter, merged_logits)


def _check_streamed(tmp: Path, chain, recipe, tokenizer, texts, dtype, streamed: dict):
    """(parity, effect, mode). Where two passes over the model fit in free memory: the logits of base +
    adapter (PEFT, unmerged), then of the written files, one model at a time. Where they do not (a 32B
    on a small host): the merged tensors of a sample of targeted weights recomputed in float64 from the
    base and adapters and compared with what was written."""
    import psutil
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if streamed["bytes"] * 1.5 < psutil.virtual_memory().available:
        parents = replace(chain, adapters=chain.adapters[:-1])
        base = load_merged_16bit(parents, replace(recipe.model, dtype=dtype))
        model = PeftModel.from_pretrained(base, str(chain.adapters[-1])).eval()
        with_adapter, without_adapter = _adapter_logits(model, tokenizer, texts)
        del model, base
        merged = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype(dtype), low_cpu_mem_usage=True).eval()
        merged_logits = text_logits(merged, tokenizer, texts)
        del merged
        parity, effect = compare_logits(with_adapter, merged_logits), compare_logits(without_adapter, merged_logits)
        return parity, effect, "logits of base + adapter vs the written files"
    from train.models.merging import check_sample

    parity, effect = check_sample(resolve_model_path(chain.base), chain.adapters, tmp, dtype)
    log.warning(
        "the model does not fit twice in free memory: checked %d merged tensors instead of logits", parity["checked"]
    )
    return (
        parity,
        effect,
        f"{parity['checked']} sampled merged tensors recomputed in float64 (the model does not fit in memory)",
    )


def _check_full_copy(tmp: Path, source: Path, info, recipe, tokenizer, texts, dtype, streamed: dict):
    """(parity, effect, mode) of a full fine-tuning stage's copy: every written tensor equals the trained one cast to
    `dtype` (always, tensor by tensor); where the model fits twice in free memory, also the logits of the trained
    model against the written files (parity) and of the model the stage started from (effect)."""
    import psutil
    from transformers import AutoModelForCausalLM

    copied = check_copy(source, tmp, dtype)
    if copied["max_abs_diff"] != 0.0:  # a cast is deterministic: any difference is a damaged write
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"the copy of {source} differs from it by up to {copied['max_abs_diff']} after the cast to {dtype}; "
            "nothing was written (check the disk and run the merge again)"
        )
    if streamed["bytes"] * 1.5 >= psutil.virtual_memory().available:
        log.warning("the model does not fit twice in free memory: checked its tensors, not its logits")
        return copied, {"max_abs_diff": None}, f"{copied['checked']} tensors equal to the trained ones cast to {dtype}"
    trained = AutoModelForCausalLM.from_pretrained(source, dtype="auto", low_cpu_mem_usage=True).eval()
    trained_logits = text_logits(trained, tokenizer, texts)
    del trained
    merged = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype(dtype), low_cpu_mem_usage=True).eval()
    merged_logits = text_logits(merged, tokenizer, texts)
    del merged
    start = load_merged_16bit(
        resolve_chain(info.get("parent"), info["base_model"], recipe.model.revision), replace(recipe.model, dtype=dtype)
    ).eval()
    start_logits = text_logits(start, tokenizer, texts)
    del start
    parity = {**compare_logits(trained_logits, merged_logits), "tensors_checked": copied["checked"]}
    return (
        parity,
        compare_logits(start_logits, merged_logits),
        f"logits of the trained model vs the written files; {copied['checked']} tensors equal to the trained ones "
        f"cast to {dtype}",
    )


def _set_generation_tokens(folder: Path, tokenizer) -> None:
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(folder)
    except OSError:  # the base has none
        generation = GenerationConfig()
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(folder)


def _bytes(size: str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int  # what save_pretrained parses "5GB" with

    return parse_size_to_int(size)


def merge_stage(
    stage_dir: str | Path,
    out: str | Path,
    adapter: str | Path | None = None,
    dtype: str = "bfloat16",
    dequantize: bool = False,
    max_shard_size: str = "5GB",
    license_id: str | None = None,
    trust_remote_code: bool = False,
) -> dict:
    """Write the merged model to `out` (atomically) and return the parity report.

    `trust_remote_code`: the user's opt-in (--trust-remote-code) to a stored recipe's model.trust_remote_code;
    without it such a stage is refused before anything loads.
    """
    from transformers import AutoConfig, AutoTokenizer

    stage_dir = Path(stage_dir).resolve()
    out = Path(out).resolve()
    info = read_stage(stage_dir)
    recipe = stage_recipe(stage_dir, info, trust_remote_code)
    if str(adapter) == "best":  # chosen by `train eval --checkpoints` on the task metric
        best_file = stage_dir / "best_checkpoint.json"
        if not best_file.is_file():
            raise UserError(f"--adapter best: no {best_file}; run `python -m train eval {stage_dir} --checkpoints`")
        adapter = json.loads(best_file.read_text(encoding="utf-8"))["adapter"]
    full = is_full_stage(stage_dir)
    adapter = Path(adapter).resolve() if adapter else stage_weights(stage_dir)
    chain = stage_chain(stage_dir, adapter)  # refuses a folder without the stage's kind of weights
    if dtype not in MERGE_TOLERANCE:
        raise UserError(f"--dtype {dtype}: choose one of {', '.join(MERGE_TOLERANCE)}")
    if full and dequantize:
        raise UserError(f"--dequantize: {stage_dir} is a full fine-tuning stage (lora: none); it has no 4-bit weights")
    check_output_dir(out, MERGE_REPORT, stage_dir)
    claim_tmp(out, MERGE_REPORT)
    tokenizer = AutoTokenizer.from_pretrained(str(stage_weights(stage_dir)))
    if recipe.data.template == "reasoning":  # chat front ends must prompt the way this stage trained
        tokenizer.chat_template = reasoning_chat_template(recipe.data.system_prompt)

    texts = held_out_texts(stage_dir)
    tolerance = MERGE_TOLERANCE[dtype]
    source = resolve_model_path(chain.base)
    prequantized = not full and getattr(AutoConfig.from_pretrained(source), "quantization_config", None) is not None
    tmp = fresh_tmp(out, MERGE_REPORT)
    if full:  # nothing to merge: the model in the merge dtype, tensor by tensor, then checked
        streamed = stream_merge(source, [], tmp, dtype, _bytes(max_shard_size))
        _set_generation_tokens(tmp, tokenizer)
        parity, effect, mode = _check_full_copy(tmp, Path(source), info, recipe, tokenizer, texts, dtype, streamed)
    elif dequantize or prequantized:  # 4-bit weights are dequantized by bitsandbytes, in memory
        merged, parity, effect = _merge_in_memory(
            stage_dir, info, recipe, adapter, tokenizer, texts, dtype, source, prequantized
        )
        merged.generation_config.eos_token_id = tokenizer.eos_token_id
        merged.generation_config.pad_token_id = tokenizer.pad_token_id
        merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        mode, streamed = "logits, in memory", None
    else:
        streamed = stream_merge(source, chain.adapters, tmp, dtype, _bytes(max_shard_size), chain.revision)
        _set_generation_tokens(tmp, tokenizer)
        parity, effect, mode = _check_streamed(tmp, chain, recipe, tokenizer, texts, dtype, streamed)
    report = {
        "stage": str(stage_dir),
        "adapter": str(adapter),
        "dtype": dtype,
        "dequantized_base": dequantize,
        "finetune": "full" if full else "lora",
        "merge": "in memory" if streamed is None else "streaming, tensor by tensor",
        "parity_check": mode,
        "chat_template": recipe.data.template,
        "parity_texts": len(texts),
        "merged_vs_base_plus_adapter": parity,
        "tolerance_relative": tolerance,
        "adapter_effect": effect,
        "lineage": [str(p) for p in stage_lineage(stage_dir)],
    }
    if parity["relative_diff"] > tolerance:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(
            f"merged model disagrees with {'the trained model' if full else 'base + adapter'}: max logit diff {parity['max_abs_diff']} "
            f"({parity['relative_diff']:.2%} of the largest logit, tolerance {tolerance:.2%}); "
            "nothing was written"
        )
    if effect["max_abs_diff"] == 0.0:
        log.warning("training changed nothing (max logit diff 0 against the starting model): was it trained?")

    tokenizer.save_pretrained(tmp)
    report["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.name != TMP_MARKER}
    write_json(tmp / MERGE_REPORT, report)
    write_model_card(tmp, stage_lineage(stage_dir), report, license_id=license_id)
    replace_output(tmp, out)
    moved = "not measured" if effect["max_abs_diff"] is None else f"up to {effect['max_abs_diff']:.3f}"
    log.info(
        "merged model in %s: max logit diff vs %s %.2e (%.3f%% of max logit), %s moved logits %s",
        out,
        "the trained model" if full else "base+adapter",
        parity["max_abs_diff"],
        100 * parity["relative_diff"],
        "training" if full else "the adapter",
        moved,
    )
    return report
