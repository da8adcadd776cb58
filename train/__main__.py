"""Command line of the trainer.

    python -m train sft RECIPE [section.key=value ...]     train one stage
    python -m train generate TARGET --prompt TEXT          generate from a stage, a merged model or a GGUF file
    python -m train eval RECIPE_OR_TARGET... --data F      decode, clean, score (EM/F1/accuracy), vote, pick checkpoints
    python -m train lm-eval TARGET --tasks T1,T2           standard benchmarks (lm-evaluation-harness: KorMedMCQA, KMMLU...)
    python -m train merge STAGE_DIR [--out DIR]            LoRA chain -> merged 16-bit safetensors, parity-checked
    python -m train export MERGED_DIR --gguf f16,q4_k_m    GGUF via llama.cpp, parity-checked
    python -m train reward|dpo|grpo RECIPE                 preference and RL stages after SFT (TRL trainers)
    python -m train classify RECIPE                        sequence classification (single/multi-label encoders)
    python -m train predict-labels MODEL_DIR --input F     labels with the saved per-label thresholds
    python -m train export-onnx MODEL_DIR                  classifier -> ONNX, checked with onnxruntime
    python -m train demo [--fast]                          the whole pipeline on the embedded tiny model
    python -m train build-tiny                             build (or find) the embedded tiny model
    python -m train pick-strategy RECIPE --gpus N          STRATEGY=auto: which accelerate config to use
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from train.errors import UserError, cli_guard


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sft = sub.add_parser("sft", help="supervised fine-tuning of one stage")
    sft.add_argument("recipe", help="recipe YAML, e.g. recipes/stage1_medical.yaml")
    sft.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=20")
    gen = sub.add_parser("generate", help="generate from a stage folder, a merged model folder or a .gguf file")
    gen.add_argument("target")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a question (repeatable)")
    source.add_argument("--input", help="jsonl with a 'question' (or 'prompt') per row")
    gen.add_argument("--out", help="write jsonl here (default: print)")
    gen.add_argument("--batch-size", type=int, default=8)
    for flag, kind, default in (("--max-new-tokens", int, 256), ("--num-beams", int, 1), ("--top-k", int, 0),
                                ("--top-p", float, 1.0), ("--temperature", float, 1.0),
                                ("--repetition-penalty", float, 1.0), ("--length-penalty", float, 1.0),
                                ("--num-return-sequences", int, 1), ("--seed", int, 0)):
        gen.add_argument(flag, type=kind, default=default)
    gen.add_argument("--do-sample", action="store_true")
    ev = sub.add_parser("eval", help="task evaluation: decodings, clean-up, metrics, voting, best checkpoint")
    ev.add_argument("targets", nargs="+", help="a recipe YAML or stage folder, merged folders, .gguf files")
    ev.add_argument("--data", help="eval jsonl (default: the recipe's eval.data)")
    ev.add_argument("--out", help="output folder (default: FIRST_TARGET/eval, or outputs/eval for a file)")
    ev.add_argument("--decoding", action="append", help="NAME[:key=value,...], repeatable (a sweep); "
                    "e.g. greedy, beam3:num_beams=3, sc:do_sample=true,top_p=0.9,num_return_sequences=5")
    ev.add_argument("--checkpoints", action="store_true", help="also score every checkpoint; write the best")
    ev.add_argument("--prompt-variant", action="append", help="question text from {context} {question} {choices}")
    ev.add_argument("--max-examples", type=int)
    lme = sub.add_parser("lm-eval", help="standard benchmarks through lm-evaluation-harness (KorMedMCQA, KMMLU, ...)")
    lme.add_argument("target", help="a stage folder, a merged folder, or a base model id/folder")
    lme.add_argument("--tasks", required=True, help="comma-separated lm-eval task or group names")
    lme.add_argument("--out", help="output folder (default: TARGET/lm_eval, or outputs/lm_eval/NAME)")
    lme.add_argument("--limit", type=float, help="examples per task (a fraction if < 1)")
    lme.add_argument("--num-fewshot", type=int)
    lme.add_argument("--batch-size", type=int, default=8)
    lme.add_argument("--include-path", action="append", help="a folder of your own task YAMLs (repeatable)")
    lme.add_argument("--log-samples", action="store_true", help="write every request and its scores")
    lme.add_argument("--apply-chat-template", action="store_true", help="wrap prompts in the tokenizer's template")
    merge = sub.add_parser("merge", help="merge a stage's LoRA chain into 16-bit safetensors")
    merge.add_argument("stage_dir")
    merge.add_argument("--out", help="output folder (default STAGE_DIR/merged)")
    merge.add_argument("--adapter", help="another adapter of this stage, e.g. STAGE_DIR/checkpoint-400, or 'best' "
                       "(what `train eval --checkpoints` picked)")
    merge.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    merge.add_argument("--dequantize", action="store_true",
                       help="merge into the 4-bit weights training saw, dequantized, instead of the original 16-bit")
    merge.add_argument("--max-shard-size", default="5GB")
    merge.add_argument("--license", dest="license_id", help="model card license (default: the base model's)")
    merge.add_argument("--push-to-hub", metavar="REPO", help="upload the merged folder (token from HF_TOKEN)")
    export = sub.add_parser("export", help="GGUF files from a merged model, via llama.cpp")
    export.add_argument("merged_dir")
    export.add_argument("--gguf", default="f16,q4_k_m", help="comma list of f16, bf16, f32, q8_0, q6_k, q5_k_m, q4_k_m")
    export.add_argument("--out", help="output folder (default MERGED_DIR/gguf)")
    export.add_argument("--llama-cpp", help="a llama.cpp checkout to use instead of the bundled converter")
    export.add_argument("--push-to-hub", metavar="REPO", help="upload the GGUF files and card (token from HF_TOKEN)")
    for method, text in (("reward", "pairwise reward model (TRL RewardTrainer)"),
                         ("dpo", "DPO and its variants (TRL DPOTrainer)"), ("grpo", "GRPO (TRL GRPOTrainer)")):
        p = sub.add_parser(method, help=text + " after an SFT stage")
        p.add_argument("recipe")
        p.add_argument("overrides", nargs="*", help="section.key=value")
    cls = sub.add_parser("classify", help="fine-tune an encoder for single- or multi-label classification")
    cls.add_argument("recipe", help="e.g. recipes/classify/minilm_keywords.yaml")
    cls.add_argument("overrides", nargs="*", help="section.key=value")
    pl = sub.add_parser("predict-labels", help="labels for texts from a trained classifier")
    pl.add_argument("model_dir")
    pl.add_argument("--input", required=True, help="jsonl with a 'text' per row")
    pl.add_argument("--text-field", default="text")
    pl.add_argument("--out", help="write jsonl here (default: print)")
    onnx = sub.add_parser("export-onnx", help="export a classifier to ONNX with an onnxruntime parity check")
    onnx.add_argument("model_dir")
    onnx.add_argument("--out", help="default MODEL_DIR/model.onnx")
    demo = sub.add_parser("demo", help="whole pipeline on the embedded tiny model")
    demo.add_argument("--fast", action="store_true", help="few steps: checks the plumbing, not the learning")
    demo.add_argument("--out", default="outputs/demo", help="where the demo writes its stages and summary")
    sub.add_parser("build-tiny", help="build the embedded tiny model and print its folder")
    pick = sub.add_parser("pick-strategy", help="STRATEGY=auto: print the launch strategy for a recipe and GPUs")
    pick.add_argument("recipe")
    pick.add_argument("--gpus", type=int, required=True)
    pick.add_argument("--gpu-memory-gb", type=float, help="memory per GPU (default: read from the first GPU)")
    return parser


def _pick_strategy(args) -> None:
    from train.config import load_recipe
    from train.launch import gpu_memory_gb, parameter_count, pick_strategy
    from train.model import load_model_config

    recipe = load_recipe(args.recipe)
    memory = args.gpu_memory_gb or gpu_memory_gb()
    if memory is None:
        raise UserError("no GPU visible to read its memory from; pass --gpu-memory-gb (e.g. 24 for a 4090, 80 for H100)")
    params = parameter_count(load_model_config(recipe.model))
    strategy, why = pick_strategy(params, recipe.model.quantization, args.gpus, memory)
    sys.stderr.write(f"STRATEGY=auto -> {strategy}: {why}\n")
    sys.stdout.write(("ddp" if strategy == "single" else strategy) + "\n")


def _generate(args) -> None:
    from train.config import DecodingConfig
    from train.generate import generate_candidates

    if args.input:
        with open(args.input, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        questions = [r.get("question") or r.get("prompt") for r in rows]
        missing = [i + 1 for i, q in enumerate(questions) if not isinstance(q, str)]
        if missing:
            raise UserError(f"{args.input}: row(s) {missing[:10]} have no 'question' or 'prompt' text")
    else:
        questions = args.prompt
    decoding = DecodingConfig(name="cli", **{k: getattr(args, k) for k in (
        "max_new_tokens", "num_beams", "top_k", "top_p", "temperature", "repetition_penalty", "length_penalty",
        "num_return_sequences", "seed", "do_sample")})
    prompts, candidates = generate_candidates(args.target, questions, decoding, args.batch_size)
    lines = [{"question": q, "prompt": p, "completions": [{"text": t, "logprob": round(lp, 4)} for t, lp in c]}
             for q, p, c in zip(questions, prompts, candidates, strict=True)]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        sys.stdout.write(f"{len(lines)} rows written to {args.out}\n")
    else:
        for line in lines:
            sys.stdout.write(f"### {line['question']}\n" + "\n--\n".join(c["text"] for c in line["completions"]) + "\n\n")


def _predict_labels(args) -> None:
    from train.classify import predict_labels

    with open(args.input, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r.get(args.text_field), str)]
    if bad:
        raise UserError(f"{args.input}: row(s) {bad[:10]} have no '{args.text_field}' text")
    results = predict_labels(args.model_dir, [r[args.text_field] for r in rows])
    lines = [json.dumps({**row, "predicted": res["labels"], "scores": res["scores"]}, ensure_ascii=False)
             for row, res in zip(rows, results, strict=True)]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        sys.stdout.write(f"{len(lines)} rows written to {args.out}\n")
    else:
        sys.stdout.write("\n".join(lines) + "\n")


def _eval(args) -> None:
    from train.evaluation import eval_config_for, format_eval, parse_decoding, run_eval

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
    sys.stdout.write(format_eval(run_eval(specs, cfg, out, data=args.data, checkpoints=args.checkpoints)))


@cli_guard
def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "sft":
        from train.config import load_recipe
        from train.sft import run_sft

        run_sft(load_recipe(args.recipe, args.overrides))
    elif args.command == "generate":
        _generate(args)
    elif args.command == "eval":
        _eval(args)
    elif args.command == "lm-eval":
        from train.harness import run_lm_eval

        target = Path(args.target)
        out = args.out or str(target / "lm_eval" if target.is_dir() else Path("outputs") / "lm_eval" / target.name)
        report = run_lm_eval(args.target, [t for t in args.tasks.split(",") if t], out, limit=args.limit,
                             num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                             include_paths=args.include_path, log_samples=args.log_samples,
                             apply_chat_template=args.apply_chat_template)
        sys.stdout.write(report["table"] + f"\nresults in {out}/lm_eval_results.json\n")
    elif args.command == "merge":
        from train.merge import merge_stage

        out = args.out or os.path.join(args.stage_dir, "merged")
        if args.push_to_hub:
            from train.hub import hub_token

            hub_token()  # a missing token fails now, not after a long merge
        report = merge_stage(args.stage_dir, out, adapter=args.adapter, dtype=args.dtype, dequantize=args.dequantize,
                             max_shard_size=args.max_shard_size, license_id=args.license_id)
        sys.stdout.write(json.dumps({k: report[k] for k in ("merged_vs_base_plus_adapter", "adapter_effect")},
                                    indent=2) + f"\nmerged model: {out}\n")
        if args.push_to_hub:
            from train.hub import push_folder

            push_folder(out, args.push_to_hub)
    elif args.command == "export":
        from train.export import export_gguf, format_export

        types = [t.strip().lower() for t in args.gguf.split(",") if t.strip()]
        if args.push_to_hub:
            from train.hub import hub_token

            hub_token()
        report = export_gguf(args.merged_dir, types, out=args.out, llama_cpp_dir=args.llama_cpp)
        sys.stdout.write(format_export(report))
        if args.push_to_hub:
            from train.hub import push_folder

            push_folder(report["out"], args.push_to_hub, allow_patterns=["*.gguf", "README.md", "export_report.json"])
    elif args.command in ("reward", "dpo", "grpo"):
        from train.config import load_recipe
        from train.preference import run_preference

        recipe = load_recipe(args.recipe, args.overrides)
        if recipe.method != args.command:
            raise UserError(f"{args.recipe} has method: {recipe.method}; run python -m train {recipe.method} "
                            f"(or pass method={args.command})")
        record = run_preference(recipe)
        shown = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float)) and v is not None}
        sys.stdout.write(json.dumps(shown, indent=2) + f"\nstage: {recipe.output_dir}\n")
    elif args.command == "classify":
        from train.classify import load_classification_recipe, run_classification

        report = run_classification(load_classification_recipe(args.recipe, args.overrides))
        if report:
            shown = {k: round(v, 4) for k, v in report["metrics"].items() if isinstance(v, float)}
            sys.stdout.write(json.dumps(shown, indent=2) + f"\nmodel: {report['model_dir']}\n")
    elif args.command == "predict-labels":
        _predict_labels(args)
    elif args.command == "export-onnx":
        from train.classify import export_onnx

        sys.stdout.write(json.dumps(export_onnx(args.model_dir, args.out), indent=2) + "\n")
    elif args.command == "demo":
        from train.demo import format_report, run_demo

        sys.stdout.write(format_report(run_demo(out=args.out, fast=args.fast)))
    elif args.command == "build-tiny":
        from train.tiny import ensure_tiny_model

        sys.stdout.write(f"{ensure_tiny_model()}\n")
    elif args.command == "pick-strategy":
        _pick_strategy(args)
    else:  # argparse already rejects unknown commands
        raise UserError(f"unknown command {args.command}")


if __name__ == "__main__":
    main()
