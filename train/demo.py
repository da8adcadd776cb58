"""The whole pipeline on the embedded default, on a CPU, offline.

    make demo                       # = python -m train demo
    python -m train demo --fast     # a few steps per stage: plumbing only (used by the test suite)

data prep (stage 1 and 2) -> stage 1 SFT (medical <think> reasoning) -> stage 2 SFT continuing from
stage 1 (Korean instructions + AI Hub Korean-English pairs) -> generation from the final model ->
task evaluation of both stages (greedy and beam search, voting) -> merge into 16-bit safetensors ->
q4_k_m GGUF through llama.cpp, both parity-checked. Writes `<out>/summary.json` and prints a summary table.
"""

from __future__ import annotations

import time
from pathlib import Path

from train.core.config import load_recipe
from train.core.io import write_json
from train.core.log import get_logger
from train.core.paths import REPO_ROOT

log = get_logger("demo")

STAGES = [
    ("stage1_medical", REPO_ROOT / "recipes/tiny/stage1_medical.yaml"),
    ("stage2_korean", REPO_ROOT / "recipes/tiny/stage2_korean.yaml"),
]
DEMO_PROMPTS = [
    "A 58-year-old woman presents with polyuria and polydipsia. Examination and tests show a fasting glucose "
    "of 180 mg/dL. What is the most likely diagnosis?",
    "캐나다의 수도는 어디인가요?",
]
FAST_OVERRIDES = ["training.max_steps=3", "training.logging_steps=1"]
SUMMARY_KEYS = (
    "train_loss_first",
    "train_loss_last",
    "eval_loss",
    "train_tokens",
    "padding_efficiency",
    "global_steps",
    "seconds",
)


def _stage_overrides(name: str, out: Path, parent: Path | None, fast: bool) -> list[str]:
    overrides = [f"output_dir={out / name}", f"data.processed_dir={out / 'data' / name}"]
    if parent is not None:
        overrides.append(f"parent={parent}")
    return overrides + (FAST_OVERRIDES if fast else [])


def _start_over(stage_dir: Path, name: str) -> None:
    """The demo starts over each time: its own earlier stage folder (stage.json of this demo stage, or only
    checkpoints) is removed; anything else there is refused by the runner's output-folder check."""
    import json
    import shutil

    if not stage_dir.is_dir():
        return
    stage_json = stage_dir / "stage.json"
    if stage_json.is_file():
        ours = json.loads(stage_json.read_text(encoding="utf-8")).get("stage") == name
    else:  # an interrupted demo stage: only what a run writes before stage.json
        ours = all(
            p.name.startswith(("checkpoint-", "tmp-checkpoint-", "metrics.jsonl", ".run.lock", "adapter"))
            for p in stage_dir.iterdir()
        )
    if ours:
        log.info("demo: replacing the earlier demo run in %s", stage_dir)
        shutil.rmtree(stage_dir)


def format_table(summary: dict) -> str:
    header = (
        f"{'stage':<16}{'loss first':>11}{'loss last':>10}{'eval loss':>10}{'tokens':>9}{'pad eff':>9}"
        f"{'steps':>7}{'seconds':>9}"
    )
    lines = [header, "-" * len(header)]
    for name, s in summary["stages"].items():
        lines.append(
            f"{name:<16}{s['train_loss_first']:>11.3f}{s['train_loss_last']:>10.3f}"
            f"{(s['eval_loss'] if s['eval_loss'] is not None else float('nan')):>10.3f}"
            f"{s['train_tokens']:>9}{s['padding_efficiency']:>9.3f}{s['global_steps']:>7}"
            f"{s['seconds']:>9.1f}"
        )
    return "\n".join(lines)


def evaluate_stages(stage_dirs: list[Path], out: Path, fast: bool) -> dict:
    """Both stages on open medical questions: greedy and beam search (3 candidates, voted), an ensemble."""
    from train.core.config import DecodingConfig, EvalConfig
    from train.evaluation.task_eval import format_eval, run_eval

    tokens = 32 if fast else 160
    cfg = EvalConfig(
        data=str(REPO_ROOT / "data_prep/samples/medical_eval_sample.jsonl"),
        decodings=[
            DecodingConfig(name="greedy", max_new_tokens=tokens),
            DecodingConfig(name="beam3", num_beams=3, num_return_sequences=3, max_new_tokens=tokens),
        ],
        primary_metric="contains_reference",
        max_examples=4 if fast else None,
    )
    report = run_eval([str(d) for d in stage_dirs], cfg, out)
    return {
        "members": {
            k: v["metrics"]
            | ({"vote_over_candidates": v["vote_over_candidates"]} if "vote_over_candidates" in v else {})
            for k, v in report["members"].items()
        },
        "ensemble": report.get("ensemble"),
        "table": format_eval(report),
        "out": str(out),
    }


def merge_and_export(stage_dir: Path, merged_dir: Path) -> tuple[dict, dict]:
    """The final stage merged (bf16) and exported to q4_k_m; the parity figures for summary.json."""
    from train.export.gguf import export_gguf
    from train.export.merge import merge_stage

    # The embedded model is this project's own work, under its license.
    merge = merge_stage(stage_dir, merged_dir, license_id="apache-2.0")
    export = export_gguf(merged_dir, ["q4_k_m"])
    merge_summary = {
        "out": str(merged_dir),
        "dtype": merge["dtype"],
        "merged_vs_base_plus_adapter": merge["merged_vs_base_plus_adapter"],
        "adapter_effect_max_abs_diff": merge["adapter_effect"]["max_abs_diff"],
    }
    gguf_summary = {
        "out": export["out"],
        "files": {
            name: {
                key: entry[key]
                for key in (
                    "type",
                    "bytes",
                    "tensor_types",
                    "fallback_tensors",
                    "tokenization_identical",
                    "vs_transformers_same_file",
                    "vs_merged",
                    "within_tolerance",
                )
            }
            | {"chat_stops_at_eos": entry["chat"]["stops_at_eos"] if entry["chat"] else None}
            | {"ollama_modelfile": entry["ollama"]["file"]}
            for name, entry in export["files"].items()
        },
    }
    return merge_summary, gguf_summary


def run_demo(out: str | Path = "outputs/demo", fast: bool = False) -> dict:
    from train.inference.generate import generate
    from train.methods.sft import run_sft

    started = time.perf_counter()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"mode": "fast" if fast else "full", "stages": {}}
    parent = None
    for name, recipe_path in STAGES:
        recipe = load_recipe(recipe_path, _stage_overrides(name, out, parent, fast))
        _start_over(Path(recipe.output_dir), name)
        record = run_sft(recipe)
        if record.get("status") == "interrupted":  # Ctrl-C / SIGTERM: the stage saved a checkpoint and said so
            raise SystemExit(f"demo interrupted during {name}; run `make demo` again to start over")
        metrics = record["metrics"]
        summary["stages"][name] = {
            **{k: metrics[k] for k in SUMMARY_KEYS},
            "output_dir": recipe.output_dir,
            "parent": record["parent"],
            "data_fingerprint": record["data"]["fingerprint"],
        }
        parent = Path(recipe.output_dir)
    final = parent
    completions = generate(final, DEMO_PROMPTS, max_new_tokens=48 if fast else 160)
    summary["generation"] = {
        "stage": str(final),
        "samples": [{"prompt": p, "completion": c} for p, c in zip(DEMO_PROMPTS, completions, strict=True)],
    }
    summary["eval"] = evaluate_stages([Path(s["output_dir"]) for s in summary["stages"].values()], out / "eval", fast)
    summary["merge"], summary["gguf"] = merge_and_export(final, out / "merged")
    summary["seconds_total"] = round(time.perf_counter() - started, 1)
    write_json(out / "summary.json", summary)

    summary["summary_path"] = str(out / "summary.json")
    return summary


def format_export_lines(summary: dict) -> str:
    merge = summary["merge"]
    lines = [
        f"merged ({merge['dtype']}) in {merge['out']}: max logit diff vs base+adapter "
        f"{merge['merged_vs_base_plus_adapter']['max_abs_diff']:.4f} "
        f"({100 * merge['merged_vs_base_plus_adapter']['relative_diff']:.2f}% of the largest logit)"
    ]
    for name, f in summary["gguf"]["files"].items():
        same = f["vs_transformers_same_file"]
        lines.append(
            f"{name}: {f['bytes'] / 1e6:.2f} MB {f['tensor_types']}; llama.cpp vs transformers on the same "
            f"file max diff {same['max_abs_diff']:.4f}, argmax agreement {same['argmax_agreement']:.3f}; "
            f"vs merged {f['vs_merged']['max_abs_diff']:.3f}; tokenization identical "
            f"{f['tokenization_identical']}; chat stops at EOS {f['chat_stops_at_eos']}"
        )
    return "\n".join(lines)


def gguf_path(summary: dict) -> str:
    """The exported file, relative to the working directory where it lies under it (for a command to copy)."""
    path = Path(summary["gguf"]["out"]) / next(iter(summary["gguf"]["files"]))
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def format_report(summary: dict) -> str:
    samples = "\n\n".join(f">>> {s['prompt']}\n{s['completion']}" for s in summary["generation"]["samples"])
    return (
        f"\ndemo ({summary['mode']}) finished in {summary['seconds_total']}s\n\n{format_table(summary)}\n\n"
        f"generation from {summary['generation']['stage']}:\n{samples}\n\n"
        f"evaluation on open medical questions:\n{summary['eval']['table']}\n{format_export_lines(summary)}\n\n"
        f"summary: {summary['summary_path']}\n"
        f"next: serve it (OpenAI API) with `python -m train serve {gguf_path(summary)}`, "
        "then `python -m train chat` for the browser page (README: Serve and share)\n"
    )
