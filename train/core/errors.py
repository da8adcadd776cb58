"""User-facing errors: one clear line, a non-zero exit, no traceback wall."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserError(Exception):
    """A mistake in the user's input (recipe, data, paths). Printed as one line, exit code 2."""


def cli_guard(main: Callable[..., T]) -> Callable[..., T]:
    """Turn a `UserError` into `error: <message>` on stderr and exit 2.

    Under a distributed launch every rank hits the same error; only the first rank of each node prints
    it, so the user reads it once per machine (a check that fails on one node only is still seen).
    Set TRAIN_DEBUG=1 to see the full traceback instead.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            if os.environ.get("TRAIN_DEBUG"):
                raise
            if os.environ.get("LOCAL_RANK", "0") == "0":
                sys.stderr.write(f"error: {err}\n")
            raise SystemExit(2) from None

    return wrapper
