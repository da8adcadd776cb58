"""Inference and evaluation commands: generate, eval, lm-eval, predict-labels."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from train.cli.export import TRUST_HELP
from train.core.cli import Command
from train.core.errors import UserError
from train.core.io import read_jsonl, write_jsonl

DECODING_FLAGS = (
    ("--max-new-tokens", int, 256),
    ("--num-beams", int, 1),
    ("--top-k", int, 0),
    ("--top-p", float, 1.0),
    ("--temperature", float, 1.0),
    ("--repetition-penalty", float, 1.0),
    ("--length-penalty", float, 1.0),
    ("--num-return-sequences", int, 1),
    ("--seed", int, 0),
)


def _generate_arguments(p) -> None:
    p.add_argument("target", help="a stage folder, a merged model folder or a .gguf file")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a question (repeatable)")
    source.add_argument("--input", help="jsonl with a 'question' (or 'prompt') per row")
    p.add_argument("--out", help="write jsonl here (default: print)")
    p.add_argument("--batch-size", type=int, default=8)
    for flag, kind, default in DECODING_FLAGS:
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def _generate(args) -> None:
    from train.core.config import DecodingConfig
    from train.inference.generate import generate_candidates

    if args.input:
        rows = read_jsonl(args.input)
        questions = [r.get("question") or r.get("prompt") for r in rows]
        missing = [i + 1 for i, q in enumerate(questions) if not isinstance(q, str)]
        if missing:
            raise UserError(f"{args.input}: row(s) {missing[:10]} have no 'question' or 'prompt' text")
    else:
        questions = args.prompt
    decoding = DecodingConfig(
        name="cli",
        do_sample=args.do_sample,
        **{flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, _, _ in DECODING_FLAGS},
    )
    decoding.validate("generate")
    prompts, candidates = generate_candidates(
        args.target, questions, decoding, args.batch_size, trust_remote_code=args.trust_remote_code
    )
    lines = [
        {"question": q, "prompt": p, "completions": [{"text": t, "logprob": round(lp, 4)} for t, lp in c]}
        for q, p, c in zip(questions, prompts, candidates, strict=True)
    ]
    if args.out:
        write_jsonl(args.out, lines)
        sys.stdout.write(f"{len(lines)} rows written to {args.out}\n")
    else:
        for line in lines:
            sys.stdout.write(
                f"### {line['question']}\n" + "\n--\n".join(c["text"] for c in line["completions"]) + "\n\n"
            )


def _eval_arguments(p) -> None:
    p.add_argument("targets", nargs="+", help="a recipe YAML or stage folder, merged folders, .gguf files")
    p.add_argument("--data", help="eval jsonl (default: the recipe's eval.data)")
    p.add_argument("--out", help="output folder (default: FIRST_TARGET/eval, or outputs/eval for a file)")
    p.add_argument(
        "--decoding",
        action="append",
        help="NAME[:key=value,...], repeatable (a sweep); "
        "e.g. greedy, beam3:num_beams=3, sc:do_sample=true,top_p=0.9,num_return_sequences=5",
    )
    p.add_argument("--checkpoints", action="store_true", help="also score every checkpoint; write the best")
    p.add_argument("--prompt-variant", action="append", help="question text from {context} {question} {choices}")
    p.add_argument("--max-examples", type=int)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def _eval(args) -> None:
    from train.evaluation.task_eval import eval_config_for, format_eval, parse_decoding, run_eval

    specs, cfg = eval_config_for(args.targets[0])
    specs += args.targets[1:]
    if args.decoding:
        cfg.decodings = [parse_decoding(d) for d in args.decoding]
    if args.prompt_variant:
        cfg.prompt_variants = args.prompt_variant
    if args.max_examples:
        cfg.max_examples = args.max_examples
    first = Path(specs[0])
    out = args.out or str(first / "eval" if first.is_dir() else Path("outputs") / "eval" / first.stem)
    report = run_eval(
        specs, cfg, out, data=args.data, checkpoints=args.checkpoints, trust_remote_code=args.trust_remote_code
    )
    sys.stdout.write(format_eval(report))


def _lm_eval_arguments(p) -> None:
    p.add_argument("target", help="a stage folder, a merged folder, or a base model id/folder")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    p.add_argument("--out", help="output folder (default: TARGET/lm_eval, or outputs/lm_eval/NAME)")
    p.add_argument("--limit", type=float, help="examples per task (a fraction if < 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--include-path", action="append", help="a folder of your own task YAMLs (repeatable)")
    p.add_argument("--log-samples", action="store_true", help="write every request and its scores")
    p.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the tokenizer's template")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def _lm_eval(args) -> None:
    from train.evaluation.lm_eval import run_lm_eval

    target = Path(args.target)
    out = args.out or str(target / "lm_eval" if target.is_dir() else Path("outputs") / "lm_eval" / target.name)
    report = run_lm_eval(
        args.target,
        [t for t in args.tasks.split(",") if t],
        out,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        include_paths=args.include_path,
        log_samples=args.log_samples,
        apply_chat_template=args.apply_chat_template,
        trust_remote_code=args.trust_remote_code,
    )
    sys.stdout.write(report["table"] + f"\nresults in {out}/lm_eval_results.json\n")


def _predict_labels_arguments(p) -> None:
    p.add_argument("model_dir")
    p.add_argument("--input", required=True, help="jsonl with a 'text' per row")
    p.add_argument("--text-field", default="text")
    p.add_argument("--out", help="write jsonl here (default: print)")


def _predict_labels(args) -> None:
    from train.methods.classification import predict_labels

    rows = read_jsonl(args.input)
    bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r.get(args.text_field), str)]
    if bad:
        raise UserError(f"{args.input}: row(s) {bad[:10]} have no '{args.text_field}' text")
    results = predict_labels(args.model_dir, [r[args.text_field] for r in rows])
    lines = [
        {**row, "predicted": res["labels"], "scores": res["scores"]} for row, res in zip(rows, results, strict=True)
    ]
    if args.out:
        write_jsonl(args.out, lines)
        sys.stdout.write(f"{len(lines)} rows written to {args.out}\n")
    else:
        sys.stdout.write("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))


COMMANDS = [
    Command(
        "generate",
        "generate from a stage folder, a merged model folder or a .gguf file",
        _generate_arguments,
        _generate,
    ),
    Command("eval", "task evaluation: decodings, clean-up, metrics, voting, best checkpoint", _eval_arguments, _eval),
    Command(
        "lm-eval",
        "standard benchmarks through lm-evaluation-harness (KorMedMCQA, KMMLU, ...)",
        _lm_eval_arguments,
        _lm_eval,
    ),
    Command("predict-labels", "labels for texts from a trained classifier", _predict_labels_arguments, _predict_labels),
]
