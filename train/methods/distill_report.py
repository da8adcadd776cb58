"""How close a student is to its teacher, on held-out prompts of the student's own processed data.

    python -m train distill-report outputs/demo/distill [--baseline outputs/demo/student_sft] [--prompts 16]

For each model (the distilled student, any baseline such as the same student SFT'd on the raw data, and
the teacher itself): the token-level forward KL(teacher || model) on the reference completions, the
greedy answers' agreement with the teacher's (exact after KorQuAD normalization, and character F1),
and the task metric against the references (character F1 of the answer after `</think>`, or of the
reasoning when the generation budget ends before `</think>`). Writes
distill_report.json and distill_report.md into the student's folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from train.core.errors import UserError
from train.core.formats import THINK_CLOSE, THINK_OPEN
from train.core.io import atomic_write_text, write_json
from train.core.log import get_logger
from train.evaluation.qa_metrics import char_f1, clean_answer, exact_match
from train.methods.distill_loss import prompt_and_reference

log = get_logger("distill")


def held_out_rows(eval_ds, train_ds, n: int) -> list[dict]:
    """(prompt ids, reference completion ids) of the first n held-out rows (train rows if none are held out)."""
    source = eval_ds if eval_ds is not None and len(eval_ds) else train_ds
    return [prompt_and_reference(row) for row in source.select(range(min(n, len(source))))]


@torch.no_grad()
def token_kl(teacher, model, rows: list[dict], vocab: int) -> float:
    """Mean forward KL(teacher || model) per reference completion token, over the full vocabulary."""
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["prompt"] + row["reference"]])
        start = len(row["prompt"]) - 1  # logits at i predict token i + 1
        t = torch.log_softmax(teacher(input_ids=ids.to(teacher.device)).logits[0, start:-1, :vocab].float(), -1)
        s = torch.log_softmax(model(input_ids=ids.to(model.device)).logits[0, start:-1, :vocab].float(), -1)
        total += float((t.exp() * (t - s.to(t.device))).sum())
        count += t.shape[0]
    return total / max(count, 1)


@torch.no_grad()
def greedy_answers(model, tokenizer, rows: list[dict], max_new_tokens: int) -> list[str]:
    out = []
    for row in rows:
        ids = torch.tensor([row["prompt"]], device=model.device)
        gen = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def comparable(text: str) -> str:
    """The answer after `</think>` when the reasoning closed; the reasoning itself when it did not (a short
    generation budget, a small model): two students that never close it are still told apart."""
    if THINK_CLOSE in text:
        return clean_answer(text)
    return " ".join(text.replace(THINK_OPEN, " ").split())


def compare(teacher, models: dict, tokenizer, rows: list[dict], max_new_tokens: int) -> dict:
    """{name: figures} for each model and for the teacher (its task metric, KL 0 by definition)."""
    vocab = len(tokenizer)
    references = [comparable(tokenizer.decode(r["reference"], skip_special_tokens=True)) for r in rows]
    teacher_answers = [comparable(a) for a in greedy_answers(teacher, tokenizer, rows, max_new_tokens)]

    def task(answers):
        return sum(char_f1(a, [r]) for a, r in zip(answers, references, strict=True)) / max(len(rows), 1)

    report = {"prompts": len(rows), "teacher": {"task_char_f1": round(task(teacher_answers), 4)}}
    for name, model in models.items():
        answers = [comparable(a) for a in greedy_answers(model, tokenizer, rows, max_new_tokens)]
        report[name] = {
            "token_kl_to_teacher": round(token_kl(teacher, model, rows, vocab), 4),
            "answer_agreement": round(
                sum(exact_match(a, [t]) for a, t in zip(answers, teacher_answers, strict=True)) / max(len(rows), 1), 4
            ),
            "answer_char_f1_to_teacher": round(
                sum(char_f1(a, [t]) for a, t in zip(answers, teacher_answers, strict=True)) / max(len(rows), 1), 4
            ),
            "task_char_f1": round(task(answers), 4),
        }
    return report


def agreement_in_stage(recipe, trainer, tokenizer, data) -> dict:
    """The finished student (still in the trainer) beside its teacher: what stage.json records."""
    from train.models.teacher import load_teacher

    d = recipe.distill
    teacher = getattr(trainer, "teacher", None)
    teacher = trainer.accelerator.unwrap_model(teacher) if teacher is not None else load_teacher(d.teacher, "none")
    student = trainer.accelerator.unwrap_model(trainer.model)
    was_training = student.training
    student.eval()
    try:
        rows = held_out_rows(data.eval, data.train, d.report_prompts)
        return compare(teacher, {"student": student}, tokenizer, rows, d.max_new_tokens)
    finally:
        student.train(was_training)


def run_report(student_dir: str, baselines: list[str], prompts: int | None) -> dict:
    """distill_report.json/.md for a finished distill stage, with its baselines beside it."""
    from data_prep.build import load_processed
    from train.inference.hf import load_stage_model
    from train.models.teacher import load_teacher

    student, tokenizer, recipe = load_stage_model(student_dir)
    if recipe.method != "distill":
        raise UserError(f"{student_dir} is a {recipe.method} stage, not a distill stage")
    train, held, _ = load_processed(recipe, tokenizer, allow_build=False)
    rows = held_out_rows(held, train, prompts or recipe.distill.report_prompts)
    models = {"distilled": student}
    for path in baselines:
        models[Path(path).name] = load_stage_model(path)[0]
    teacher = load_teacher(recipe.distill.teacher, recipe.distill.teacher_quantization, Path(student_dir))
    report = compare(teacher, models, tokenizer, rows, recipe.distill.max_new_tokens)
    report["teacher_path"] = recipe.distill.teacher
    write_json(Path(student_dir) / "distill_report.json", report)
    atomic_write_text(Path(student_dir) / "distill_report.md", format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = [
        f"# Student vs teacher ({report['prompts']} held-out prompts)",
        "",
        "| model | token KL to teacher | answer agreement | answer char-F1 to teacher | task char-F1 |",
        "|---|---|---|---|---|",
    ]
    for name, r in report.items():
        if name == "teacher":
            lines.append(f"| teacher | 0 | 1 | 1 | {r['task_char_f1']} |")
        elif isinstance(r, dict):
            lines.append(
                f"| {name} | {r['token_kl_to_teacher']} | {r['answer_agreement']} | "
                f"{r['answer_char_f1_to_teacher']} | {r['task_char_f1']} |"
            )
    return "\n".join(lines) + "\n"
