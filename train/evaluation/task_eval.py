"""Task evaluation: generate with each decoding and prompt variant from each model, clean, score, vote.

    python -m train eval outputs/stage2_korean --data qa.jsonl
    python -m train eval outputs/stage2_korean --checkpoints             # pick the best checkpoint
    python -m train eval outputs/a outputs/b merged/ model.gguf --data qa.jsonl   # ensemble of models
    make eval STAGE=outputs/stage2_korean DATA=qa.jsonl

A target is a stage folder (base + every adapter of its lineage), a merged model folder, or a GGUF
file (llama.cpp; no beam search there). A *member* is one target x decoding x prompt variant; each
is scored on its own, then answers are voted: over a member's candidates (beams or samples), over
prompt variants, and over all members (the ensemble). Ties go to the higher total log-probability.
Writes `<out>/predictions.jsonl` (every raw completion kept), `<out>/metrics.json`, prints a table;
with `--checkpoints`, `best_checkpoint.json` in the stage folder names the checkpoint that scores
best on `eval.primary_metric` (`merge --adapter best` takes it).
"""

from __future__ import annotations

import json
from pathlib import Path

from train.core.config import DecodingConfig, EvalConfig
from train.core.errors import UserError
from train.core.io import count_reasons, write_json, write_jsonl, write_rejects
from train.core.log import get_logger
from train.evaluation.qa_metrics import aggregate, clean_answer, score_example, vote
from train.inference.generate import make_generator
from train.inference.targets import Target, resolve_targets

log = get_logger("eval")
BEST_CHECKPOINT = "best_checkpoint.json"
FIELDS = ("question", "answer", "context", "choices", "id")


# ---------------------------------------------------------------------------------------------
# Data


def load_examples(path: str | Path, cfg: EvalConfig, out: Path) -> list[dict]:
    """Rows as {id, question, references, context, choices}; bad rows are counted and written aside."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"eval data {path} does not exist")
    column = {f: cfg.columns.get(f, f) for f in FIELDS}
    examples, rejected = [], []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                rejected.append({"line": line_no, "reason": "malformed_json", "detail": str(err)})
                continue
            question, answer = row.get(column["question"]), row.get(column["answer"])
            refs = [answer] if isinstance(answer, str) else answer
            if not isinstance(question, str) or not question.strip():
                rejected.append({"line": line_no, "reason": "missing_question", "row": row})
            elif not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
                rejected.append({"line": line_no, "reason": "missing_answer", "row": row})
            else:
                examples.append(
                    {
                        "id": str(row.get(column["id"], line_no)),
                        "question": question,
                        "references": refs,
                        "context": row.get(column["context"]) or "",
                        "choices": row.get(column["choices"]),
                    }
                )
    if rejected:
        written = write_rejects(out, rejected)
        log.warning("%s: %d row(s) rejected %s, written to %s", path, len(rejected), count_reasons(rejected), written)
    if not examples:
        raise UserError(f"eval data {path} has no usable rows (need '{column['question']}' and '{column['answer']}')")
    return examples[: cfg.max_examples] if cfg.max_examples else examples


def question_text(variant: str, ex: dict) -> str:
    context = f"{ex['context']}\n\n" if ex["context"] else ""
    choices = (
        "\n\n" + "\n".join(f"{'ABCDEFGHIJ'[i]}. {c}" for i, c in enumerate(ex["choices"])) if ex.get("choices") else ""
    )
    try:
        return variant.format(context=context, question=ex["question"], choices=choices)
    except KeyError as err:
        raise UserError(
            f"eval.prompt_variants: unknown placeholder {err}; use {{context}}, {{question}}, {{choices}}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Running and scoring


def _score(examples: list[dict], answers: list[str]) -> tuple[list[dict], dict]:
    per = [score_example(a, ex["references"], ex.get("choices")) for a, ex in zip(answers, examples, strict=True)]
    return per, aggregate(per)


def run_eval(
    specs: list[str],
    cfg: EvalConfig,
    out: str | Path,
    data: str | None = None,
    checkpoints: bool = False,
    trust_remote_code: bool = False,
) -> dict:
    """`trust_remote_code`: the user's opt-in (--trust-remote-code) for stages whose stored recipe sets
    model.trust_remote_code; without it they are refused before any model loads."""
    out = Path(out)
    data = data or cfg.data
    if not data:
        raise UserError("no eval data: pass --data FILE.jsonl or set eval.data in the recipe")
    targets = resolve_targets(specs, checkpoints, trust_remote_code=trust_remote_code)
    examples = load_examples(data, cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    members: dict[str, dict] = {}
    rows = []
    for target in targets:
        generator = make_generator(target)
        for dec in cfg.decodings:
            variant_answers = []
            for v, variant in enumerate(cfg.prompt_variants):
                label = f"{target.label} | {dec.name}" + (f" | prompt {v}" if len(cfg.prompt_variants) > 1 else "")
                prompts = [generator.render(question_text(variant, ex)) for ex in examples]
                candidates = generator.generate(prompts, dec, cfg.batch_size)
                cleaned = [
                    [(clean_answer(t, p, cfg.cleanup), lp) for t, lp in cands]
                    for p, cands in zip(prompts, candidates, strict=True)
                ]
                top = [c[0][0] for c in cleaned]
                voted = [vote(c) for c in cleaned]
                per, metrics = _score(examples, top)
                entry = {"target": target.label, "decoding": dec.name, "variant": v, "metrics": metrics}
                if dec.num_return_sequences > 1:
                    entry["vote_over_candidates"] = _score(examples, [a for a, _ in voted])[1]
                members[label] = entry
                answer_of = [a for a, _ in voted] if dec.num_return_sequences > 1 else top
                variant_answers.append([(a, max(lp for _, lp in c)) for a, c in zip(answer_of, cleaned, strict=True)])
                for ex, p, cands, clean, s in zip(examples, prompts, candidates, cleaned, per, strict=True):
                    rows.append(
                        {
                            "member": label,
                            "id": ex["id"],
                            "prompt": p,
                            "references": ex["references"],
                            "completions": [{"text": t, "logprob": round(lp, 4)} for t, lp in cands],
                            "answers": [a for a, _ in clean],
                            "scores": s,
                        }
                    )
            if len(cfg.prompt_variants) > 1:
                answers = [vote([va[i] for va in variant_answers])[0] for i in range(len(examples))]
                members[f"{target.label} | {dec.name} | vote over prompts"] = {
                    "target": target.label,
                    "decoding": dec.name,
                    "metrics": _score(examples, answers)[1],
                }
        del generator

    report: dict = {
        "data": str(data),
        "examples": len(examples),
        "primary_metric": cfg.primary_metric,
        "members": members,
    }
    base_members = [(label, m) for label, m in members.items() if "vote over" not in label]
    if len(base_members) > 1:
        by_member: dict[str, list[str]] = {}
        logprob: dict[str, list[float]] = {}
        for row in rows:
            by_member.setdefault(row["member"], []).append(row["answers"][0])
            logprob.setdefault(row["member"], []).append(row["completions"][0]["logprob"])
        answers = [vote([(by_member[m][i], logprob[m][i]) for m in by_member])[0] for i in range(len(examples))]
        report["ensemble"] = {"members": len(by_member), "metrics": _score(examples, answers)[1]}
    if checkpoints:
        report["best_checkpoint"] = _pick_best(targets, members, cfg.primary_metric)
    write_jsonl(out / "predictions.jsonl", rows)
    write_json(out / "metrics.json", report)
    report["out"] = str(out)
    return report


def _pick_best(targets: list[Target], members: dict, metric: str) -> dict:
    """The adapter whose members score best on `metric` (mean over decodings/variants); written per stage."""
    scores: dict[str, list[float]] = {}
    for m in members.values():
        if metric not in m["metrics"]:
            raise UserError(f"eval.primary_metric '{metric}' was not computed (accuracy needs choices in the data)")
        scores.setdefault(m["target"], []).append(m["metrics"][metric])
    ranked = {t.label: sum(scores[t.label]) / len(scores[t.label]) for t in targets if t.adapter is not None}
    best_label = max(ranked, key=lambda k: ranked[k])  # max() keeps the first: the earliest checkpoint wins a tie
    best = next(t for t in targets if t.label == best_label)
    record = {
        "metric": metric,
        "best": best_label,
        "adapter": str(best.adapter),
        "score": ranked[best_label],
        "scores": ranked,
    }
    write_json(best.path / BEST_CHECKPOINT, record)
    log.info("best on %s: %s (%.4f) -> %s", metric, best_label, ranked[best_label], best.path / BEST_CHECKPOINT)
    return record


def format_eval(report: dict) -> str:
    metric_names = [
        k
        for k in ("exact_match", "f1", "accuracy", "contains_reference", "length")
        if any(k in m["metrics"] for m in report["members"].values())
    ]
    width = max([len(label) + 24 for label in report["members"]] + [20]) + 2
    header = f"{'member':<{width}}" + "".join(f"{k:>20}" for k in metric_names)
    lines = [header, "-" * len(header)]

    def row(label, metrics):
        return f"{label:<{width}}" + "".join(f"{metrics.get(k, float('nan')):>20.4f}" for k in metric_names)

    for label, m in report["members"].items():
        lines.append(row(label, m["metrics"]))
        if "vote_over_candidates" in m:
            lines.append(row(f"{label} | vote over candidates", m["vote_over_candidates"]))
    if "ensemble" in report:
        lines.append(row(f"ensemble vote ({report['ensemble']['members']} members)", report["ensemble"]["metrics"]))
    if "best_checkpoint" in report:
        b = report["best_checkpoint"]
        lines.append(f"\nbest on {b['metric']}: {b['best']} ({b['score']:.4f})")
    return "\n".join(lines) + f"\n\n{report['examples']} examples; predictions and metrics in {report.get('out')}\n"


def parse_decoding(spec: str) -> DecodingConfig:
    """`NAME[:key=value,...]`, e.g. `beam3:num_beams=3,length_penalty=1.2` or `topp:do_sample=true,top_p=0.9`."""
    import yaml

    from train.core.typed_config import build_config

    name, _, rest = spec.partition(":")
    values: dict = {"name": name or "decoding"}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise UserError(f"--decoding {spec}: '{item}' is not key=value")
        values[key.strip()] = yaml.safe_load(value)
    decoding = build_config(DecodingConfig, values, f"--decoding {spec}")
    decoding.validate(f"--decoding {spec}")
    return decoding


def eval_config_for(spec: str) -> tuple[list[str], EvalConfig]:
    """A recipe YAML evaluates its stage's output_dir with its eval section; a stage folder uses its own."""
    from train.core.config import load_recipe, recipe_from_dict
    from train.models.lineage import read_stage

    path = Path(spec)
    if path.suffix in (".yaml", ".yml"):
        recipe = load_recipe(path)
        return [recipe.output_dir], recipe.eval
    if (path / "stage.json").is_file():
        return [spec], recipe_from_dict(read_stage(path)["recipe"], origin=str(path / "stage.json")).eval
    return [spec], EvalConfig()
