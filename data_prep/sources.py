"""Read raw rows from a source: a Hub dataset id or local json/jsonl/parquet/csv/xlsx files.

Each source yields `RawRow`s (a stable row id and a dict of cells) and `Reject`s for rows that
cannot even be read (a malformed JSON line, undecodable bytes). An unreadable file fails the
build with its path.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from train.core.config import SourceConfig
from train.core.errors import UserError

LOCAL_SUFFIXES = {".json", ".jsonl", ".parquet", ".csv", ".xlsx"}


@dataclass
class RawRow:
    row_id: str
    cells: dict


@dataclass
class Reject:
    source: str
    row_id: str
    reason: str
    detail: str = ""
    row: dict | None = None

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "row_id": self.row_id,
            "reason": self.reason,
            "detail": self.detail,
            "row": self.row,
        }


def resolve_local(path: str, root: Path) -> Path | None:
    """The local file or folder a source names, or None when it is not local (a Hub id)."""
    candidate = Path(path) if Path(path).is_absolute() else root / path
    if candidate.exists():
        return candidate
    if Path(path).suffix in LOCAL_SUFFIXES or path.startswith((".", "/")) or path.count("/") > 1:
        raise UserError(f"data file not found: {candidate}")
    return None


def local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(sorted(LOCAL_SUFFIXES))})")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_SUFFIXES and not p.name.startswith((".", "~$")))
    if not files:
        raise UserError(f"{path}: folder holds no {', '.join(sorted(LOCAL_SUFFIXES))} files")
    return files


def _read_text(path: Path, source: str, rejects: list[Reject]) -> list[tuple[int, str]]:
    """Lines of a text file; lines with undecodable bytes become rejects, not crashes."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append((number, raw.decode("utf-8").rstrip("\r")))
        except UnicodeDecodeError as err:
            rejects.append(Reject(source, f"{path.name}:{number}", "undecodable", f"not UTF-8 at byte {err.start}"))
    return lines


def _iter_file(path: Path, source: str, rejects: list[Reject]) -> Iterator[RawRow]:
    suffix = path.suffix
    if suffix == ".jsonl":
        for number, line in _read_text(path, source, rejects):
            if not line.strip():
                continue
            try:
                cells = json.loads(line)
            except json.JSONDecodeError as err:
                rejects.append(Reject(source, f"{path.name}:{number}", "malformed_json", f"line {number}: {err.msg}"))
                continue
            if not isinstance(cells, dict):
                rejects.append(Reject(source, f"{path.name}:{number}", "malformed_json", "line is not an object"))
                continue
            yield RawRow(f"{path.name}:{number}", cells)
    elif suffix == ".json":
        text = "\n".join(line for _, line in _read_text(path, source, rejects))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{path}: not valid JSON (line {err.lineno}: {err.msg}); use .jsonl for line-wise data"
            ) from None
        if isinstance(data, dict):  # {"train": [...]} or {"data": [...]} dumps
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise UserError(f"{path}: expected a JSON list of rows (or one key holding it)")
            data = lists[0]
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of rows, got a {type(data).__name__}; use .jsonl for rows")
        for index, cells in enumerate(data):
            if not isinstance(cells, dict):
                rejects.append(Reject(source, f"{path.name}:{index}", "malformed_json", "row is not an object"))
                continue
            yield RawRow(f"{path.name}:{index}", cells)
    elif suffix == ".csv":
        yield from _iter_csv(path, source, rejects)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise UserError(f"{path}: cannot read parquet ({err})") from None
        for index, cells in enumerate(table.to_pylist()):
            yield RawRow(f"{path.name}:{index}", cells)
    elif suffix == ".xlsx":
        yield from _iter_xlsx(path)


def _iter_csv(path: Path, source: str, rejects: list[Reject]) -> Iterator[RawRow]:
    """CSV rows with quoted newlines kept inside their field (the csv module reads the whole text, as
    `newline=""` asks); undecodable lines and unparsable records (a field over the csv module's size limit)
    become rejects by reason."""
    text = "\n".join(line for _, line in _read_text(path, source, rejects))
    reader = csv.DictReader(io.StringIO(text, newline=""))
    index = 1
    while True:
        index += 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            rejects.append(Reject(source, f"{path.name}:{index}", "unreadable_csv", f"line {reader.line_num}: {err}"))
            continue
        yield RawRow(f"{path.name}:{index}", dict(cells))


def _iter_xlsx(path: Path) -> Iterator[RawRow]:
    from openpyxl import load_workbook

    try:
        wb = load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # zipfile/openpyxl errors for a damaged workbook
        raise UserError(f"{path}: cannot read xlsx ({err})") from None
    try:
        for ws in wb.worksheets:
            rows = ws.iter_rows(values_only=True)
            header = next(rows, None)
            if header is None:
                continue
            names = [str(h).strip() if h is not None else f"column{i}" for i, h in enumerate(header)]
            for number, values in enumerate(rows, start=2):
                if values is None or all(v is None for v in values):
                    continue  # trailing blank rows of a sheet are layout, not data
                yield RawRow(f"{path.name}:{ws.title}:{number}", dict(zip(names, values, strict=False)))
    finally:
        wb.close()


def iter_source(source: SourceConfig, root: Path, rejects: list[Reject]) -> Iterator[RawRow]:
    if source.loader == "hub":
        local = Path(source.path) if Path(source.path).is_absolute() else root / source.path
        yield from _iter_hub(source, str(local) if local.is_dir() else source.path)
        return
    found = resolve_local(source.path, root)
    if found is None and source.loader == "local":
        raise UserError(f"data file not found: {root / source.path}")
    if found is not None:
        for path in local_files(found):
            yield from _iter_file(path, source.name, rejects)
        return
    yield from _iter_hub(source, source.path)


def _iter_hub(source: SourceConfig, path: str) -> Iterator[RawRow]:
    """A Hub dataset through `datasets.load_dataset` (cached locally after the first download)."""
    import datasets

    from train.core.hub import offline_unless_hub_reachable

    offline_unless_hub_reachable()
    try:
        ds = datasets.load_dataset(path, source.config_name, split=source.split)
    except Exception as err:  # offline, missing config, auth: datasets raises many types
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(
            f"source '{source.name}': cannot load Hub dataset '{source.path}'"
            f"{f' config {source.config_name!r}' if source.config_name else ''} split {source.split!r}: {first}"
        ) from None
    for index, cells in enumerate(ds):
        yield RawRow(f"{source.split}:{index}", cells)


def eval_texts(path: str, root: Path) -> list[str]:
    """Every text cell of an eval set file or folder (for decontamination)."""
    local = resolve_local(path, root)
    if local is None:
        raise UserError(f"decontamination set not found: {root / path} (give a local file or folder)")
    rejects: list[Reject] = []
    texts: list[str] = []
    for file in local_files(local):
        for row in _iter_file(file, "decontaminate", rejects):
            texts.extend(v for v in row.cells.values() if isinstance(v, str) and v.strip())
    return texts
