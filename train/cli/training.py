"""Training commands: sft, reward, dpo, grpo, distill (all through the stage runner) and classify."""

from __future__ import annotations

import json
import sys

from train.core.cli import Command


def _recipe_arguments(parser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/stage1_medical.yaml")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=20")


def _stage_arguments(parser) -> None:
    _recipe_arguments(parser)
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh in an output_dir that holds an earlier run: move it aside to <dir>.replaced-<time>",
    )


def _sft(args) -> None:
    from train.core.config import load_recipe
    from train.methods.sft import run_sft

    run_sft(
        load_recipe(args.recipe, args.overrides), overwrite=args.overwrite
    )  # logs its progress and where the stage went


def _preference(method: str):
    def run(args) -> None:
        from train.core.config import load_recipe
        from train.methods.preference import Preference
        from train.methods.runner import run_stage

        recipe = load_recipe(args.recipe, args.overrides)
        record = run_stage(
            recipe, Preference(method), overwrite=args.overwrite
        )  # refuses a recipe of another method, with the fix
        if record.get("status") == "interrupted":
            return
        shown = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float)) and v is not None}
        sys.stdout.write(json.dumps(shown, indent=2) + f"\nstage: {recipe.output_dir}\n")

    return run


def _distill_arguments(parser) -> None:
    _stage_arguments(parser)
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="build the data and the teacher's answers or log-prob cache on one process, then stop "
        "(before a distributed launch)",
    )


def _distill(args) -> None:
    from train.core.config import load_recipe
    from train.methods.distill import prepare_distill, run_distill

    recipe = load_recipe(args.recipe, args.overrides)
    if args.prepare_only:
        data = prepare_distill(recipe)
        sys.stdout.write(f"prepared: {len(data.train)} train rows; launch the stage now: {recipe.output_dir}\n")
        return
    record = run_distill(recipe, overwrite=args.overwrite)
    if record.get("status") == "interrupted":
        return
    m = record["metrics"]
    shown = {k: m.get(k) for k in ("train_loss_first", "train_loss_last", "teacher_divergence_last", "eval_loss")}
    shown["teacher_agreement"] = m.get("teacher_agreement")
    sys.stdout.write(json.dumps(shown, indent=2) + f"\nstage: {recipe.output_dir}\n")


def _report_arguments(parser) -> None:
    parser.add_argument("stage", help="output_dir of a finished distill stage")
    parser.add_argument(
        "--baseline", action="append", default=[], help="another stage to compare, e.g. the student SFT'd on raw data"
    )
    parser.add_argument("--prompts", type=int, help="held-out prompts to compare on (default distill.report_prompts)")


def _distill_report(args) -> None:
    from train.methods.distill_report import format_report, run_report

    sys.stdout.write(format_report(run_report(args.stage, args.baseline, args.prompts)))


def _classify(args) -> None:
    from train.methods.classification import load_classification_recipe, run_classification

    report = run_classification(load_classification_recipe(args.recipe, args.overrides))
    if report:
        shown = {k: round(v, 4) for k, v in report["metrics"].items() if isinstance(v, float)}
        sys.stdout.write(json.dumps(shown, indent=2) + f"\nmodel: {report['model_dir']}\n")


COMMANDS = [
    Command("sft", "supervised fine-tuning of one stage", _stage_arguments, _sft),
    Command(
        "reward",
        "pairwise reward model (TRL RewardTrainer) after an SFT stage",
        _stage_arguments,
        _preference("reward"),
    ),
    Command("dpo", "DPO and its variants (TRL DPOTrainer) after an SFT stage", _stage_arguments, _preference("dpo")),
    Command("grpo", "GRPO (TRL GRPOTrainer) after an SFT stage", _stage_arguments, _preference("grpo")),
    Command(
        "distill", "a student learns from a trained teacher stage (logit or sequence)", _distill_arguments, _distill
    ),
    Command(
        "distill-report",
        "a distilled student beside its teacher and baselines: KL, answer agreement, task metric",
        _report_arguments,
        _distill_report,
    ),
    Command("classify", "fine-tune an encoder for single- or multi-label classification", _recipe_arguments, _classify),
]
