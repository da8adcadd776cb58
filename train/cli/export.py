"""Export commands: merge (LoRA chain -> 16-bit safetensors), export (GGUF), export-onnx (classifiers)."""

from __future__ import annotations

import json
import os
import sys

from train.core.cli import Command

TRUST_HELP = (
    "let the stage's stored recipe run its base model's own code (model.trust_remote_code: true in its "
    "stage.json); refused without this flag"
)


def _merge_arguments(p) -> None:
    p.add_argument("stage_dir")
    p.add_argument("--out", help="output folder (default STAGE_DIR/merged)")
    p.add_argument(
        "--adapter",
        help="another adapter of this stage, e.g. STAGE_DIR/checkpoint-400, or 'best' "
        "(what `train eval --checkpoints` picked)",
    )
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float16 or float32")
    p.add_argument(
        "--dequantize",
        action="store_true",
        help="merge into the 4-bit weights training saw, dequantized, instead of the original 16-bit",
    )
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--license", dest="license_id", help="model card license (default: the base model's)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the merged folder (token from HF_TOKEN)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def _merge(args) -> None:
    from train.export.hub import hub_token, push_folder
    from train.export.merge import merge_stage

    out = args.out or os.path.join(args.stage_dir, "merged")
    if args.push_to_hub:
        hub_token()  # a missing token or an unreachable Hub fails now, not after a long merge
    report = merge_stage(
        args.stage_dir,
        out,
        adapter=args.adapter,
        dtype=args.dtype,
        dequantize=args.dequantize,
        max_shard_size=args.max_shard_size,
        license_id=args.license_id,
        trust_remote_code=args.trust_remote_code,
    )
    sys.stdout.write(
        json.dumps({k: report[k] for k in ("merged_vs_base_plus_adapter", "adapter_effect")}, indent=2)
        + f"\nmerged model: {out}\n"
    )
    if args.push_to_hub:
        push_folder(out, args.push_to_hub)


def _export_arguments(p) -> None:
    p.add_argument("merged_dir")
    p.add_argument("--gguf", default="f16,q4_k_m", help="comma list of f16, bf16, f32, q8_0, q6_k, q5_k_m, q4_k_m")
    p.add_argument("--out", help="output folder (default MERGED_DIR/gguf)")
    p.add_argument("--llama-cpp", help="a llama.cpp checkout to use instead of the bundled converter")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the GGUF files and card (token from HF_TOKEN)")


def _export(args) -> None:
    from train.export.gguf import export_gguf, format_export
    from train.export.hub import hub_token, push_folder

    types = [t.strip().lower() for t in args.gguf.split(",") if t.strip()]
    if args.push_to_hub:
        hub_token()
    report = export_gguf(args.merged_dir, types, out=args.out, llama_cpp_dir=args.llama_cpp)
    sys.stdout.write(format_export(report))
    if args.push_to_hub:
        push_folder(report["out"], args.push_to_hub, allow_patterns=["*.gguf", "README.md", "export_report.json"])


def _onnx_arguments(p) -> None:
    p.add_argument("model_dir")
    p.add_argument("--out", help="default MODEL_DIR/model.onnx")


def _onnx(args) -> None:
    from train.methods.classification import export_onnx

    sys.stdout.write(json.dumps(export_onnx(args.model_dir, args.out), indent=2) + "\n")


COMMANDS = [
    Command("merge", "merge a stage's LoRA chain into 16-bit safetensors, parity-checked", _merge_arguments, _merge),
    Command("export", "GGUF files from a merged model, via llama.cpp, parity-checked", _export_arguments, _export),
    Command("export-onnx", "export a classifier to ONNX with an onnxruntime parity check", _onnx_arguments, _onnx),
]
