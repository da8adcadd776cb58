"""Build the processed dataset of a stage, once, before launch.

    python -m data_prep recipes/stage1_medical.yaml [section.key=value ...]
    python -m data_prep codeio recipes/codeio/starter.yaml      CodeI/O rows from Python functions

Writes data.processed_dir: train.parquet, eval.parquet, manifest.json, rejects.jsonl and
length_histogram.png, and prints the report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from train.errors import cli_guard


@cli_guard
def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["codeio"]:
        from data_prep.codeio import build_codeio, load_spec

        if len(argv) != 2:
            raise SystemExit("usage: python -m data_prep codeio SPEC.yaml")
        spec = load_spec(argv[1])
        sys.stdout.write(json.dumps(build_codeio(spec), indent=2) + f"\n  written to {spec.out}\n")
        return
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. data.max_length=1024")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    from data_prep.build import build, format_report, processed_dir
    from train.config import load_recipe
    from train.model import load_tokenizer

    recipe = load_recipe(args.recipe, args.overrides)
    manifest = build(recipe, load_tokenizer(recipe.model))
    sys.stdout.write(format_report(manifest) + f"\n  written to {processed_dir(recipe)}\n")


if __name__ == "__main__":
    main()
