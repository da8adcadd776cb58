"""Rank-0 logging: every process may call `get_logger`, only the main one prints INFO."""

from __future__ import annotations

import logging
import os
import sys


def is_main_process() -> bool:
    """True on global rank 0 (or when not launched distributed)."""
    return int(os.environ.get("RANK", "0")) == 0


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (pytest and notebooks swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def get_logger(name: str) -> logging.Logger:
    if not logging.getLogger("trainer").handlers:
        handler = _CurrentStderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
        root = logging.getLogger("trainer")
        root.addHandler(handler)
        root.propagate = False
        # Non-zero ranks only report warnings, so a launch on 8 GPUs prints each line once.
        root.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    return logging.getLogger(f"trainer.{name}")
