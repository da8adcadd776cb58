"""Preference and verifiable data for the reward, dpo and grpo methods: load, validate, pair, render.

| schema     | fields (rename with `columns:`)   | becomes                                          |
|------------|-----------------------------------|--------------------------------------------------|
| preference | prompt, chosen, rejected          | one pair                                         |
| ratings    | prompt, response, rating (1-10)   | pairs of answers to one prompt whose ratings differ by >= preference.ratings_margin |
| verifiable | question, answer (ground truth)   | a GRPO prompt with its ground truth              |

medical-o1-verifiable-problem's columns ("Open-ended Verifiable Question", "Ground-True Answer")
map through `columns: {question: ..., answer: ...}`. Prompts are rendered with the stage's template
(the same text SFT trained on), completions are kept as written. Bad rows are counted by reason and
written to rejects.jsonl beside a manifest, as for SFT data.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

from data_prep.sources import Reject, iter_source
from train.core.config import Recipe
from train.core.errors import UserError
from train.core.formats import render_prompt
from train.core.io import REJECTS_FILE, write_json, write_rejects
from train.core.log import get_logger, is_main_process
from train.core.paths import REPO_ROOT

log = get_logger("preference_data")
FIELDS = {
    "preference": ("prompt", "chosen", "rejected"),
    "ratings": ("prompt", "response", "rating"),
    "verifiable": ("question", "answer"),
}


def _text(value) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def build_preference_data(recipe: Recipe, tokenizer, out: Path):
    """(train Dataset, eval Dataset or None, manifest): prompt/chosen/rejected or prompt/ground_truth rows."""
    import datasets

    data = recipe.data
    rejects: list[Reject] = []
    rows: list[dict] = []
    raw_counts: Counter = Counter()
    for source in data.sources:
        names = {f: source.columns.get(f, f) for f in FIELDS[source.schema]}
        by_prompt: dict[str, list[tuple[str, float, str]]] = defaultdict(list)
        for raw in iter_source(source, REPO_ROOT, rejects):
            raw_counts[source.name] += 1
            cells = {f: raw.cells.get(col) for f, col in names.items()}

            def reject(reason, detail, raw=raw, source=source):
                rejects.append(
                    Reject(source.name, raw.row_id, reason, detail, {k: str(v) for k, v in raw.cells.items()})
                )

            question = _text(cells.get("prompt") or cells.get("question"))
            if question is None:
                reject("empty_field", f"no {names.get('prompt') or names.get('question')}")
                continue
            prompt = render_prompt(question, data.system_prompt, data.template, tokenizer)
            if source.schema == "preference":
                chosen, rejected = _text(cells["chosen"]), _text(cells["rejected"])
                if chosen is None or rejected is None:
                    reject("empty_field", "chosen or rejected is empty")
                elif chosen == rejected:
                    reject("identical_pair", "chosen and rejected are the same text")
                else:
                    rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source.name})
            elif source.schema == "ratings":
                response, raw_rating = _text(cells["response"]), cells["rating"]
                try:
                    rating = float(raw_rating)  # type: ignore[arg-type]  # anything else is a reject
                except (TypeError, ValueError):
                    reject("bad_rating", f"rating {raw_rating!r} is not a number")
                    continue
                if response is None:
                    reject("empty_field", "response is empty")
                    continue
                by_prompt[prompt].append((response, rating, raw.row_id))
            else:
                answer = _text(cells["answer"])
                if answer is None:
                    reject("empty_field", "no ground truth")
                    continue
                rows.append({"prompt": prompt, "ground_truth": answer, "source": source.name})
        for prompt, answers in by_prompt.items():  # ratings -> every pair at least `ratings_margin` apart
            answers.sort(key=lambda a: -a[1])
            pairs = [
                (hi, lo)
                for i, hi in enumerate(answers)
                for lo in answers[i + 1 :]
                if hi[1] - lo[1] >= recipe.preference.ratings_margin
            ]
            if not pairs:
                rejects.append(
                    Reject(
                        source.name,
                        answers[0][2],
                        "no_pair",
                        f"{len(answers)} rating(s) within {recipe.preference.ratings_margin} of each other",
                        {"prompt": prompt[:200]},
                    )
                )
            rows.extend(
                {"prompt": prompt, "chosen": hi[0], "rejected": lo[0], "source": source.name} for hi, lo in pairs
            )
    if is_main_process():  # every rank builds the same rows in memory; one writes the files
        write_rejects(out, rejects)
    if not rows:
        raise UserError(f"no usable {recipe.method} rows in {[s.path for s in data.sources]}; see {out / REJECTS_FILE}")
    random.Random(recipe.training.seed).shuffle(rows)
    n_eval = int(len(rows) * recipe.preference.eval_fraction) if recipe.method != "grpo" else 0
    train, held = rows[n_eval:], rows[:n_eval]
    manifest = {
        "method": recipe.method,
        "raw_rows": dict(raw_counts),
        "rows": len(rows),
        "rejected": dict(Counter(r.reason for r in rejects)),
        "train_rows": len(train),
        "eval_rows": len(held),
    }
    if is_main_process():
        write_json(out / "manifest.json", manifest)
    if rejects:
        log.warning("%d row(s) rejected %s, written to %s", len(rejects), manifest["rejected"], out / REJECTS_FILE)

    def to_ds(items):
        return (
            datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "source"} for r in items])
            if items
            else None
        )

    return to_ds(train), to_ds(held), manifest
