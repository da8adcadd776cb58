"""Small file helpers every stage shares: jsonl, atomic writes, rejected rows, output-folder guards.

Bad input is never dropped silently: each rejected row is kept with its reason in `rejects.jsonl`
(one name everywhere) and the reasons are counted.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from train.core.errors import UserError
from train.core.log import get_logger

log = get_logger("io")

REJECTS_FILE = "rejects.jsonl"


def write_jsonl(path: str | Path, rows: Iterable[dict], append: bool = False) -> Path:
    """One JSON object per line, UTF-8, non-ASCII kept readable."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write beside the target, then rename over it: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file owner-only; others read stage.json on a cluster
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data, indent: int = 2) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str) + "\n")


def count_reasons(rejects: Iterable) -> dict[str, int]:
    """Rejected rows per reason (rows are dicts with a 'reason' key or objects with a .reason)."""
    return dict(Counter(r["reason"] if isinstance(r, dict) else r.reason for r in rejects))


def write_rejects(folder: str | Path, rejects: list, append: bool = False) -> Path:
    """`folder/rejects.jsonl`, one rejected row per line (objects with `to_json()` or dicts)."""
    rows = (r.to_json() if hasattr(r, "to_json") else r for r in rejects)
    return write_jsonl(Path(folder) / REJECTS_FILE, rows, append=append)


def check_output_dir(out: Path, marker: str, protected: Path | None = None) -> None:
    """Refuse to replace a folder this command did not write (a stage, a checkout, a user's files).

    `marker` is the report file the command leaves in every folder it writes; `protected` is a
    folder the output must not replace or contain (the stage being merged).
    """
    if protected is not None and (out == protected or out in protected.parents):
        raise UserError(f"--out {out} would replace the stage itself; choose a folder such as {protected}/merged")
    if out.exists() and any(out.iterdir()) and not (out / marker).is_file():
        raise UserError(
            f"--out {out} exists and was not written by this command (no {marker}); choose another folder or remove it"
        )


# ---------------------------------------------------------------------------------------------
# Replacing an output folder (merge, export): write into <out>.tmp, swap in, never lose the old one first.
# Written first into every `<out>.tmp` this code creates (merge and export), removed once the folder is `<out>`:
# a `<out>.tmp` without it (and without the command's report) is someone else's and is never deleted.
TMP_MARKER = ".stage-trainer-partial"


def claim_tmp(out: Path, report: str) -> Path:
    """`<out>.tmp`, where the new output is written; refuse (before any long work) one this code did not leave."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.is_symlink() or (tmp.exists() and not tmp.is_dir()):
        raise UserError(f"{tmp} exists and is not a folder this command left: move it away, then run again")
    if tmp.is_dir() and any(tmp.iterdir()) and not ((tmp / TMP_MARKER).is_file() or (tmp / report).is_file()):
        raise UserError(
            f"{tmp} exists and was not left by this command (no {TMP_MARKER} or {report} in it): "
            "move it away or remove it, then run again"
        )
    return tmp


def fresh_tmp(out: Path, report: str) -> Path:
    """An empty `<out>.tmp` holding only the marker; a previous run's partial output there is cleared."""
    tmp = claim_tmp(out, report)  # again: something may have appeared there during the long work
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        (tmp / TMP_MARKER).write_text("partial output of stage-trainer; safe to delete\n")
    except OSError as err:
        raise UserError(f"cannot prepare {tmp}: {err.strerror or err}") from err
    return tmp


def replace_output(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`. An existing `out` is renamed aside first and deleted only once the new
    folder is in place; if the move fails, the old `out` is put back and the new files stay in `tmp`."""
    aside = None
    try:
        if out.exists() or out.is_symlink():
            old = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            out.rename(old)
            aside = old
        tmp.rename(out)
    except OSError as err:
        where = f"{out} is unchanged"
        if aside is not None:
            try:
                aside.rename(out)
            except OSError:
                where = f"the previous {out.name} is in {aside}"
        raise UserError(
            f"could not move {tmp} to {out} ({err.strerror or err}); {where}, the new files stay in {tmp}"
        ) from err
    (out / TMP_MARKER).unlink(missing_ok=True)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
        if aside.exists():
            log.warning(
                "the new output is in %s; the previous one, now %s, could not be removed: remove it", out, aside
            )


def link_or_copy_tree(src: Path, dst: Path) -> Path:
    """`dst` as a copy of the folder `src`, made of hard links where the filesystem allows (no second copy of a
    large model on disk), plain copies where it does not; replaced atomically (`replace_output`)."""

    def link(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:  # another filesystem, or links not allowed
            shutil.copy2(source, target)

    tmp = dst.with_name(f"{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, copy_function=link)
    replace_output(tmp, dst)
    return dst
