"""Command line of the trainer.

    python -m train sft RECIPE [section.key=value ...]     train one stage
    python -m train generate STAGE_DIR --prompt TEXT       generate from a trained stage
    python -m train demo [--fast]                          the whole pipeline on the embedded tiny model
    python -m train build-tiny                             build (or find) the embedded tiny model
    python -m train pick-strategy RECIPE --gpus N          STRATEGY=auto: which accelerate config to use
"""

from __future__ import annotations

import argparse
import os
import sys

from train.errors import UserError, cli_guard


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sft = sub.add_parser("sft", help="supervised fine-tuning of one stage")
    sft.add_argument("recipe", help="recipe YAML, e.g. recipes/stage1_medical.yaml")
    sft.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=20")
    gen = sub.add_parser("generate", help="generate from a trained stage")
    gen.add_argument("stage_dir")
    gen.add_argument("--prompt", action="append", required=True, help="a question (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    demo = sub.add_parser("demo", help="whole pipeline on the embedded tiny model")
    demo.add_argument("--fast", action="store_true", help="few steps: checks the plumbing, not the learning")
    demo.add_argument("--out", default="outputs/demo", help="where the demo writes its stages and summary")
    sub.add_parser("build-tiny", help="build the embedded tiny model and print its folder")
    pick = sub.add_parser("pick-strategy", help="STRATEGY=auto: print the launch strategy for a recipe and GPUs")
    pick.add_argument("recipe")
    pick.add_argument("--gpus", type=int, required=True)
    pick.add_argument("--gpu-memory-gb", type=float, help="memory per GPU (default: read from the first GPU)")
    return parser


def _pick_strategy(args) -> None:
    from train.config import load_recipe
    from train.launch import gpu_memory_gb, parameter_count, pick_strategy
    from train.model import load_model_config

    recipe = load_recipe(args.recipe)
    memory = args.gpu_memory_gb or gpu_memory_gb()
    if memory is None:
        raise UserError("no GPU visible to read its memory from; pass --gpu-memory-gb (e.g. 24 for a 4090, 80 for H100)")
    params = parameter_count(load_model_config(recipe.model))
    strategy, why = pick_strategy(params, recipe.model.quantization, args.gpus, memory)
    sys.stderr.write(f"STRATEGY=auto -> {strategy}: {why}\n")
    sys.stdout.write(("ddp" if strategy == "single" else strategy) + "\n")


@cli_guard
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "sft":
        from train.config import load_recipe
        from train.sft import run_sft

        run_sft(load_recipe(args.recipe, args.overrides))
    elif args.command == "generate":
        from train.generate import generate

        for prompt, text in zip(args.prompt, generate(args.stage_dir, args.prompt, args.max_new_tokens), strict=True):
            sys.stdout.write(f"### {prompt}\n{text}\n\n")
    elif args.command == "demo":
        from train.demo import format_report, run_demo

        sys.stdout.write(format_report(run_demo(out=args.out, fast=args.fast)))
    elif args.command == "build-tiny":
        from train.tiny import ensure_tiny_model

        sys.stdout.write(f"{ensure_tiny_model()}\n")
    elif args.command == "pick-strategy":
        _pick_strategy(args)
    else:  # argparse already rejects unknown commands
        raise UserError(f"unknown command {args.command}")


if __name__ == "__main__":
    main()
