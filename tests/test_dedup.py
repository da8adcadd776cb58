"""Near-duplicates (MinHash and semantic), decontamination, and the Hub loader on a local dataset repo."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import make_recipe, write_jsonl

from data_prep.build import build
from data_prep.dedup import contaminated_rows, minhash_duplicates

SEOUL = (
    "다음 문장을 한 문장으로 요약하세요.",
    "서울은 대한민국의 수도이며 정치, 경제, 문화의 중심지이다.",
    "서울은 인구 약 천만 명의 대한민국 수도입니다.",
)
SEOUL_PARTICLE = (SEOUL[0], SEOUL[1].replace("서울은 대한민국의", "서울이 대한민국의"), SEOUL[2])  # 은 -> 이
BLOOD_PRESSURE = (
    "고혈압 환자에게 권장되는 식습관을 설명해 주세요.",
    "",
    "고혈압 환자는 소금 섭취를 줄이고, 채소와 과일을 충분히 먹으며, 음주를 제한하는 것이 좋습니다.",
)
WATER = (
    "물을 충분히 마셔야 하는 이유를 간단히 설명하세요.",
    "",
    "물은 체온을 조절하고 노폐물을 배출하며 혈액 순환을 돕기 때문에 충분히 마셔야 합니다.",
)


def ko_rows(*triples):
    return [{"instruction": i, "input": x, "output": o} for i, x, o in triples]


def ko_recipe(tmp_path, path, schema="kocommercial", name="ko", **data):
    return make_recipe(
        {
            "stage": "t",
            "output_dir": str(tmp_path / "o"),
            "data": {
                "sources": [{"name": name, "path": str(path), "schema": schema}],
                "processed_dir": str(tmp_path / "p"),
                "eval_fraction": 0.0,
                **data,
            },
        }
    )


@pytest.mark.parametrize("method", ["minhash", "semantic"])
def test_korean_near_duplicate_with_one_particle_changed(tmp_path, tokenizer, method):
    path = write_jsonl(tmp_path / "ko.jsonl", ko_rows(SEOUL, BLOOD_PRESSURE, SEOUL_PARTICLE, WATER))
    manifest = build(ko_recipe(tmp_path, path, dedup={"near": method}), tokenizer)
    assert manifest["near_duplicates_removed"] == 1 and manifest["train_rows"] == 3
    rejects = [json.loads(x) for x in (tmp_path / "p" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["row_id"], r["reason"]) for r in rejects] == [("ko.jsonl:3", "near_duplicate")]
    assert "ko:ko.jsonl:1" in rejects[0]["detail"]  # names the row it duplicates
    kept = pq.read_table(tmp_path / "p" / "train.parquet").column("id").to_pylist()
    assert sorted(kept) == ["ko:ko.jsonl:1", "ko:ko.jsonl:2", "ko:ko.jsonl:4"]  # unrelated sentences kept


def test_near_dedup_off_keeps_both(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "ko.jsonl", ko_rows(SEOUL, SEOUL_PARTICLE))
    manifest = build(ko_recipe(tmp_path, path, dedup={"near": "none"}), tokenizer)
    assert manifest["near_duplicates_removed"] == 0 and manifest["train_rows"] == 2


def test_minhash_scales_without_pairwise_work():
    import random

    rng = random.Random(0)
    texts = [f"문서 {i}번: " + " ".join(f"단어{rng.randrange(100_000)}" for _ in range(30)) for i in range(3000)]
    texts.append(texts[10] + " 끝")
    assert minhash_duplicates(texts, 0.8, 4, 128) == {3000: 10}


def test_minhash_work_per_row_stays_bounded_on_template_heavy_rows(monkeypatch):
    """Rows sharing one long template fill the template's band buckets: a full bucket takes no more rows (each
    new row is confirmed against at most bands x cap), and a real duplicate is still found."""
    import random

    from data_prep.dedup import MinHashDeduper

    monkeypatch.setattr(MinHashDeduper, "BUCKET_CAP", 8)
    rng = random.Random(1)
    template = "환자는 가슴 통증과 호흡 곤란을 호소하며 응급실에 내원하였다. " * 3
    texts = [template + " ".join(f"소견{rng.randrange(10**6)}" for _ in range(12)) for _ in range(300)]
    texts.append(texts[150])
    deduper = MinHashDeduper(0.8, 4, 128, seed=1, backend="datasketch")
    assert deduper.add(texts) == {300: 150}
    sizes = [len(v) if isinstance(v, list) else 1 for table in deduper._tables for v in table.values()]
    assert max(sizes) == 8 and deduper.saturated > 0


def test_decontamination_drops_rows_overlapping_an_eval_set(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "ko.jsonl", ko_rows(SEOUL, BLOOD_PRESSURE, WATER))
    eval_set = write_jsonl(tmp_path / "eval.jsonl", [{"question": "혈압 질문", "answer": BLOOD_PRESSURE[2]}])
    manifest = build(ko_recipe(tmp_path, path, decontaminate=[str(eval_set)]), tokenizer)
    assert manifest["contaminated_removed"] == 1 and manifest["train_rows"] == 2
    rejects = [json.loads(x) for x in (tmp_path / "p" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["row_id"], r["reason"]) for r in rejects] == [("ko.jsonl:2", "contaminated")]


def test_contamination_needs_a_full_ngram():
    assert contaminated_rows([[1, 2, 3, 4, 5]], [[9, 2, 3, 4, 8]], n=3) == [0]
    assert contaminated_rows([[1, 2, 3, 4, 5]], [[9, 2, 3, 8, 4]], n=3) == []


def test_hub_loader_reads_a_dataset_repository_with_configs(tmp_path, tokenizer):
    """The `datasets.load_dataset(path, config_name, split)` path, on a local copy of a Hub repo layout."""
    repo = tmp_path / "medical-o1-reasoning-SFT"
    for config, question in (("en", "A man has chest pain. Diagnosis?"), ("ko", "남성이 흉통을 호소합니다. 진단은?")):
        (repo / config).mkdir(parents=True)
        write_jsonl(
            repo / config / "train.jsonl", [{"Question": question, "Complex_CoT": "Reasoning.", "Response": "Answer."}]
        )
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: en/train.jsonl\n"
        "- config_name: ko\n  data_files:\n  - split: train\n    path: ko/train.jsonl\n---\n",
        encoding="utf-8",
    )
    recipe = make_recipe(
        {
            "stage": "t",
            "output_dir": str(tmp_path / "o"),
            "data": {
                "sources": [
                    {
                        "name": "med",
                        "path": str(repo),
                        "schema": "medical_o1",
                        "loader": "hub",
                        "config_name": "ko",
                        "split": "train",
                    }
                ],
                "processed_dir": str(tmp_path / "p"),
                "eval_fraction": 0.0,
            },
        }
    )
    manifest = build(recipe, tokenizer)
    assert manifest["raw_rows"] == {"med": 1}
    [row] = pq.read_table(tmp_path / "p" / "train.parquet").to_pylist()
    assert "남성이 흉통을" in row["prompt"] and row["id"] == "med:train:0"
    assert (tmp_path / "p" / "report.txt").read_text(encoding="utf-8").startswith("data build: t")


def aihub_workbook(path, pairs):
    from openpyxl import Workbook

    wb = Workbook()
    ws = wb.active
    ws.title = "Sheet1"
    ws.append(["SID", "원문", "번역문"])
    for i, (ko, en) in enumerate(pairs):
        ws.append([str(i), ko, en])
    wb.save(path)


def test_aihub_pair_in_two_files_is_one_pair_whatever_its_direction(tmp_path, tokenizer):
    """The same pair in two AI Hub files, at other rows and with other spacing and case: one copy is kept.
    Its direction came from the row id, so the copies were often rendered in opposite directions and both
    survived the text dedup."""
    pairs = [
        (f"문장 {i}번은 환자의 증상을 설명합니다.", f"Sentence {i} describes the patient's symptoms.")
        for i in range(16)
    ]
    folder = tmp_path / "aihub"
    folder.mkdir()
    aihub_workbook(folder / "a.xlsx", pairs)
    shifted = [("추가 문장입니다.", "An extra sentence.")] + [
        (f"  {ko}", en.upper() + " ") for ko, en in reversed(pairs)
    ]
    aihub_workbook(folder / "b.xlsx", shifted)
    recipe = ko_recipe(tmp_path, folder, schema="aihub_translation", name="aihub", dedup={"near": "none"})
    manifest = build(recipe, tokenizer)
    assert manifest["train_rows"] == 17 and manifest["duplicate_pairs_removed"] == 16
    rejects = [json.loads(x) for x in (tmp_path / "p" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert {r["reason"] for r in rejects} == {"duplicate_pair"} and len(rejects) == 16
    assert all(r["row_id"].startswith("b.xlsx:Sheet1:") and "as aihub:a.xlsx:Sheet1:" in r["detail"] for r in rejects)
    rows = pq.read_table(tmp_path / "p" / "train.parquet").to_pylist()
    assert 0 < sum("영어로 번역" in r["prompt"] for r in rows) < 17  # both directions still drawn (ratio 0.5)


def test_aihub_direction_follows_the_pair_not_the_row():
    from data_prep.schemas import to_record
    from data_prep.sources import RawRow
    from train.core.config import SourceConfig

    source = SourceConfig(name="aihub", path="x", schema="aihub_translation")
    directions = set()
    for i in range(40):
        ko, en = f"문장 {i}입니다.", f"This is sentence {i}."
        first = to_record(RawRow(f"a.xlsx:S:{i}", {"원문": ko, "번역문": en}), source, seed=3407)
        again = to_record(RawRow(f"b.xlsx:T:{1000 - i}", {"원문": f" {ko}", "번역문": en.lower()}), source, seed=3407)
        assert first.question.split("\n")[0] == again.question.split("\n")[0]
        assert first.pair_key == again.pair_key
        directions.add(first.question.split("\n")[0])
    assert len(directions) == 2


def test_streaming_minhash_matches_datasketch_lsh():
    """The lean banding index finds exactly what datasketch's MinHashLSH found (same bands, same confirmation),
    fed a chunk at a time, on datasketch's signatures."""
    import random

    from datasketch import MinHash, MinHashLSH

    from data_prep.dedup import char_shingles

    rng = random.Random(1)
    words = [f"단어{i}" for i in range(300)]
    texts = [" ".join(rng.choice(words) for _ in range(25)) for _ in range(400)]
    for _ in range(60):  # near duplicates: a few words changed
        t = texts[rng.randrange(len(texts))].split()
        for _ in range(rng.randint(1, 6)):
            t[rng.randrange(len(t))] = rng.choice(words)
        texts.append(" ".join(t))

    def reference(threshold):  # the whole-list implementation with datasketch's index
        lsh = MinHashLSH(threshold=max(0.3, threshold - 0.25), num_perm=64)
        sigs = MinHash.bulk([char_shingles(t, 4) for t in texts], num_perm=64, seed=5)
        dropped = {}
        for index, sig in enumerate(sigs):
            confirmed = [int(k) for k in lsh.query(sig) if sig.jaccard(sigs[int(k)]) >= threshold]
            if confirmed:
                dropped[index] = min(confirmed)
                continue
            lsh.insert(str(index), sig)
        return dropped

    for threshold in (0.5, 0.8):
        expected = reference(threshold)
        assert len(expected) > 20
        assert minhash_duplicates(texts, threshold, 4, 64, seed=5, chunk=33, backend="datasketch") == expected
