"""Command tables: each command registers its own arguments and run function (as TRL's and
torchtune's CLIs do), and `main` dispatches on the table instead of a chain of if/elif."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


class _DropLine(logging.Filter):
    """Drops log records that start with a given text."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_library_noise() -> None:
    """Keep lines that tell the user nothing actionable out of our one-line errors.

    bitsandbytes logs "Failed to load CPU gemm_4bit_forward from kernels-community" on every import on
    CPUs with AVX512-BF16 when the optional `kernels` package is absent; we never use that kernel
    (train/models/loading.py keeps 4-bit layers on the dequantize path), so the line is noise.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropLine("Failed to load CPU gemm_4bit_forward"))


def build_parser(prog: str, description: str, commands: Sequence[Command]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def dispatch(
    prog: str, description: str, commands: Sequence[Command], argv: list[str], default: str | None = None
) -> None:
    """Parse `argv` against the table and run the chosen command.

    `default` names the command used when the first argument is not a command name (so
    `python -m data_prep RECIPE` keeps meaning `python -m data_prep build RECIPE`).
    """
    names = {c.name for c in commands}
    if default and argv and argv[0] not in names and not argv[0].startswith("-"):
        argv = [default, *argv]
    quiet_library_noise()
    args = build_parser(prog, description, commands).parse_args(argv)
    args.run(args)
