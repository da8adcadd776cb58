"""Data build: each defect kind is counted by reason and written aside; nothing is lost silently."""

from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
from conftest import make_recipe, write_jsonl

from data_prep.build import build, fingerprint, load_processed
from train.core.errors import UserError

GOOD = {
    "Question": "A 45-year-old man has chest pain. Diagnosis?",
    "Complex_CoT": "Chest pain suggests ischemia.",
    "Response": "Myocardial infarction.",
}


def medical_data(tmp_path, source_path, **data_overrides) -> dict:
    return {
        "stage": "t",
        "output_dir": str(tmp_path / "out"),
        "data": {
            "sources": [{"name": "med", "path": str(source_path), "schema": "medical_o1"}],
            "processed_dir": str(tmp_path / "processed"),
            "eval_fraction": 0.0,
            "max_reject_fraction": 1.0,
            "max_length": 512,
            "dedup": {"near": "none"},
            **data_overrides,
        },
    }


def medical_recipe(tmp_path, source_path, **data_overrides):
    return make_recipe(medical_data(tmp_path, source_path, **data_overrides))


def defect_fixture(tmp_path):
    rows = [dict(GOOD, Question=f"Case {i}: chest pain. Diagnosis?") for i in range(6)]
    rows += [
        "{not json",  # malformed_json
        {"Question": "Q", "Complex_CoT": "C"},  # missing_field (Response)
        dict(GOOD, Response="   "),  # empty_field
        dict(GOOD, Response=None),  # empty_field
        dict(GOOD, Complex_CoT=["a", "list"]),  # non_text
        dict(GOOD, Complex_CoT="<think> never closed"),  # unclosed_think
        dict(GOOD, Question="Case 0: chest pain. Diagnosis?"),  # duplicate of row 0
    ]
    path = write_jsonl(tmp_path / "med.jsonl", rows)
    with open(path, "ab") as f:
        f.write(b'{"Question": "\xff\xfe bad bytes", "Complex_CoT": "x", "Response": "y"}\n')  # undecodable
    return path


def read_rejects(recipe_dir):
    return [json.loads(line) for line in (recipe_dir / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


def test_every_defect_kind_is_counted_and_written_aside(tmp_path, tokenizer):
    recipe = medical_recipe(tmp_path, defect_fixture(tmp_path))
    manifest = build(recipe, tokenizer)
    assert manifest["raw_rows"] == {"med": 14}
    assert manifest["rejected"] == {
        "undecodable": 1,
        "malformed_json": 1,
        "missing_field": 1,
        "empty_field": 2,
        "non_text": 1,
        "unclosed_think": 1,
    }
    assert manifest["duplicates_removed"] == 1
    assert manifest["train_rows"] == 6 and manifest["eval_rows"] == 0
    rejects = read_rejects(tmp_path / "processed")
    assert len(rejects) == 8  # 7 invalid + 1 duplicate: every row accounted for (6 + 8 = 14)
    by_reason = {r["reason"]: r for r in rejects}
    assert by_reason["malformed_json"]["row_id"] == "med.jsonl:7"
    assert "line 7" in by_reason["malformed_json"]["detail"]
    assert by_reason["missing_field"]["detail"] == "column 'Response' is missing"
    assert by_reason["undecodable"]["row_id"] == "med.jsonl:14"
    assert all(r["source"] == "med" for r in rejects)


def test_reject_threshold_fails_the_build_naming_the_reason(tmp_path, tokenizer):
    recipe = medical_recipe(tmp_path, defect_fixture(tmp_path), max_reject_fraction=0.2)
    with pytest.raises(UserError, match=r"50.0% of raw rows were rejected.*empty_field.*rejects.jsonl"):
        build(recipe, tokenizer)
    # Written even when the build fails, beside the processed folder: a failed build never replaces a good one.
    assert (tmp_path / "processed.tmp" / "rejects.jsonl").is_file()
    assert not (tmp_path / "processed").exists()


def test_missing_column_everywhere_names_the_column(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "ko.jsonl", [{"instruction": "질문", "input": ""}] * 3)
    data = {
        "stage": "t",
        "output_dir": str(tmp_path / "o"),
        "data": {
            "sources": [{"name": "ko", "path": str(path), "schema": "kocommercial"}],
            "processed_dir": str(tmp_path / "p"),
        },
    }
    with pytest.raises(UserError, match=r"column 'output' is missing"):
        build(make_recipe(data), tokenizer)


def test_missing_file_and_empty_dataset(tmp_path, tokenizer):
    with pytest.raises(UserError, match=r"data file not found: .*nope.jsonl"):
        build(medical_recipe(tmp_path, tmp_path / "nope.jsonl"), tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(UserError, match="the sources hold no rows"):
        build(medical_recipe(tmp_path, empty), tokenizer)


def test_aihub_xlsx_two_sheets_extra_columns_blank_cells(tmp_path, tokenizer):
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "대화1"
    ws.append(["SID", "도메인", "원문", "번역문", "비고"])
    ws.append(["1", "의료", "머리가 아파요.", "I have a headache.", None])
    ws.append(["2", "의료", "열이 나요.", None, "blank translation"])
    ws.append([None, None, None, None, None])  # blank layout row: not data
    ws2 = wb.create_sheet("대화2")
    ws2.append(["SID", "원문", "번역문"])
    ws2.append(["3", "약을 드세요.", "Take the medicine."])
    folder = tmp_path / "aihub"
    folder.mkdir()
    wb.save(folder / "pairs.xlsx")
    data = {
        "stage": "t",
        "output_dir": str(tmp_path / "o"),
        "data": {
            "sources": [{"name": "aihub", "path": str(folder), "schema": "aihub_translation", "ko_to_en_ratio": 1.0}],
            "processed_dir": str(tmp_path / "p"),
            "eval_fraction": 0.0,
            "max_reject_fraction": 0.5,
        },
    }
    manifest = build(make_recipe(data), tokenizer)
    assert manifest["raw_rows"] == {"aihub": 3} and manifest["rejected"] == {"empty_field": 1}
    rows = pq.read_table(tmp_path / "p" / "train.parquet").to_pylist()
    assert sorted(r["id"] for r in rows) == ["aihub:pairs.xlsx:대화1:2", "aihub:pairs.xlsx:대화2:2"]
    assert all("영어로 번역" in r["prompt"] for r in rows)  # ratio 1.0: all Korean -> English
    assert any(r["completion"].endswith("I have a headache.") for r in rows)


def test_translation_direction_ratio(tmp_path, tokenizer):
    pairs = [{"원문": f"문장 {i}입니다.", "번역문": f"This is sentence {i}."} for i in range(200)]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    data = {
        "stage": "t",
        "output_dir": str(tmp_path / "o"),
        "data": {
            "sources": [{"name": "p", "path": str(path), "schema": "aihub_translation", "ko_to_en_ratio": 0.25}],
            "processed_dir": str(tmp_path / "p"),
            "eval_fraction": 0.0,
            "dedup": {"near": "none"},
        },
    }
    build(make_recipe(data), tokenizer)
    rows = pq.read_table(tmp_path / "p" / "train.parquet").to_pylist()
    ko_to_en = sum("영어로 번역" in r["prompt"] for r in rows)
    assert 30 <= ko_to_en <= 70  # 25% of 200, seeded


def test_length_policy_drop_truncate_error(tmp_path, tokenizer):
    long = dict(GOOD, Complex_CoT="reasoning " * 300)
    path = write_jsonl(tmp_path / "m.jsonl", [GOOD, long])
    manifest = build(medical_recipe(tmp_path, path, max_length=128, length_policy="drop"), tokenizer)
    assert manifest["length_policy"]["too_long"] == 1 and manifest["train_rows"] == 1
    assert [r["reason"] for r in read_rejects(tmp_path / "processed")] == ["too_long"]

    manifest = build(medical_recipe(tmp_path, path, max_length=128, length_policy="truncate"), tokenizer)
    assert manifest["length_policy"]["truncated"] == 1 and manifest["train_rows"] == 2
    rows = pq.read_table(tmp_path / "processed" / "train.parquet").to_pylist()
    for row in rows:
        assert len(row["input_ids"]) <= 128
        assert row["input_ids"][-1] == tokenizer.eos_token_id  # the EOS survives truncation
        assert row["completion_mask"][-1] == 1

    with pytest.raises(UserError, match=r"row m.jsonl:2: \d+ tokens > data.max_length=128"):
        build(medical_recipe(tmp_path, path, max_length=128, length_policy="error"), tokenizer)


def test_weights_mix_and_split_are_seeded(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [dict(GOOD, Question=f"A{i}?") for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [dict(GOOD, Question=f"B{i}?") for i in range(20)])
    data = {
        "stage": "t",
        "output_dir": str(tmp_path / "o"),
        "data": {
            "sources": [
                {"name": "a", "path": str(a), "schema": "medical_o1", "weight": 0.5},
                {"name": "b", "path": str(b), "schema": "medical_o1", "weight": 2.0},
            ],
            "processed_dir": str(tmp_path / "p"),
            "eval_fraction": 0.1,
            "dedup": {"near": "none"},
        },
    }
    manifest = build(make_recipe(data), tokenizer)
    assert manifest["mixed_rows"] == {"a": 10, "b": 40}
    assert manifest["train_rows"] == 45 and manifest["eval_rows"] == 5
    first = pq.read_table(tmp_path / "p" / "train.parquet").column("id").to_pylist()
    build(make_recipe(data), tokenizer)
    assert pq.read_table(tmp_path / "p" / "train.parquet").column("id").to_pylist() == first


def test_fingerprint_tracks_source_template_and_tokenizer(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [GOOD])
    base = fingerprint(medical_recipe(tmp_path, path), tokenizer)
    assert fingerprint(medical_recipe(tmp_path, path), tokenizer) == base  # nothing changed
    assert fingerprint(medical_recipe(tmp_path, path, template="chat"), tokenizer) != base
    assert fingerprint(medical_recipe(tmp_path, path, system_prompt="Other."), tokenizer) != base
    other_tok = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    other_tok.add_tokens(["<new_token>"])
    assert fingerprint(medical_recipe(tmp_path, path), other_tok) != base
    write_jsonl(path, [dict(GOOD, Response="Angina.")])
    assert fingerprint(medical_recipe(tmp_path, path), tokenizer) != base


def test_training_refuses_stale_data_when_distributed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [GOOD, dict(GOOD, Question="Other?")])
    recipe = medical_recipe(tmp_path, path)
    with pytest.raises(UserError, match=r"is missing; run `python -m data_prep"):
        load_processed(recipe, tokenizer, allow_build=False)
    train, _, manifest = load_processed(recipe, tokenizer, allow_build=True)
    assert len(train) == 2 and set(train.column_names) == {"input_ids", "completion_mask"}
    write_jsonl(path, [GOOD])
    with pytest.raises(UserError, match=r"is stale \(fingerprint"):
        load_processed(recipe, tokenizer, allow_build=False)


@pytest.mark.parametrize("name", ["broken.xlsx", "broken.parquet", "broken.json"])
def test_unreadable_file_fails_with_its_path(tmp_path, tokenizer, name):
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04 this is not a real file {")
    with pytest.raises(UserError, match=rf"{name}: (cannot read|not valid JSON)"):
        build(medical_recipe(tmp_path, path), tokenizer)


def test_csv_keeps_quoted_newlines_and_rejects_an_oversized_field(tmp_path, tokenizer):
    import csv

    path = tmp_path / "rows.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Question", "Complex_CoT", "Response"])
        writer.writerow(["Chest pain\nfor two days. Diagnosis?", "Step one.\nStep two.", "Angina."])
        writer.writerow(["Huge?", "x" * 200_000, "y"])  # over the csv module's field limit
        writer.writerow(["Cough. Diagnosis?", "Think.", "Bronchitis."])
    manifest = build(medical_recipe(tmp_path, path), tokenizer)
    assert manifest["raw_rows"] == {"med": 3} and manifest["rejected"] == {"unreadable_csv": 1}
    prompts = pq.read_table(tmp_path / "processed" / "train.parquet").to_pydict()
    first = next(p + c for p, c in zip(prompts["prompt"], prompts["completion"], strict=True) if "Chest" in p)
    assert "Chest pain\nfor two days" in first and "Step one.\nStep two." in first  # newlines kept, not joined


def test_a_json_scalar_is_one_clear_line(tmp_path, tokenizer):
    path = tmp_path / "rows.json"
    path.write_text('"just a string"', encoding="utf-8")
    with pytest.raises(UserError, match=r"rows.json: expected a JSON list of rows, got a str"):
        build(medical_recipe(tmp_path, path), tokenizer)


# ---------------------------------------------------------------------------------------------
# Input hashing, decontamination paths, the atomic processed folder, memory


def test_each_input_file_is_hashed_once_and_streamed(tmp_path, tokenizer, monkeypatch):
    import os
    import pathlib

    from data_prep import build as build_module

    path = write_jsonl(tmp_path / "m.jsonl", [GOOD, dict(GOOD, Question="Other?")])
    old = path.stat().st_mtime - 60  # a file not written just now (a hash taken at once is retaken: racy mtime)
    os.utime(path, (old, old))
    hashed: list[str] = []
    real = build_module.sha256_file

    def counting(p):
        hashed.append(pathlib.Path(p).name)
        return real(p)

    def no_whole_file(self):
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(build_module, "sha256_file", counting)
    monkeypatch.setattr(pathlib.Path, "read_bytes", no_whole_file)
    monkeypatch.setattr(build_module.FileHashes, "_memo", {})
    recipe = medical_recipe(tmp_path, path)
    first = fingerprint(recipe, tokenizer)
    assert fingerprint(recipe, tokenizer) == first and hashed == ["m.jsonl"]  # this process: once
    monkeypatch.setattr(build_module.FileHashes, "_memo", {})  # another rank, or a later run
    assert fingerprint(recipe, tokenizer) == first and hashed == ["m.jsonl"]
    assert (tmp_path / build_module.HASH_CACHE).is_file()  # beside the processed folder
    write_jsonl(path, [GOOD, dict(GOOD, Question="Again?")])  # same size, new mtime
    assert fingerprint(recipe, tokenizer) != first and hashed == ["m.jsonl", "m.jsonl"]


@pytest.mark.parametrize("missing", ["evals/nope.jsonl", "nope"])
def test_missing_decontamination_set_is_one_line_before_any_work(tmp_path, tokenizer, monkeypatch, missing):
    from data_prep import build as build_module

    def no_reading(*args, **kwargs):
        raise AssertionError("sources read before the decontamination path was checked")

    monkeypatch.setattr(build_module, "iter_source", no_reading)
    monkeypatch.setattr(build_module, "sha256_file", no_reading)
    path = write_jsonl(tmp_path / "m.jsonl", [GOOD])
    recipe = medical_recipe(tmp_path, path, decontaminate=[missing])
    for call in (lambda: build(recipe, tokenizer), lambda: load_processed(recipe, tokenizer, allow_build=False)):
        with pytest.raises(UserError, match=rf"test-recipe: data.decontaminate\[0\] '{missing}' not found") as err:
            call()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "processed.tmp").exists()


def test_build_is_written_aside_and_swapped_in_manifest_last(tmp_path, tokenizer, monkeypatch):
    from data_prep import build as build_module
    from data_prep.build import processed_state

    path = write_jsonl(tmp_path / "m.jsonl", [dict(GOOD, Question=f"Q{i}?") for i in range(5)])
    recipe = medical_recipe(tmp_path, path)
    manifest = build(recipe, tokenizer)
    out = tmp_path / "processed"
    assert not (tmp_path / "processed.tmp").exists()
    assert set(manifest["files"]) == {
        "train.parquet",
        "eval.parquet",
        "rejects.jsonl",
        "length_histogram.png",
        "report.txt",
    }
    assert all((out / name).stat().st_size == info["bytes"] for name, info in manifest["files"].items())
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # killed while writing: the parquet files are already there

    monkeypatch.setattr(build_module, "_write_histogram", interrupted)
    write_jsonl(path, [dict(GOOD, Question=f"R{i}?") for i in range(7)])
    with pytest.raises(KeyboardInterrupt):
        build(recipe, tokenizer)
    assert (tmp_path / "processed.tmp" / "train.parquet").is_file()  # the half-written set stayed aside
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the previous set is untouched
    assert processed_state(recipe, tokenizer).startswith("stale")  # ... and known to be stale, not mixed
    monkeypatch.undo()
    assert build(recipe, tokenizer)["train_rows"] == 7 and not (tmp_path / "processed.tmp").exists()


def test_half_written_set_is_refused_with_the_rebuild_command(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [GOOD, dict(GOOD, Question="Other?"), dict(GOOD, Question="Third?")])
    recipe = make_recipe(medical_data(tmp_path, path, eval_fraction=0.4), overrides=["data.max_length=256"])
    out = tmp_path / "processed"
    command = re.escape("run `python -m data_prep test-recipe data.max_length=256` before launching")

    def refused(reason: str):
        with pytest.raises(UserError, match=rf"is incomplete \({reason}.*\); {command}") as err:
            load_processed(recipe, tokenizer, allow_build=False)
        assert "\n" not in str(err.value)

    build(recipe, tokenizer)
    load_processed(recipe, tokenizer, allow_build=False)  # complete: loads
    train = (out / "train.parquet").read_bytes()
    (out / "train.parquet").write_bytes(train[: len(train) // 2])  # a copy cut short
    refused(r"train.parquet is \d+ bytes, manifest.json says \d+")
    (out / "train.parquet").write_bytes(train[:-1] + bytes([train[-1] ^ 1]))  # same size, other bytes
    refused("train.parquet does not match its sha256 in manifest.json")
    (out / "train.parquet").write_bytes(train)
    (out / "eval.parquet").unlink()
    refused("eval.parquet is missing")
    (out / "manifest.json").unlink()
    refused("length_histogram.png, rejects.jsonl, report.txt, train.parquet without manifest.json")
    train_rows, _, _ = load_processed(recipe, tokenizer, allow_build=True)  # one process: rebuilds it
    assert len(train_rows) == 2


def test_a_processed_dir_holding_other_files_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "m.jsonl", [GOOD])
    (tmp_path / "processed").mkdir()
    (tmp_path / "processed" / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(
        UserError, match=r"data.processed_dir .*processed holds files data_prep did not write \(notes.txt\)"
    ):
        build(medical_recipe(tmp_path, path), tokenizer)
    assert (tmp_path / "processed" / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_the_build_keeps_rows_on_disk_not_in_memory(tmp_path, tokenizer, monkeypatch):
    """Python memory of a 3000-row build stays near one chunk's worth: the kept rows' text and token ids
    are spilled; the whole-list build held every row's ids as Python ints (~36 bytes a token)."""
    import tracemalloc

    from data_prep import build as build_module

    monkeypatch.setattr(build_module, "CHUNK_ROWS", 200)
    monkeypatch.setattr(build_module, "SHUFFLE_BUCKET_BYTES", 2**20)
    # matplotlib's own memory is not the build's
    monkeypatch.setattr(build_module, "_write_histogram", lambda lengths, max_len, path, title: path.write_bytes(b""))
    rows = [
        dict(GOOD, Question=f"Case {i}: chest pain. Diagnosis?", Complex_CoT="Reasoning step. " * 20)
        for i in range(3000)
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows[:20])
    recipe = medical_recipe(tmp_path, path, eval_fraction=0.1)
    build(recipe, tokenizer)  # warm-up: the modules a first build imports are not the build's memory
    write_jsonl(path, rows)
    tracemalloc.start()
    try:
        manifest = build(recipe, tokenizer)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    tokens = manifest["train_tokens"] / 0.9
    assert manifest["train_rows"] == 2700 and manifest["eval_rows"] == 300
    assert peak < tokens * 12, f"peak {peak / 2**20:.1f} MiB for {tokens:.0f} tokens"
    rows_out = pq.read_table(tmp_path / "processed" / "train.parquet").to_pylist()
    assert all(r["num_tokens"] == len(r["input_ids"]) == len(r["completion_mask"]) for r in rows_out)
