"""Read raw rows from a source: a Hub dataset id or local json/jsonl/parquet/csv/xlsx files.

Each source yields `RawRow`s (a stable row id and a dict of cells) and `Reject`s for rows that
cannot even be read (a malformed JSON line, undecodable bytes). An unreadable file fails the
build with its path.

Every reader streams, so memory does not grow with the file:

- `.jsonl` and `.csv`: line by line (`readline` with a bound: a line over `MAX_LINE_BYTES` is a
  `line_too_long` reject, never read whole); the csv module gets the lines, so quoted newlines stay.
- `.json`: a top-level array (or an object with one key holding it) is decoded one element at a time
  with the standard library's decoder over a sliding buffer; one element may be at most
  `MAX_LINE_BYTES`.
- `.parquet`: `pyarrow.parquet.ParquetFile.iter_batches`, unbuffered row groups (pre_buffer off), so a
  file written as one huge row group is still read a batch at a time.
- `.xlsx`: openpyxl `read_only` rows. The sheet's stated size (`<dimension ref="A1:ZZ1000000">`) is
  ignored, rows are cut to the header's width, and a run of more than `XLSX_MAX_EMPTY_CELLS` empty
  cells (blank rows, or row numbers skipping ahead) stops the build with the sheet and row. openpyxl
  keeps the shared-strings table in memory: a workbook whose table is over `XLSX_MAX_SHARED_STRINGS`
  bytes is refused with the fix (save it as .csv).
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from train.core.config import SourceConfig
from train.core.errors import UserError

LOCAL_SUFFIXES = {".json", ".jsonl", ".parquet", ".csv", ".xlsx"}

MAX_LINE_BYTES = 64 * 2**20  # one JSONL/CSV line or one .json element; longer is a reject or an error
READ_CHUNK = 2**20  # bytes read at a time from a .json file
PARQUET_BATCH_ROWS = 1024
XLSX_MAX_COLUMNS = 1_000  # a header wider than this is refused
XLSX_MAX_EMPTY_CELLS = 1_000_000  # empty cells in a row (padding included) before a sheet is refused
XLSX_MAX_SHARED_STRINGS = 512 * 2**20  # uncompressed sharedStrings.xml openpyxl would hold in memory


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


class RejectSink(Protocol):
    """Where readers put rows they cannot read: a list, or the build's streaming rejects file."""

    def append(self, reject: Reject, /) -> None: ...


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


def _iter_lines(path: Path, source: str, rejects: RejectSink) -> Iterator[tuple[int, str]]:
    """(line number, text without its line ending), one line in memory at a time. A line with undecodable
    bytes or over `MAX_LINE_BYTES` becomes a reject, not a crash and not a 2 GB string."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; the generator may stop early
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    with f:
        number = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line, a bounded piece at a time
                    raw = f.readline(READ_CHUNK)
                    size += len(raw)
                rejects.append(
                    Reject(
                        source,
                        f"{path.name}:{number}",
                        "line_too_long",
                        f"line {number} is {size} bytes (more than {MAX_LINE_BYTES})",
                    )
                )
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                rejects.append(Reject(source, f"{path.name}:{number}", "undecodable", f"not UTF-8 at byte {err.start}"))
                continue
            yield number, text.rstrip("\n").rstrip("\r")


def _iter_jsonl(path: Path, source: str, rejects: RejectSink) -> Iterator[RawRow]:
    for number, line in _iter_lines(path, source, rejects):
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


# Bytes that are not UTF-8 are decoded to lone surrogates (errors="surrogateescape") so that one bad row
# is a reject; a surrogate outside a string is a JSON syntax error like any other.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_WHITESPACE = " \t\n\r"
_NUMBER = "0123456789.eE+-"


class _JsonStream:
    """A sliding window over a JSON file: values are decoded one at a time with `json.JSONDecoder.raw_decode`,
    reading more only when a value is cut by the window's end (at most `MAX_LINE_BYTES` per value)."""

    def __init__(self, path: Path, f):
        self.path, self.f = path, f
        self.decoder = json.JSONDecoder()
        self.text_decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.buf, self.pos, self.eof = "", 0, False
        self.lines_before = 0  # newlines in the text already dropped from the window

    def _read(self, size: int) -> bool:
        if self.eof:
            return False
        data = self.f.read(size)
        if not data:
            self.eof = True
            self.buf += self.text_decoder.decode(b"", final=True)
            return False
        self.lines_before += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos :] + self.text_decoder.decode(data)
        self.pos = 0
        return True

    def line(self, pos: int | None = None) -> int:
        return self.lines_before + self.buf.count("\n", 0, self.pos if pos is None else pos) + 1

    def peek(self) -> str:
        """The next character that is not whitespace ('' at the end of the file), without taking it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._read(READ_CHUNK):
                return ""

    def take(self, expected: str) -> None:
        char = self.peek()
        if not char or char not in expected:
            found = repr(char) if char else "the end of the file"
            raise self.invalid(f"expected {' or '.join(repr(c) for c in expected)}, found {found}")
        self.pos += 1

    def value(self):
        """(decoded value, whether it held bytes that are not UTF-8) of the next value."""
        self.peek()
        size = READ_CHUNK
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as err:
                # A value cut by the window's end fails there (or as an unterminated string): read on. An error
                # further back is the file's own.
                cut = err.msg.startswith("Unterminated string") or err.pos >= len(self.buf) - 32
                if cut and self._grow(size):
                    size *= 2
                    continue
                raise self.invalid(err.msg, err.pos) from None
            if self._maybe_cut(value, end) and self._grow(size):
                size *= 2
                continue
            bad = _ESCAPED_BYTE.search(self.buf, self.pos, end) is not None
            self.pos = end
            return value, bad

    def _maybe_cut(self, value, end: int) -> bool:
        """Whether a decoded value may go on past the window: one that ends at the window's end, or a number
        followed only by number characters ('12' of '12.5e3', '-98765' of '-98765.', ...)."""
        if self.eof:
            return False
        if end == len(self.buf):
            return True
        if not isinstance(value, (int, float)) or isinstance(value, bool) or self.buf[end] not in _NUMBER:
            return False
        return not self.buf[end:].strip(_NUMBER)

    def _grow(self, size: int) -> bool:
        if len(self.buf) - self.pos > MAX_LINE_BYTES:
            raise UserError(
                f"{self.path}: the JSON value starting at line {self.line()} is over {MAX_LINE_BYTES} bytes or not "
                "valid JSON; use .jsonl (one row per line) for large data"
            )
        return self._read(size)

    def invalid(self, msg: str, pos: int | None = None) -> UserError:
        return UserError(f"{self.path}: not valid JSON (line {self.line(pos)}: {msg}); use .jsonl for line-wise data")


def _iter_json(path: Path, source: str, rejects: RejectSink) -> Iterator[RawRow]:
    """A .json file holding a list of rows, or an object with exactly one key holding such a list."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    with f:
        stream = _JsonStream(path, f)
        if stream.peek() == "\ufeff":  # a byte-order mark is not JSON, but harmless
            stream.pos += 1
        first = stream.peek()
        if first == "[":
            yield from _json_rows(stream, path, source, rejects)
        elif first == "{":  # {"train": [...]} or {"data": [...]} dumps
            yield from _json_wrapped_rows(stream, path, source, rejects)
        elif not first:
            raise UserError(f"{path}: not valid JSON (the file is empty); use .jsonl for line-wise data")
        else:
            value, _ = stream.value()
            raise UserError(f"{path}: expected a JSON list of rows, got a {type(value).__name__}; use .jsonl for rows")
        if stream.peek():
            raise stream.invalid("extra data after the list")


def _json_rows(stream: _JsonStream, path: Path, source: str, rejects: RejectSink) -> Iterator[RawRow]:
    stream.take("[")
    if stream.peek() == "]":
        stream.pos += 1
        return
    index = 0
    while True:
        cells, bad = stream.value()
        row_id = f"{path.name}:{index}"
        if bad:
            rejects.append(Reject(source, row_id, "undecodable", f"row {index} holds bytes that are not UTF-8"))
        elif not isinstance(cells, dict):
            rejects.append(Reject(source, row_id, "malformed_json", "row is not an object"))
        else:
            yield RawRow(row_id, cells)
        index += 1
        stream.take(",]")
        if stream.buf[stream.pos - 1] == "]":
            return


def _json_wrapped_rows(stream: _JsonStream, path: Path, source: str, rejects: RejectSink) -> Iterator[RawRow]:
    stream.take("{")
    lists = 0
    if stream.peek() == "}":
        stream.pos += 1
    else:
        while True:
            key, _ = stream.value()
            if not isinstance(key, str):
                raise stream.invalid("expected a key in double quotes")
            stream.take(":")
            if stream.peek() == "[":
                lists += 1
                if lists > 1:
                    raise UserError(f"{path}: expected a JSON list of rows (or one key holding it)")
                yield from _json_rows(stream, path, source, rejects)
            else:
                stream.value()  # metadata beside the rows
            stream.take(",}")
            if stream.buf[stream.pos - 1] == "}":
                break
    if lists != 1:
        raise UserError(f"{path}: expected a JSON list of rows (or one key holding it)")


def _iter_file(path: Path, source: str, rejects: RejectSink) -> Iterator[RawRow]:
    suffix = path.suffix
    if suffix == ".jsonl":
        yield from _iter_jsonl(path, source, rejects)
    elif suffix == ".json":
        yield from _iter_json(path, source, rejects)
    elif suffix == ".csv":
        yield from _iter_csv(path, source, rejects)
    elif suffix == ".parquet":
        yield from _iter_parquet(path)
    elif suffix == ".xlsx":
        yield from _iter_xlsx(path)


def _iter_parquet(path: Path) -> Iterator[RawRow]:
    """A batch of rows at a time. pre_buffer off and a read buffer make pyarrow read a row group's pages as
    it goes instead of the whole row group first (a file written as one 500 MB row group: 115 MB peak RSS
    instead of 600 MB, measured)."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path, buffer_size=READ_CHUNK, pre_buffer=False).iter_batches(
            batch_size=PARQUET_BATCH_ROWS
        )
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: cannot read parquet ({err})") from None
    index = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as err:  # a damaged page or row group further in
            raise UserError(f"{path}: cannot read parquet after row {index} ({err})") from None
        for cells in batch.to_pylist():
            yield RawRow(f"{path.name}:{index}", cells)
            index += 1


def _iter_csv(path: Path, source: str, rejects: RejectSink) -> Iterator[RawRow]:
    """CSV rows with quoted newlines kept inside their field (the csv module is fed the file's lines with
    their line ends); undecodable lines and unparsable records (a field over the csv module's size limit)
    become rejects by reason."""
    lines = (line + "\n" for _, line in _iter_lines(path, source, rejects))
    reader = csv.DictReader(lines)
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


def _xlsx_shared_strings_size(path: Path) -> int:
    try:
        with zipfile.ZipFile(path) as zf:
            return sum(i.file_size for i in zf.infolist() if i.filename.lower().endswith("sharedstrings.xml"))
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"{path}: cannot read xlsx ({err})") from None


def _iter_xlsx(path: Path) -> Iterator[RawRow]:
    from openpyxl import load_workbook

    strings = _xlsx_shared_strings_size(path)
    if strings > XLSX_MAX_SHARED_STRINGS:
        raise UserError(
            f"{path}: its shared-strings table is {strings / 2**20:.0f} MiB (more than "
            f"{XLSX_MAX_SHARED_STRINGS / 2**20:.0f} MiB, which would be held in memory); split the workbook or "
            "save each sheet as .csv, which is streamed"
        )
    try:
        wb = load_workbook(path, read_only=True, data_only=True)
    except Exception as err:  # zipfile/openpyxl errors for a damaged workbook
        raise UserError(f"{path}: cannot read xlsx ({err})") from None
    try:
        for ws in wb.worksheets:
            yield from _iter_sheet(path, ws)
    finally:
        wb.close()


def _iter_sheet(path: Path, ws) -> Iterator[RawRow]:
    """The rows of one read-only sheet as dicts keyed by its first non-blank row.

    The stated dimension is dropped (`reset_dimensions`), so openpyxl pads nothing to it; data rows are
    read cut to the header's width (`max_col`), so a stray cell at column XFD never makes a 16,384-wide
    row. Blank rows are layout, but a run of them (or row numbers skipping ahead, which openpyxl fills
    with blank rows) over `XLSX_MAX_EMPTY_CELLS` cells stops the build."""
    where = f"{path} sheet '{ws.title}'"

    def too_empty(number: int) -> UserError:
        return UserError(
            f"{where}: more than {XLSX_MAX_EMPTY_CELLS:,} empty cells in a row up to row {number}; delete the "
            "empty rows and columns (or save the sheet as .csv)"
        )

    ws.reset_dimensions()
    empty = 0
    header: tuple | None = None
    header_row = 0
    rows = ws.iter_rows(min_row=1, values_only=True)  # each row only as wide as its own last cell
    try:
        for number, values in enumerate(rows, start=1):
            if any(v is not None for v in values):
                header, header_row = tuple(values), number
                break
            empty += max(1, len(values))
            if empty > XLSX_MAX_EMPTY_CELLS:
                raise too_empty(number)
    finally:
        rows.close()
    if header is None:
        return
    while header and header[-1] is None:
        header = header[:-1]
    if len(header) > XLSX_MAX_COLUMNS:
        raise UserError(
            f"{where}: the header (row {header_row}) is {len(header)} columns wide (more than {XLSX_MAX_COLUMNS}); "
            "delete the stray cells to its right"
        )
    names = [str(h).strip() if h is not None else f"column{i}" for i, h in enumerate(header)]
    empty = 0
    rows = ws.iter_rows(min_row=header_row + 1, max_col=len(names), values_only=True)
    try:
        for number, values in enumerate(rows, start=header_row + 1):
            if all(v is None for v in values):
                empty += len(names)  # trailing blank rows of a sheet are layout, not data
                if empty > XLSX_MAX_EMPTY_CELLS:
                    raise too_empty(number)
                continue
            empty = 0
            yield RawRow(f"{path.name}:{ws.title}:{number}", dict(zip(names, values, strict=False)))
    finally:
        rows.close()


def iter_source(source: SourceConfig, root: Path, rejects: RejectSink) -> Iterator[RawRow]:
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
    """A Hub dataset through `datasets.load_dataset` (cached locally after the first download; the rows
    are read from its memory-mapped Arrow files a batch at a time)."""
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
    index = 0
    for batch in ds.iter(batch_size=PARQUET_BATCH_ROWS):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            yield RawRow(f"{source.split}:{index}", dict(zip(columns, values, strict=True)))
            index += 1


def eval_texts(path: str, root: Path) -> Iterator[str]:
    """Every text cell of an eval set file or folder (for decontamination), a row at a time."""
    local = resolve_local(path, root)
    if local is None:
        raise UserError(f"decontamination set not found: {root / path} (give a local file or folder)")
    rejects: list[Reject] = []
    for file in local_files(local):
        for row in _iter_file(file, "decontaminate", rejects):
            yield from (v for v in row.cells.values() if isinstance(v, str) and v.strip())
