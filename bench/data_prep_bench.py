"""Data prep throughput on a 100k-row synthetic set shaped like KoCommercial.

    python -m bench.data_prep_bench [--rows 100000]       (make bench runs it)

Each configuration runs in its own process so its peak RSS is its own. Rows are random Korean
word sequences with KoCommercial's field lengths, 1% exact and 1% near duplicates (one particle
changed). Tokenizer: the embedded tiny one (a small-vocabulary BPE: more tokens per row than
Qwen's 152k vocabulary would give).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WORDS = (
    "환자 병원 진료 검사 결과 약 처방 증상 통증 발열 기침 두통 혈압 혈당 수면 운동 식사 물 건강 관리 "
    "서울 대한민국 문화 경제 역사 과학 기술 사회 교육 가족 친구 회사 학교 여행 음식 날씨 시간 문제 "
    "설명 요약 번역 분류 작성 정리 비교 분석 추천 질문 답변 문장 단어 의미 내용 방법 이유 결과 "
    "하다 되다 있다 없다 좋다 많다 크다 작다 빠르다 느리다 중요하다 필요하다 가능하다"
).split()


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def sentence(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."

    rows = []
    for i in range(n):
        if i and i % 100 == 0:  # exact duplicate
            rows.append(dict(rows[rng.randrange(len(rows))]))
            continue
        if i and i % 100 == 50:  # near duplicate: one particle changed
            src = dict(rows[rng.randrange(len(rows))])
            src["output"] = src["output"] + " 그리고 이것은 중요합니다."
            rows.append(src)
            continue
        rows.append(
            {
                "instruction": sentence(5, 20),
                "input": sentence(0, 40) if rng.random() < 0.4 else "",
                "output": " ".join(sentence(5, 25) for _ in range(rng.randint(1, 8))),
            }
        )
    return rows


def run_one(rows_path: str, near: str, out_dir: str) -> dict:
    import resource
    import time

    from bench.common import peak_rss_mb
    from data_prep.build import build
    from train.core.config import recipe_from_dict
    from train.models.loading import load_tokenizer

    recipe = recipe_from_dict(
        {
            "stage": "bench",
            "output_dir": out_dir,
            "data": {
                "sources": [{"name": "ko", "path": rows_path, "schema": "kocommercial"}],
                "template": "reasoning",
                "max_length": 4096,
                "eval_fraction": 0.01,
                "dedup": {"near": near.split(":")[0], "minhash_backend": (near.split(":") + ["rensa"])[1]},
                "processed_dir": out_dir,
            },
        }
    )
    tokenizer = load_tokenizer(recipe.model)
    started = time.perf_counter()
    manifest = build(recipe, tokenizer)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU time of every thread: robust to a busy machine
    rows = sum(manifest["raw_rows"].values())
    tokens = manifest["train_tokens"]
    return {
        "near_dedup": near,
        "rows": rows,
        "seconds": round(seconds, 1),
        "rows_per_s": round(rows / seconds),
        "tokens_per_s": round(tokens / seconds),
        "dedup_seconds": manifest["dedup_seconds"],
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "exact_dups": manifest["duplicates_removed"],
        "near_dups": manifest["near_duplicates_removed"],
        "peak_rss_mb": round(peak_rss_mb()),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument(
        "--near",
        default="none,minhash",
        help="comma list of near-dedup settings: none, minhash (rensa), minhash:datasketch, semantic",
    )
    parser.add_argument("--section", default="data_prep", help="results section name")
    parser.add_argument("--one", nargs=3, metavar=("ROWS_PATH", "NEAR", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        sys.stdout.write(json.dumps(run_one(*args.one)) + "\n")
        return
    from bench.common import write_results

    with tempfile.TemporaryDirectory() as tmp:
        rows_path = Path(tmp) / "kocommercial_synthetic.jsonl"
        with open(rows_path, "w", encoding="utf-8") as f:
            for row in synthetic_rows(args.rows):
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        results = []
        for near in args.near.split(","):
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "bench.data_prep_bench",
                    "--one",
                    str(rows_path),
                    near,
                    str(Path(tmp) / f"out-{near}"),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=True,
            )
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    path = write_results(
        args.section,
        results,
        (
            f"Whole `data_prep` build (read, validate, template, tokenize, length policy, dedup, split, write) of "
            f"{args.rows} synthetic KoCommercial-shaped rows (1% exact, 1% near duplicates), one process, "
            "tokenizer = embedded tiny BPE (batched fast-tokenizer call, parallel in Rust)."
        ),
    )
    for r in results:
        sys.stdout.write(json.dumps(r) + "\n")
    sys.stdout.write(f"written to {path}\n")


if __name__ == "__main__":
    main()
