"""Helper commands: demo, build-tiny, pick-strategy, check-launch, supervise, recipe-help."""

from __future__ import annotations

import sys

from train.core.cli import Command
from train.core.errors import UserError


def _demo_arguments(p) -> None:
    p.add_argument("--fast", action="store_true", help="few steps: checks the plumbing, not the learning")
    p.add_argument("--out", default="outputs/demo", help="where the demo writes its stages and summary")


def _demo(args) -> None:
    from train.demo import format_report, run_demo

    sys.stdout.write(format_report(run_demo(out=args.out, fast=args.fast)))


def _build_tiny(args) -> None:
    from train.models.tiny import ensure_tiny_model

    sys.stdout.write(f"{ensure_tiny_model()}\n")


def _pick_arguments(p) -> None:
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, as given to the launched command (lora=none ...)")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--gpu-memory-gb", type=float, help="memory per GPU (default: read from the first GPU)")
    p.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="print the sequence-parallel degree N a micro-batch of data.max_length tokens needs instead (SP=auto)",
    )
    p.add_argument("--strategy", help="with --sequence-parallel: the strategy the launch uses (default: the pick)")


def _pick_strategy(args) -> None:
    from train.core.config import load_recipe
    from train.methods.launch import gpu_memory_gb, parameter_count, pick_strategy
    from train.models.loading import load_model_config

    recipe = load_recipe(args.recipe, args.overrides)
    memory = args.gpu_memory_gb or gpu_memory_gb()
    if memory is None:
        raise UserError(
            "no GPU visible to read its memory from; pass --gpu-memory-gb (e.g. 24 for a 4090, 80 for H100)"
        )
    config = load_model_config(recipe.model)
    strategy, why = pick_strategy(
        parameter_count(config), recipe.model.quantization, args.gpus, memory, full=recipe.full_finetune
    )
    if not args.sequence_parallel:
        sys.stderr.write(f"STRATEGY=auto -> {strategy}: {why}\n")
        sys.stdout.write(("ddp" if strategy == "single" else strategy) + "\n")
        return
    from train.methods.memory import pick_sequence_parallel

    tokens = recipe.data.max_length * recipe.training.per_device_train_batch_size  # packed rows of max_length
    n, why = pick_sequence_parallel(
        config,
        recipe.model.quantization,
        args.strategy or strategy,
        args.gpus,
        memory,
        tokens,
        None if recipe.full_finetune else recipe.lora.r,
    )
    if n is None:
        raise UserError(f"SP=auto: {why}")
    sys.stderr.write(f"SP=auto -> training.sequence_parallel={n}: {why}\n")
    sys.stdout.write(f"{n}\n")


def _check_launch_arguments(p) -> None:
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="section.key=value, as given to the launched command")
    p.add_argument("--strategy", required=True, choices=["ddp", "fsdp", "zero2", "zero3", "zero3_offload"])
    p.add_argument("--processes", type=int, required=True, help="processes the launch will start (GPUS x NODES)")
    p.add_argument(
        "--config-file",
        help="the accelerate config the launch will use (its mixed_precision and FSDP wrap class are checked)",
    )
    p.add_argument("--overwrite", action="store_true", help="as given to the launched command")


def _check_launch(args) -> None:
    import yaml

    from train.core.config import load_recipe
    from train.methods.launch import Launch, check_fsdp_wrap, fsdp_wrap_classes
    from train.methods.runner import preflight

    recipe = load_recipe(args.recipe, args.overrides)
    precision = None
    if args.config_file:
        with open(args.config_file, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        value = config.get("mixed_precision", "no")
        precision = "no" if value in (False, None) else str(value)  # YAML reads an unquoted `no` as False
        # Before the launch, not on every rank after loading: an FSDP wrap class the model does not have.
        check_fsdp_wrap(
            recipe, fsdp_wrap_classes((config.get("fsdp_config") or {}).get("fsdp_transformer_layer_cls_to_wrap"))
        )
    strategy = "single" if args.strategy == "ddp" and args.processes == 1 else args.strategy.replace("_offload", "")
    preflight(recipe, Launch(strategy, args.processes), precision, overwrite=args.overwrite)
    sys.stderr.write(f"check-launch: {args.recipe} is ready for {args.strategy} on {args.processes} process(es)\n")
    sys.stdout.write(recipe.method + "\n")  # the command the launch runs (make train reads it)


def _supervise_arguments(p) -> None:
    import argparse

    p.add_argument("launch", nargs=argparse.REMAINDER, help="-- accelerate launch ... -m train sft RECIPE [overrides]")


def _supervise(args) -> None:
    from train.methods.supervise import main

    main(args.launch)


def _recipe_help_arguments(p) -> None:
    p.add_argument("section", nargs="?", help="one section, e.g. training or data.dedup (default: all)")
    p.add_argument("--markdown", action="store_true", help="the reference page (docs/recipe-reference.md)")


def _recipe_help(args) -> None:
    from train.core.config import Recipe
    from train.core.reference import describe, format_markdown, format_text

    rows = describe(Recipe, args.section)
    sys.stdout.write(format_markdown(rows) if args.markdown else format_text(rows))


COMMANDS = [
    Command("demo", "the whole pipeline on the embedded tiny model (CPU, offline)", _demo_arguments, _demo),
    Command("build-tiny", "build (or find) the embedded tiny model and print its folder", lambda p: None, _build_tiny),
    Command(
        "pick-strategy",
        "STRATEGY=auto: print the launch strategy for a recipe and GPUs",
        _pick_arguments,
        _pick_strategy,
    ),
    Command(
        "check-launch",
        "the stage's start-up checks, once, before a distributed launch (make train-*)",
        _check_launch_arguments,
        _check_launch,
    ),
    Command(
        "supervise",
        "run a launch so a preemption signal ends in a checkpoint and exit 0 (make train-*, slurm.sbatch)",
        _supervise_arguments,
        _supervise,
    ),
    Command("recipe-help", "every recipe field with its type, default and help", _recipe_help_arguments, _recipe_help),
]
