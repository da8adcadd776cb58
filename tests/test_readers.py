"""Source readers stream: memory stays flat as files grow, and hostile spreadsheets cannot pad billions of cells.

Memory is measured with tracemalloc (Python allocations: the whole-file readers held every line, row or
cell as Python objects). Each check fails on the readers that loaded the file at once.
"""

from __future__ import annotations

import csv
import json
import re
import signal
import time
import tracemalloc
import zipfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from data_prep import sources
from data_prep.sources import Reject, iter_source
from train.core.config import SourceConfig
from train.core.errors import UserError

ROW = {
    "Question": "A 45-year-old man has chest pain radiating to the left arm. Diagnosis? " * 4,
    "Complex_CoT": "Chest pain with radiation suggests ischemia; check troponin and the ECG. " * 12,
    "Response": "Acute myocardial infarction.",
}
ROWS = 8000  # 12 MB of row text (as JSONL)
PEAK_BOUND = 6 * 2**20  # the whole-file readers peaked at 1-3x the data: 12-40 MB here


def read_all(path: Path, rejects: list | None = None) -> list:
    source = SourceConfig(name="s", path=str(path), schema="medical_o1")
    return list(iter_source(source, path.parent, [] if rejects is None else rejects))


def peak_while_reading(path: Path) -> tuple[int, int]:
    """(rows read, peak Python allocation in bytes) while consuming the rows one at a time."""
    source = SourceConfig(name="s", path=str(path), schema="medical_o1")
    rejects: list[Reject] = []
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_source(source, path.parent, rejects))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not rejects
    return count, peak


def write_rows(path: Path, n: int = ROWS) -> Path:
    rows = (dict(ROW, Question=f"Case {i}: {ROW['Question']}") for i in range(n))
    if path.suffix == ".jsonl":
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    elif path.suffix == ".json":
        with open(path, "w", encoding="utf-8") as f:
            f.write('{"version": 1, "data": [\n')
            f.write(",\n".join(json.dumps(r, indent=1) for r in rows))
            f.write("\n]}")
    elif path.suffix == ".csv":
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(ROW))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        # One row group for the whole file, as pq.write_table writes up to a million rows.
        pq.write_table(pa.Table.from_pylist(list(rows)), path)
    return path


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.json", "rows.csv", "rows.parquet"])
def test_readers_stream_instead_of_loading_the_file(tmp_path, name):
    path = write_rows(tmp_path / name)
    count, peak = peak_while_reading(path)
    assert count == ROWS
    assert peak < PEAK_BOUND, f"{name}: peak {peak / 2**20:.1f} MiB while reading {path.stat().st_size / 2**20:.1f} MiB"


def test_json_array_is_decoded_exactly_across_window_boundaries(tmp_path, monkeypatch):
    rows = [
        {
            "Question": "질문 " * (i % 7) + str(i),
            "n": [1, -2.5e10, 123456789012, True, None][i % 5],
            "s": 'é\n\t"\\' * (i % 3),
        }
        for i in range(60)
    ]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"meta": {"x": [1, 2]}, "rows": rows, "n": 5}, ensure_ascii=False, indent=2), "utf-8")
    scalars = tmp_path / "scalars.json"
    scalars.write_text('[{"a": 1}, 1234567890, {"a": 2}, -98765.4321e-3]', encoding="utf-8")
    for window in (1, 5, 64, 2**20):  # every value is cut somewhere by a 1-byte window
        monkeypatch.setattr(sources, "READ_CHUNK", window)
        assert [r.cells for r in read_all(path)] == rows
        assert [r.row_id for r in read_all(path)][:2] == ["rows.json:0", "rows.json:1"]
        rejects: list[Reject] = []  # a number cut by the window is read whole, then rejected as a row
        assert [r.cells for r in read_all(scalars, rejects)] == [{"a": 1}, {"a": 2}]
        assert [(r.row_id, r.reason) for r in rejects] == [
            ("scalars.json:1", "malformed_json"),
            ("scalars.json:3", "malformed_json"),
        ]


def test_json_bad_rows_are_rejects_and_bad_files_one_line(tmp_path, monkeypatch):
    path = tmp_path / "rows.json"
    path.write_bytes(b'[{"Question": "ok"},\n {"Question": "\xff\xfe bytes"},\n 3,\n {"Question": "fine"}]')
    rejects: list[Reject] = []
    assert [r.row_id for r in read_all(path, rejects)] == ["rows.json:0", "rows.json:3"]
    assert [(r.row_id, r.reason) for r in rejects] == [
        ("rows.json:1", "undecodable"),
        ("rows.json:2", "malformed_json"),
    ]

    monkeypatch.setattr(sources, "READ_CHUNK", 3)
    for text, message in [
        ('[{"a": 1},\n {"a": 2}\n {"a": 3}]', r"rows.json: not valid JSON \(line 3: expected ',' or ']'"),
        ('[{"a": 1},\n {"a": ]', r"rows.json: not valid JSON \(line 2: Expecting value\)"),
        ('{"a": [], "b": []}', r"expected a JSON list of rows \(or one key holding it\)"),
        ('{"a": 1}', r"expected a JSON list of rows \(or one key holding it\)"),
        ("42", r"expected a JSON list of rows, got a int"),
        ("", r"not valid JSON \(the file is empty\)"),
    ]:
        path.write_text(text, encoding="utf-8")
        with pytest.raises(UserError, match=message) as err:
            read_all(path)
        assert "\n" not in str(err.value)


def test_an_oversized_line_or_value_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_LINE_BYTES", 2000)
    monkeypatch.setattr(sources, "READ_CHUNK", 256)
    path = tmp_path / "rows.jsonl"
    path.write_text(
        json.dumps(ROW) + "\n" + json.dumps(dict(ROW, Complex_CoT="x" * 50_000)) + "\n" + json.dumps(ROW) + "\n",
        encoding="utf-8",
    )
    rejects: list[Reject] = []
    assert [r.row_id for r in read_all(path, rejects)] == ["rows.jsonl:1", "rows.jsonl:3"]
    assert [(r.row_id, r.reason) for r in rejects] == [("rows.jsonl:2", "line_too_long")]

    path = tmp_path / "rows.json"
    path.write_text(json.dumps([ROW, dict(ROW, Complex_CoT="x" * 50_000), ROW]), encoding="utf-8")
    with pytest.raises(UserError, match=r"rows.json: the JSON value starting at line 1 is over 2000 bytes"):
        read_all(path)


# ---------------------------------------------------------------------------------------------
# xlsx


@contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: the padding readers took minutes on these sheets."""

    def expire(*_):
        raise TimeoutError(f"still reading after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def make_xlsx(path: Path, rows: list[list], edit=None, extra: dict[str, bytes] | None = None) -> Path:
    """A workbook written by openpyxl, then its sheet XML edited (`edit`) the way other tools or an attacker
    could write it."""
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "S"
    for row in rows:
        ws.append(row)
    plain = path.with_name("plain-" + path.name)
    wb.save(plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "xl/worksheets/sheet1.xml" and edit is not None:
                data = edit(data.decode()).encode()
            dst.writestr(item, data)
        for name, data in (extra or {}).items():
            dst.writestr(name, data)
    plain.unlink()
    return path


PAIRS = [
    ["SID", "원문", "번역문"],
    ["1", "머리가 아파요.", "I have a headache."],
    ["2", "열이 나요.", "I have a fever."],
]


@pytest.mark.parametrize("stated", ["A1:ZZ1000000", "A1:B2"])
def test_xlsx_stated_dimension_is_ignored(tmp_path, stated):
    """A sheet's stated size pads nothing (ZZ: 702 columns a row) and cuts nothing (B2: a row and a column short)."""
    path = make_xlsx(
        tmp_path / "pairs.xlsx", PAIRS, lambda x: re.sub(r'<dimension ref="[^"]+"/>', f'<dimension ref="{stated}"/>', x)
    )
    with deadline(20):
        rows = read_all(path)
    assert [r.row_id for r in rows] == ["pairs.xlsx:S:2", "pairs.xlsx:S:3"]
    assert rows[0].cells == {"SID": "1", "원문": "머리가 아파요.", "번역문": "I have a headache."}


def test_xlsx_rows_reaching_the_last_column_stay_header_wide(tmp_path, monkeypatch):
    """Every row carries an empty styled cell at XFD (column 16,384), as a sheet formatted to the right edge
    does: the rows are still read 3 cells wide, not 16,384."""
    from openpyxl.worksheet._read_only import ReadOnlyWorksheet

    rows = [PAIRS[0]] + [[str(i), f"문장 {i}.", f"Sentence {i}."] for i in range(3000)]

    def edit(xml: str) -> str:
        xml = re.sub(r'<dimension ref="[^"]+"/>', "", xml)
        return re.sub(r'<row r="(\d+)">(.*?)</row>', r'<row r="\1">\2<c r="XFD\1" s="0"/></row>', xml)

    path = make_xlsx(tmp_path / "wide.xlsx", rows, edit)
    widths: list[int] = []  # the width of every row openpyxl builds
    real = ReadOnlyWorksheet._get_row

    def spy(self, *args, **kwargs):
        row = real(self, *args, **kwargs)
        widths.append(len(row))
        return row

    monkeypatch.setattr(ReadOnlyWorksheet, "_get_row", spy)
    with deadline(30):
        read = read_all(path)
    assert len(read) == 3000 and set(read[0].cells) == {"SID", "원문", "번역문"}
    assert sum(w > 3 for w in widths) <= 1, "only the header row may be built as wide as its last cell"


def test_xlsx_runs_of_empty_cells_stop_with_the_sheet_and_row(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "XLSX_MAX_EMPTY_CELLS", 3000)

    def skip_ahead(xml: str) -> str:  # the last row numbered 900000: openpyxl fills the gap with blank rows
        return (
            xml.replace('<row r="3">', '<row r="900000">')
            .replace('r="A3"', 'r="A900000"')
            .replace('r="B3"', 'r="B900000"')
            .replace('r="C3"', 'r="C900000"')
        )

    path = make_xlsx(tmp_path / "gap.xlsx", PAIRS, skip_ahead)
    with (
        deadline(20),
        pytest.raises(UserError, match=r"gap.xlsx sheet 'S': more than 3,000 empty cells in a row up to row 100"),
    ):
        read_all(path)
    # Blank rows under the budget are layout: skipped, and the rows after them still read.
    path = make_xlsx(tmp_path / "blank.xlsx", [PAIRS[0], PAIRS[1], *[[None] * 3] * 50, PAIRS[2]])
    assert [r.row_id for r in read_all(path)] == ["blank.xlsx:S:2", "blank.xlsx:S:53"]


def test_xlsx_too_wide_header_and_huge_string_table_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "XLSX_MAX_COLUMNS", 2)
    path = make_xlsx(tmp_path / "wide.xlsx", PAIRS)
    with pytest.raises(UserError, match=r"wide.xlsx sheet 'S': the header \(row 1\) is 3 columns wide"):
        read_all(path)
    monkeypatch.setattr(sources, "XLSX_MAX_COLUMNS", 1000)
    monkeypatch.setattr(sources, "XLSX_MAX_SHARED_STRINGS", 1000)
    path = make_xlsx(
        tmp_path / "strings.xlsx", PAIRS, extra={"xl/sharedStrings.xml": b"<sst>" + b" " * 5000 + b"</sst>"}
    )
    with pytest.raises(UserError, match=r"strings.xlsx: its shared-strings table is .* save each sheet as .csv"):
        read_all(path)


def test_parquet_damage_after_the_first_batch_names_the_file(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 10)
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([ROW] * 100), path, row_group_size=50, compression="none")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 2000] = b"\xff" * 2000  # inside the second row group's pages
    path.write_bytes(bytes(data))
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"rows.parquet: cannot read parquet"):
        read_all(path)
    assert time.perf_counter() - started < 10
