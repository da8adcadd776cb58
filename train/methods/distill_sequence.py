"""Sequence-level distillation data: the teacher writes the answers the student is then SFT'd on.

The stage's processed data gives the prompts (rendered with its template, through data_prep's checks)
and the held-out rows. The teacher answers each training prompt (HF generate, left-padded batches,
greedy unless distill.generation_temperature > 0); answers are appended to
<output_dir>/teacher_answers.jsonl as they come, so a rerun asks only for the rest. Each answer is
checked: finished (EOS within distill.max_new_tokens), a closed `<think>` block for the reasoning
template, within data.max_length, and, with distill.verify: exact_answer, containing the row's
reference answer. Rejects are counted by reason and written to <output_dir>/distilled_data/rejects.jsonl;
the kept rows become distilled_data/train.parquet (input_ids + completion_mask, as data_prep writes).
A teacher with another tokenizer works here: prompts and answers cross as text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from train.core.config import Recipe
from train.core.errors import UserError
from train.core.formats import THINK_CLOSE
from train.core.io import count_reasons, read_jsonl, write_json, write_jsonl, write_rejects
from train.core.log import get_logger
from train.evaluation.qa_metrics import clean_answer, contains_reference
from train.methods.distill_loss import prompt_and_reference, row_key
from train.methods.launch import Launch
from train.methods.runner import StageData

log = get_logger("distill")

ANSWERS = "teacher_answers.jsonl"
DATA_DIR = "distilled_data"


def generate_answers(recipe: Recipe, tokenizer, rows: list[dict], path: Path) -> dict[str, dict]:
    """{prompt key: answer record}, generating (and appending) only the prompts not yet in `path`."""
    from transformers import AutoTokenizer

    from train.models.teacher import load_teacher, teacher_tokenizer_source

    d = recipe.distill
    done = {a["key"]: a for a in read_jsonl(path)} if path.is_file() else {}
    todo = [r for r in rows if row_key(r["prompt"]) not in done]
    if not todo:
        return done
    log.info("teacher answers: %d done, %d to generate -> %s", len(done), len(todo), path)
    if d.generation_backend == "vllm":
        return _generate_vllm(recipe, tokenizer, todo, path, done)
    teacher = load_teacher(d.teacher, d.teacher_quantization, Path(recipe.output_dir))
    teacher_tok = AutoTokenizer.from_pretrained(teacher_tokenizer_source(d.teacher))
    same = teacher_tok.get_vocab() == tokenizer.get_vocab()
    device = next(teacher.parameters()).device
    for start in range(0, len(todo), d.generation_batch_size):
        batch = todo[start : start + d.generation_batch_size]
        prompts = [
            r["prompt"] if same else teacher_tok(tokenizer.decode(r["prompt"]), add_special_tokens=False)["input_ids"]
            for r in batch
        ]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(batch), width), teacher_tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
        sampled = d.generation_temperature > 0
        with torch.no_grad():
            out = teacher.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=d.max_new_tokens,
                do_sample=sampled,
                temperature=d.generation_temperature if sampled else None,
                top_p=None,
                top_k=None,
                pad_token_id=teacher_tok.pad_token_id,
                eos_token_id=teacher_tok.eos_token_id,
            )
        records = []
        for r, gen in zip(batch, out[:, width:].tolist(), strict=True):
            finished = teacher_tok.eos_token_id in gen
            gen = gen[: gen.index(teacher_tok.eos_token_id)] if finished else gen
            text = teacher_tok.decode(gen, skip_special_tokens=False)
            ids_out = gen if same else tokenizer(text, add_special_tokens=False)["input_ids"]
            records.append({"key": row_key(r["prompt"]), "finished": finished, "text": text, "ids": ids_out})
        write_jsonl(path, records, append=True)  # kept as they come: a preempted run keeps its answers
        done.update((a["key"], a) for a in records)
        log.info("teacher answers: %d/%d", len(done), len(done) + len(todo) - start - len(batch))
    return done


def _generate_vllm(recipe: Recipe, tokenizer, todo: list[dict], path: Path, done: dict) -> dict[str, dict]:
    """The same answers file from vLLM (GPU): the teacher's merged folder, all prompts in one call per chunk."""
    from train.models.teacher import is_stage, merged_teacher_dir, teacher_model_config

    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        raise UserError(
            "distill.generation_backend: vllm needs vLLM on a CUDA host (pip install vllm, in its own environment "
            "if its pins differ); or set distill.generation_backend: hf"
        ) from None
    if not torch.cuda.is_available():
        raise UserError("distill.generation_backend: vllm needs a CUDA GPU; on CPU use generation_backend: hf")
    d = recipe.distill
    folder = d.teacher
    if is_stage(d.teacher):  # vLLM loads weights, not adapter chains: the chain merged in 16-bit first
        folder = str(merged_teacher_dir(d.teacher, teacher_model_config(d.teacher), Path(recipe.output_dir)))
    llm = LLM(model=folder, tokenizer=folder, tensor_parallel_size=torch.cuda.device_count())
    teacher_tok = llm.get_tokenizer()
    same = teacher_tok.get_vocab() == tokenizer.get_vocab()
    params = SamplingParams(max_tokens=d.max_new_tokens, temperature=d.generation_temperature)
    step = max(d.generation_batch_size, 256)
    for start in range(0, len(todo), step):
        batch = todo[start : start + step]
        prompts = [
            {"prompt_token_ids": r["prompt"] if same else teacher_tok.encode(tokenizer.decode(r["prompt"]))}
            for r in batch
        ]
        records = []
        for r, result in zip(batch, llm.generate(prompts, params), strict=True):
            out = result.outputs[0]
            gen = [t for t in out.token_ids if t != teacher_tok.eos_token_id]
            text = teacher_tok.decode(gen, skip_special_tokens=False)
            ids_out = gen if same else tokenizer(text, add_special_tokens=False)["input_ids"]
            finished = out.finish_reason == "stop"
            records.append({"key": row_key(r["prompt"]), "finished": finished, "text": text, "ids": ids_out})
        write_jsonl(path, records, append=True)
        done.update((a["key"], a) for a in records)
        log.info("teacher answers (vLLM): %d", len(done))
    return done


def _reject(recipe: Recipe, tokenizer, row: dict, answer: dict) -> str | None:
    d = recipe.distill
    if not answer["finished"]:
        return "unfinished"  # no EOS within distill.max_new_tokens
    if recipe.data.template == "reasoning" and THINK_CLOSE not in answer["text"]:
        return "no_closed_think"
    if len(row["prompt"]) + len(answer["ids"]) + 1 > recipe.data.max_length:
        return "too_long"
    if d.verify == "exact_answer":
        reference = clean_answer(tokenizer.decode(row["reference"], skip_special_tokens=True))
        if not contains_reference(clean_answer(answer["text"]), [reference]):
            return "wrong_answer"
    return None


def sequence_data(recipe: Recipe, tokenizer, launch: Launch) -> StageData:
    import datasets

    from data_prep.build import load_processed

    train, held, manifest = load_processed(recipe, tokenizer, allow_build=launch.world_size == 1)
    rows = [prompt_and_reference(r) for r in train]
    out = Path(recipe.output_dir)
    path = out / ANSWERS
    if launch.world_size > 1:
        have = {a["key"] for a in read_jsonl(path)} if path.is_file() else set()
        if any(row_key(r["prompt"]) not in have for r in rows):
            raise UserError(
                f"{path} does not hold the teacher's answer to every prompt; generate them once on one process "
                f"before the launch: {recipe.command('train distill', '--prepare-only')}"
            )
    answers = generate_answers(recipe, tokenizer, rows, path)
    kept, rejects = [], []
    for row in rows:
        answer = answers[row_key(row["prompt"])]
        reason = _reject(recipe, tokenizer, row, answer)
        if reason:
            rejects.append({"reason": reason, "prompt": tokenizer.decode(row["prompt"]), "answer": answer["text"]})
            continue
        completion = answer["ids"] + [tokenizer.eos_token_id]
        kept.append(
            {
                "input_ids": row["prompt"] + completion,
                "completion_mask": [0] * len(row["prompt"]) + [1] * len(completion),
            }
        )
    folder = out / DATA_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_rejects(folder, rejects)
    if not kept:
        raise UserError(
            f"no teacher answer passed the checks ({count_reasons(rejects)}); see {folder / 'rejects.jsonl'}: "
            "raise distill.max_new_tokens, or set distill.verify: none"
        )
    train_ds = datasets.Dataset.from_list(kept)
    train_ds.to_parquet(str(folder / "train.parquet"))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    seq_manifest = {
        **manifest,
        "fingerprint": hashlib.sha256(f"{manifest['fingerprint']}:{digest}".encode()).hexdigest()[:16],
        "source_fingerprint": manifest["fingerprint"],
        "train_rows": len(kept),
        "teacher_answers": len(rows),
        "teacher_rejected": count_reasons(rejects),
    }
    write_json(folder / "manifest.json", seq_manifest)
    log.info(
        "sequence distillation: %d of %d teacher answers kept, rejected %s",
        len(kept),
        len(rows),
        seq_manifest["teacher_rejected"],
    )
    return StageData(train_ds, held, seq_manifest)
