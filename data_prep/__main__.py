"""Build the processed dataset of a stage, once, before launch.

    python -m data_prep RECIPE [section.key=value ...]        = python -m data_prep build RECIPE ...
    python -m data_prep codeio recipes/codeio/starter.yaml    CodeI/O rows from Python functions (bubblewrap sandbox)

`build` writes data.processed_dir: train.parquet, eval.parquet, manifest.json, rejects.jsonl and
length_histogram.png, and prints the report.
"""

from __future__ import annotations

import json
import os
import sys

from train.core.cli import Command, dispatch
from train.core.errors import cli_guard


def _build_arguments(p) -> None:
    p.add_argument("recipe", help="stage recipe YAML, e.g. recipes/stage1_medical.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.max_length=1024")


def _build(args) -> None:
    from data_prep.build import build, format_report, processed_dir
    from train.core.config import load_recipe
    from train.models.loading import load_tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    recipe = load_recipe(args.recipe, args.overrides)
    manifest = build(recipe, load_tokenizer(recipe.model))
    sys.stdout.write(format_report(manifest) + f"\n  written to {processed_dir(recipe)}\n")


def _codeio_arguments(p) -> None:
    p.add_argument("spec", help="CodeI/O spec YAML, e.g. recipes/codeio/starter.yaml")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. teacher.kind=local")
    from data_prep.codeio import NO_ISOLATION_HELP

    p.add_argument("--no-isolation", action="store_true", help=NO_ISOLATION_HELP)


def _codeio(args) -> None:
    from data_prep.codeio import build_codeio, load_spec

    spec = load_spec(args.spec, args.overrides)
    manifest = build_codeio(spec, isolation=not args.no_isolation)
    sys.stdout.write(json.dumps(manifest, indent=2) + f"\n  written to {spec.out}\n")


COMMANDS = [
    Command(
        "build",
        "raw sources -> the stage's processed, validated dataset (the default command)",
        _build_arguments,
        _build,
    ),
    Command(
        "codeio", "CodeI/O rows: Python functions run in a sandbox, verified predictions", _codeio_arguments, _codeio
    ),
]


@cli_guard
def main(argv: list[str] | None = None) -> None:
    dispatch("python -m data_prep", __doc__ or "", COMMANDS, sys.argv[1:] if argv is None else argv, default="build")


if __name__ == "__main__":
    main()
