"""Standard benchmarks through EleutherAI's lm-evaluation-harness, on a stage, a merged folder or a base model.

    python -m train lm-eval outputs/stage2_korean --tasks kormedmcqa,kmmlu,kobest --limit 200
    python -m train lm-eval outputs/demo/stage1_medical --tasks kormedmcqa_sample      (bundled, offline)
    make lm-eval STAGE=outputs/stage2_korean TASKS=kormedmcqa

Tasks: lm-eval's own registry (KorMedMCQA, KMMLU, KoBEST, HAE-RAE, CLIcK, ...; their data come from the Hub),
the tasks in train/evaluation/lm_eval_tasks/, and any folder of task YAMLs given with --include-path. A stage is
evaluated as its base with the whole adapter chain merged in 16-bit in memory (what `train merge` writes), so
its scores are the merged folder's. GGUF files are refused: lm-eval's gguf backend goes through a llama.cpp
server whose log-likelihoods disagreed with transformers here; evaluate the merged folder instead.

Writes <out>/lm_eval_results.json (scores, task configs and versions, the target's lineage) and, with
--log-samples, <out>/samples_<task>.jsonl (every request and its log-likelihoods); prints lm-eval's table.
"""

from __future__ import annotations

import json
from pathlib import Path

from train.core.errors import UserError
from train.core.io import write_json, write_jsonl
from train.core.log import get_logger
from train.inference.targets import stage_recipe

log = get_logger("lm-eval")
BUNDLED_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("train lm-eval needs lm-evaluation-harness: pip install -e '.[lm-eval]'") from None
    return lm_eval, HFLM, TaskManager


def task_manager(TaskManager, tasks: list[str], include_paths: list[str]):
    """lm-eval's task index; the local folders alone when they hold every task (indexing all ~15k of lm-eval's
    own takes ~15 s), and unknown names refused before any model loads."""
    local = TaskManager(include_path=include_paths, include_defaults=False)
    if all(t in local.all_tasks for t in tasks):
        return local
    manager = TaskManager(include_path=include_paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown lm-eval task(s) {unknown}; list them with `lm-eval ls tasks`, or add a folder "
            "of task YAMLs with --include-path"
        )
    return manager


def check_target(target: str, trust_remote_code: bool = False) -> None:
    """Refuse what cannot be scored (or a stage whose stored recipe wants remote code, without
    `trust_remote_code`) before indexing tasks or loading anything."""
    path = Path(target)
    if path.suffix == ".gguf":
        raise UserError(
            f"{target}: lm-eval on GGUF goes through a llama.cpp server whose log-likelihoods disagree "
            "with transformers; run lm-eval on the merged folder the GGUF was exported from"
        )
    if path.exists() and not ((path / "stage.json").is_file() or (path / "config.json").is_file()):
        raise UserError(f"{target} is not a stage folder (stage.json), a model folder (config.json) or a .gguf file")
    if (path / "stage.json").is_file():
        stage_recipe(path, trust_remote_code=trust_remote_code)


def load_target(target: str, trust_remote_code: bool = False):
    """(model, tokenizer, lineage) of a stage folder, a merged folder, or a base model id/folder (after
    check_target)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.inference.hf import load_stage_model

    path = Path(target)
    if (path / "stage.json").is_file():
        model, tokenizer, _ = load_stage_model(path, trust_remote_code=trust_remote_code)
        stage = json.loads((path / "stage.json").read_text(encoding="utf-8"))
        return (
            model,
            tokenizer,
            {
                "stage": stage.get("stage"),
                "base_model": stage.get("base_model"),
                "parent": stage.get("parent"),
                "folder": str(path),
            },
        )
    try:  # a merged folder, or a base model (Hub id or folder) to compare against
        model = AutoModelForCausalLM.from_pretrained(target, dtype="auto").eval()
        tokenizer = AutoTokenizer.from_pretrained(target)
    except OSError as err:
        raise UserError(f"cannot load model '{target}': {str(err).splitlines()[0]}") from None
    return model, tokenizer, {"model": target}


def run_lm_eval(
    target: str,
    tasks: list[str],
    out: str | Path,
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    include_paths: list[str] | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    seed: int = 1234,
    trust_remote_code: bool = False,
) -> dict:
    """`trust_remote_code`: the user's opt-in (--trust-remote-code) for a stage whose stored recipe sets
    model.trust_remote_code; without it such a stage is refused before anything loads."""
    check_target(target, trust_remote_code)
    lm_eval, HFLM, TaskManager = _lm_eval()
    manager = task_manager(TaskManager, tasks, [str(BUNDLED_TASKS), *(include_paths or [])])
    model, tokenizer, lineage = load_target(target, trust_remote_code)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        apply_chat_template=apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None) or {}
    for task, rows in samples.items():
        write_jsonl(out / f"samples_{task}.jsonl", rows)
    report = {
        "target": lineage,
        "tasks": tasks,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "results": results["results"],
        "n_samples": results.get("n-samples"),
        "versions": results.get("versions"),
        "configs": results.get("configs"),
        "lm_eval_version": lm_eval.__version__,
    }
    write_json(out / "lm_eval_results.json", report)
    report["table"] = format_results(report)
    return report


def format_results(report: dict) -> str:
    """Task | metric | filter | value | stderr | n, from lm-eval's "metric,filter" keys.

    (lm-eval's own make_table needs a pytablewriter that conflicts with pandas' python-dateutil pin.)
    """
    lines = ["| task | metric | filter | value | stderr | n |", "|---|---|---|---:|---:|---:|"]
    counts = report.get("n_samples") or {}
    for task, scores in report["results"].items():
        n = (counts.get(task) or {}).get("effective", "")
        for key, value in scores.items():
            if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                continue
            metric, filt = key.split(",", 1)
            stderr = scores.get(f"{metric}_stderr,{filt}")
            lines.append(
                f"| {task} | {metric} | {filt} | {value:.4f} | {stderr:.4f} | {n} |"
                if isinstance(stderr, int | float)
                else f"| {task} | {metric} | {filt} | {value:.4f} | | {n} |"
            )
    return "\n".join(lines)
