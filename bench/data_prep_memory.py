"""Peak memory of `python -m data_prep` on a large generated JSONL in the medical-o1 schema.

    python -m bench.data_prep_memory [--mb 1024] [--near none,minhash] [--near-mb MB] [--max-rss-mb 1536]

Writes about `--mb` MB of rows shaped like FreedomIntelligence/medical-o1-reasoning-SFT (Question, a long
Complex_CoT, Response; English clinical sentences, 1% exact and 1% near duplicates) into a temporary folder,
then runs `python -m data_prep RECIPE` once per near-dedup setting, each in its own process. Measured per run:
the child's peak RSS (`os.wait4`'s ru_maxrss, the data_prep process alone), wall seconds, and rows, tokens
and duplicates from its manifest. The same command on a 1 MB file gives the fixed cost (Python, torch,
transformers, the tokenizer) that every build pays. Exact dedup is on in every run; the target is a peak
under `--max-rss-mb` with near-dedup off (exit code 1 when above). Tokenizer: the embedded tiny BPE (a small
vocabulary: more tokens per row than Qwen's would give).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SYMPTOMS = (
    "chest pain, shortness of breath, fever, productive cough, night sweats, weight loss, fatigue, headache, "
    "blurred vision, nausea, vomiting, abdominal pain, diarrhea, joint pain, morning stiffness, rash, "
    "palpitations, syncope, dizziness, numbness in the left arm, polyuria, polydipsia, jaundice, dark urine, "
    "swelling of the ankles, hemoptysis, dysphagia, hoarseness, confusion, neck stiffness, photophobia"
).split(", ")
FINDINGS = (
    "a blood pressure of 150/95 mmHg, a heart rate of 112 beats per minute, a temperature of 38.9 C, "
    "crackles at the right lung base, a systolic murmur at the apex, hepatomegaly, splenomegaly, "
    "bilateral pitting edema, an elevated troponin, ST elevation in leads II, III and aVF, a white cell count "
    "of 15,000, a hemoglobin of 9.1 g/dL, an elevated creatinine, hyponatremia, a positive Kernig sign, "
    "a HbA1c of 9.4%, an elevated alkaline phosphatase, a low ferritin, an elevated ESR"
).split(", ")
DIAGNOSES = (
    "acute myocardial infarction, community-acquired pneumonia, pulmonary embolism, bacterial meningitis, "
    "type 2 diabetes mellitus, iron deficiency anemia, rheumatoid arthritis, congestive heart failure, "
    "acute pancreatitis, tuberculosis, hypothyroidism, acute kidney injury, cholangitis, systemic lupus "
    "erythematosus, aortic dissection, sarcoidosis, infective endocarditis, migraine with aura"
).split(", ")
REASONING = [
    "The combination of {s} and {s} points first toward {d}, but {d} must also be considered.",
    "On examination the patient has {f}, which makes {d} more likely than {d}.",
    "Laboratory studies show {f} and {f}; together these narrow the differential considerably.",
    "Given the history of {s}, the next step is to confirm the diagnosis before starting treatment.",
    "It is important not to miss {d}, because delayed treatment carries a high mortality.",
    "The absence of {s} argues against {d}, although it does not exclude it entirely.",
    "Putting the clinical picture together, {f} in a patient with {s} is most consistent with {d}.",
    "Treatment should address the underlying cause while the patient is monitored for complications.",
]


def _fill(template: str, rng: random.Random) -> str:
    out = template
    for key, pool in (("{s}", SYMPTOMS), ("{f}", FINDINGS), ("{d}", DIAGNOSES)):
        while key in out:
            out = out.replace(key, rng.choice(pool), 1)
    return out


def medical_row(rng: random.Random, i: int) -> dict:
    age, sex = rng.randint(18, 90), rng.choice(("man", "woman"))
    question = (
        f"Case {i}: A {age}-year-old {sex} presents with {rng.choice(SYMPTOMS)} and {rng.choice(SYMPTOMS)} for "
        f"{rng.randint(1, 30)} days. Examination reveals {rng.choice(FINDINGS)} and {rng.choice(FINDINGS)}. "
        "What is the most likely diagnosis, and what is the next best step in management?"
    )
    cot = " ".join(_fill(rng.choice(REASONING), rng) for _ in range(rng.randint(10, 30)))
    answer = f"The most likely diagnosis is {rng.choice(DIAGNOSES)}. " + " ".join(
        _fill(rng.choice(REASONING), rng) for _ in range(rng.randint(2, 6))
    )
    return {"Question": question, "Complex_CoT": cot, "Response": answer}


def write_medical_jsonl(path: Path, target_bytes: int, seed: int = 0) -> int:
    """Rows until the file reaches `target_bytes`; every 100th row repeats an earlier one exactly, every
    100th + 50 with one sentence added (a near duplicate). Returns the row count."""
    rng = random.Random(seed)
    recent: list[dict] = []
    written, rows = 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target_bytes:
            if rows % 100 == 0 and recent:
                row = dict(rng.choice(recent))
            elif rows % 100 == 50 and recent:
                row = dict(rng.choice(recent))
                row["Response"] += " Follow-up in two weeks is recommended."
            else:
                row = medical_row(rng, rows)
                recent = (recent + [row])[-500:]
            line = json.dumps(row, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            rows += 1
    return rows


def run_build(rows_path: Path, near: str, work: Path, backend: str | None = None) -> dict:
    """`python -m data_prep` on `rows_path` in its own process: its peak RSS, seconds and manifest figures."""
    processed = work / f"processed-{near}"
    recipe = work / f"recipe-{near}.json"  # YAML is a superset of JSON
    recipe.write_text(
        json.dumps(
            {
                "stage": "bench_memory",
                "output_dir": str(work / "out"),
                "model": {"name_or_path": "tiny"},
                "data": {
                    "sources": [{"name": "medical_o1", "path": str(rows_path), "schema": "medical_o1"}],
                    "template": "reasoning",
                    "max_length": 8192,
                    "eval_fraction": 0.01,
                    "dedup": {"exact": True, "near": near, **({"minhash_backend": backend} if backend else {})},
                    "processed_dir": str(processed),
                },
            }
        ),
        encoding="utf-8",
    )
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    with open(work / f"log-{near}.txt", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "data_prep", str(recipe)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(
            f"data_prep failed ({status}); see {work / f'log-{near}.txt'}:\n"
            + (work / f"log-{near}.txt").read_text()[-2000:]
        )
    manifest = json.loads((processed / "manifest.json").read_text(encoding="utf-8"))
    return {
        "input_mb": round(rows_path.stat().st_size / 2**20),
        "near_dedup": near if near != "minhash" or not backend else f"minhash ({backend})",
        "raw_rows": sum(manifest["raw_rows"].values()),
        "kept_rows": manifest["train_rows"] + manifest["eval_rows"],
        "train_tokens": manifest["train_tokens"],
        "exact_dups": manifest["duplicates_removed"],
        "near_dups": manifest["near_duplicates_removed"],
        "seconds": round(seconds, 1),
        "dedup_seconds": manifest["dedup_seconds"],
        "peak_rss_mb": round(usage.ru_maxrss / 1024),  # Linux: KiB
        "processed_mb": round(sum(f["bytes"] for f in manifest["files"].values()) / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=1024, help="size of the generated JSONL in MiB (default 1024)")
    parser.add_argument("--near", default="none,minhash", help="near-dedup settings to run, comma-separated")
    parser.add_argument("--near-mb", type=float, default=None, help="size for the near-dedup runs (default --mb)")
    parser.add_argument("--max-rss-mb", type=float, default=1536, help="peak RSS target with near-dedup off")
    parser.add_argument("--no-baseline", action="store_true", help="skip the 1 MB run (the fixed cost)")
    parser.add_argument("--minhash-backend", default=None, help="data.dedup.minhash_backend (default: the recipe's)")
    parser.add_argument("--append", action="store_true", help="add to today's rows of this section")
    parser.add_argument("--results-dir", default=None, help="where the results JSON goes (default bench/results)")
    args = parser.parse_args()
    from bench.common import write_results

    plan: dict[float, list[str]] = {} if args.no_baseline else {1.0: ["none"]}
    for near in args.near.split(","):
        mb = args.mb if near == "none" or args.near_mb is None else args.near_mb
        plan.setdefault(mb, []).append(near)
    results: list[dict] = []
    if args.append:  # keep the rows an earlier run of this section measured today
        from bench.common import RESULTS_DIR, machine

        earlier = Path(args.results_dir or RESULTS_DIR) / f"{time.strftime('%Y-%m-%d')}-{machine()}.json"
        if earlier.is_file():
            results = json.loads(earlier.read_text())["sections"].get("data_prep_memory", {}).get("rows", [])
    with tempfile.TemporaryDirectory(prefix="data_prep_memory-") as tmp:
        work = Path(tmp)
        for mb, settings in plan.items():
            rows_path = work / f"medical_o1-{mb:g}mb.jsonl"
            started = time.perf_counter()
            rows = write_medical_jsonl(rows_path, int(mb * 2**20))
            sys.stdout.write(
                f"generated {rows} rows, {rows_path.stat().st_size / 2**20:.0f} MiB in "
                f"{time.perf_counter() - started:.0f} s\n"
            )
            for near in settings:
                result = run_build(rows_path, near, work, args.minhash_backend)
                results.append(result)
                sys.stdout.write(json.dumps(result) + "\n")
                sys.stdout.flush()
                # Written after each run: a long run stopped later still leaves what it measured.
                path = write_results(
                    "data_prep_memory",
                    results,
                    (
                        "Peak RSS of `python -m data_prep` (its own process, os.wait4 ru_maxrss) on a generated JSONL "
                        "in the medical-o1 schema (1% exact, 1% near duplicates), tokenizer = embedded tiny BPE, "
                        f"max_length 8192, exact dedup on; target: < {args.max_rss_mb:.0f} MB with near-dedup off. "
                        "The 1 MB row is the fixed cost of any build (Python, torch, transformers, tokenizer)."
                    ),
                    Path(args.results_dir) if args.results_dir else None,
                )
            rows_path.unlink()
    sys.stdout.write(f"written to {path}\n")
    over = [r for r in results if r["near_dedup"] == "none" and r["peak_rss_mb"] > args.max_rss_mb]
    if over:
        sys.stdout.write(f"peak RSS over {args.max_rss_mb:.0f} MB: {over}\n")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
