"""Export a merged model to GGUF with llama.cpp's own converter and quantizer, parity-checked.

    python -m train export outputs/stage2_korean/merged --gguf f16,q8_0,q4_k_m
    make export MERGED=outputs/stage2_korean/merged QUANT=f16,q8_0,q4_k_m

Converter: `convert_hf_to_gguf.py` from a llama.cpp checkout (`--llama-cpp DIR` or $LLAMA_CPP_DIR), else
the copy `make install-export` unpacks from the pinned llama-cpp-python sdist into .cache/. Quantizer:
the checkout's `llama-quantize` when built, else llama-cpp-python's `llama_model_quantize`.

Checks, all written to export_report.json and the model card:
- tokenization of Korean and English strings (special tokens included) identical in llama.cpp and
  transformers;
- 16-bit files: llama.cpp logits against transformers on the merged weights;
- quantized files: llama.cpp against transformers reading the same GGUF file (dequantized), plus
  the loss against the merged model, reported only;
- chat template and EOS in the GGUF metadata equal the tokenizer's; llama.cpp renders a chat
  exactly as transformers does, and a chat completion through llama.cpp stops at EOS;
- file sizes and the tensor types actually written (q4_k_m falls back to other types on rows that
  are not a multiple of 256: detected and reported).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

from train.core.errors import UserError
from train.core.io import check_output_dir, claim_tmp, fresh_tmp, replace_output, write_json
from train.core.log import get_logger
from train.core.paths import REPO_ROOT
from train.export.cards import write_model_card
from train.export.merge import MERGE_REPORT
from train.export.modelfile import write_modelfile
from train.export.parity import PARITY_TEXTS, compare_logits, token_logits
from train.inference.llama_cpp import LLAMA_CPP_PYTHON_VERSION, import_llama_cpp

log = get_logger("export")

BUNDLED_LLAMA_CPP = REPO_ROOT / ".cache" / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"
EXPORT_REPORT = "export_report.json"
FLOAT_TYPES = {"f16": "f16", "bf16": "bf16", "f32": "f32"}
# name -> (llama_cpp ftype constant, 2-D tensor types a complete quantization writes)
QUANT_TYPES = {
    "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", {"Q8_0"}),
    "q6_k": ("LLAMA_FTYPE_MOSTLY_Q6_K", {"Q6_K"}),
    "q5_k_m": ("LLAMA_FTYPE_MOSTLY_Q5_K_M", {"Q5_K", "Q6_K"}),
    "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", {"Q4_K", "Q6_K"}),
}
# Max |logit difference| as a fraction of the largest |logit|, and the least argmax agreement.
TOLERANCE = {"float": (0.01, 0.95), "quant_same_file": (0.05, 0.90)}
# Special tokens and mixed scripts: where converters and tokenizers most often disagree.
TOKENIZER_TEXTS = PARITY_TEXTS + [
    "<｜User｜>당뇨병의 진단 기준은?<｜Assistant｜><think>\n공복 혈당 126 mg/dL 이상</think>",
    "Korean 한국어 mixed 文字 123,456.7 😀 tabs\tand\nnewlines  ",
]


def find_llama_cpp(explicit: str | None) -> Path:
    for candidate in (explicit, os.environ.get("LLAMA_CPP_DIR"), BUNDLED_LLAMA_CPP):
        if candidate and (Path(candidate) / "convert_hf_to_gguf.py").is_file():
            return Path(candidate).resolve()
        if candidate and candidate is explicit:
            raise UserError(f"--llama-cpp {explicit}: no convert_hf_to_gguf.py there (give a llama.cpp checkout)")
    raise UserError(
        "llama.cpp's converter is not installed: run `make install-export` (unpacks it from the "
        f"llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist) or pass --llama-cpp PATH_TO_LLAMA_CPP"
    )


def convert(llama_cpp_dir: Path, merged_dir: Path, outtype: str, outfile: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "train.export.gguf_convert",
        str(llama_cpp_dir),
        str(merged_dir),
        "--outtype",
        outtype,
        "--outfile",
        str(outfile),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT)
    if result.returncode != 0 or not outfile.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise UserError(f"llama.cpp's converter failed on {merged_dir}:\n{tail}")


def quantize(llama_cpp_dir: Path, source: Path, target: Path, quant: str) -> None:
    binary = next(
        (
            p
            for p in (llama_cpp_dir / "build" / "bin" / "llama-quantize", llama_cpp_dir / "llama-quantize")
            if p.is_file()
        ),
        None,
    )
    if binary is not None:
        result = subprocess.run([str(binary), str(source), str(target), quant.upper()], capture_output=True, text=True)
        ok, detail = result.returncode == 0, result.stderr.strip().splitlines()[-1:] if result.stderr else []
    else:
        llama_cpp = import_llama_cpp()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, QUANT_TYPES[quant][0])
        params.nthread = os.cpu_count() or 1
        ok = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0
        detail = []
    if not ok or not target.is_file():
        raise UserError(f"llama.cpp could not quantize {source} to {quant}: {' '.join(detail)}")


def gguf_contents(path: Path) -> dict:
    """Metadata and tensor types as written in the file."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(key):
        return reader.fields[key].contents() if key in reader.fields else None

    tensors = {t.name: (t.tensor_type.name, len([d for d in t.shape if d > 1])) for t in reader.tensors}
    return {
        "chat_template": field("tokenizer.chat_template"),
        "eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "add_bos": field("tokenizer.ggml.add_bos_token"),
        "pre_tokenizer": field("tokenizer.ggml.pre"),
        "architecture": field("general.architecture"),
        "tensors": tensors,
    }


# 2-D tensors llama.cpp's quantizer keeps in their type by design (llama-quant.cpp): learned position embeddings
# (GPT-2) and BERT's token types. Not a fallback.
NEVER_QUANTIZED = {"position_embd.weight", "token_types.weight"}


def fallback_tensors(tensors: dict, quant: str) -> dict:
    """2-D weights a quantization left in another type than it promises."""
    expected = QUANT_TYPES[quant][1]
    return {
        name: kind
        for name, (kind, dims) in tensors.items()
        if dims >= 2 and kind not in expected and name not in NEVER_QUANTIZED
    }


def _llama(path: Path, n_ctx: int = 512):
    return import_llama_cpp().Llama(
        str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=os.cpu_count() or 1
    )


def llama_logits(llm, token_lists: list[list[int]]):
    import numpy as np
    import torch

    out = []
    for ids in token_lists:
        llm.reset()
        llm.eval(ids)
        out.append(torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32)))
    return out


def _reference_dtype(merged_dir: Path) -> str:
    """float32 when an fp32 copy fits in half the free memory (32B does not: bf16 then)."""
    import psutil

    weights = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors"))
    return "float32" if weights * 2 < psutil.virtual_memory().available / 2 else "bfloat16"


def check_chat(llm, tokenizer, gguf_meta: dict) -> dict:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "user", "content": PARITY_TEXTS[0]}]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    rendered = Jinja2ChatFormatter(
        template=gguf_meta["chat_template"], eos_token=tokenizer.eos_token or "", bos_token=tokenizer.bos_token or ""
    )(messages=messages).prompt
    reply = llm.create_chat_completion(messages=messages, max_tokens=256, temperature=0.0)
    choice = reply["choices"][0]
    return {
        "template_renders_identically": rendered == expected,
        "finish_reason": choice["finish_reason"],
        "stops_at_eos": choice["finish_reason"] == "stop",
        "completion_tokens": reply["usage"]["completion_tokens"],
        "reply": choice["message"]["content"][:300],
    }


def _check_inputs(merged_dir: Path, types: list[str]) -> None:
    if not (merged_dir / "config.json").is_file():
        raise UserError(
            f"{merged_dir} is not a merged model folder (no config.json); run `python -m train merge` first"
        )
    unknown = [t for t in types if t not in FLOAT_TYPES and t not in QUANT_TYPES]
    if unknown or not types:
        raise UserError(
            f"--gguf {','.join(unknown) or '(empty)'}: choose from {', '.join([*FLOAT_TYPES, *QUANT_TYPES])}"
        )


def _write_files(llama_dir: Path, merged_dir: Path, tmp: Path, name: str, types: list[str]) -> tuple[str, dict]:
    """The 16-bit GGUF (llama.cpp's converter), then each quantization of it: (float type, {type: file})."""
    float_type = next((t for t in types if t in FLOAT_TYPES), "f16")
    float_file = tmp / f"{name}-{float_type}.gguf"
    log.info("converting %s to %s with %s", merged_dir, float_file.name, llama_dir)
    convert(llama_dir, merged_dir, FLOAT_TYPES[float_type], float_file)
    files = {float_type: float_file}
    for quant in (t for t in types if t in QUANT_TYPES):
        files[quant] = tmp / f"{name}-{quant}.gguf"
        log.info("quantizing to %s", files[quant].name)
        quantize(llama_dir, float_file, files[quant], quant)
    return float_type, files


def ollama_modelfile(path: Path, tokenizer, merged_dir: Path) -> dict:
    """The Modelfile beside a GGUF file, its sampling defaults from the merged model's generation_config.json."""
    config = merged_dir / "generation_config.json"
    generation = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    meta = gguf_contents(path)
    # Ollama adds BOS itself only where the file says so; otherwise the Go template writes it, as the Jinja does.
    bos = "" if meta["add_bos"] else (tokenizer.bos_token or "")
    return write_modelfile(path, meta["chat_template"], bos, tokenizer.eos_token or "", generation)


def check_file(kind: str, path: Path, tokenizer, token_lists: list, merged_logits: list, ref_dtype: str) -> dict:
    """Every parity check of one GGUF file; `failures` lists the checks it failed."""
    from transformers import AutoModelForCausalLM

    from train.models.loading import torch_dtype

    meta = gguf_contents(path)
    llm = _llama(path)
    ids_llama = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in TOKENIZER_TEXTS]
    mismatched = [t for t, a, b in zip(TOKENIZER_TEXTS, ids_llama, token_lists, strict=True) if a[:128] != b]
    logits = llama_logits(llm, token_lists)
    entry = {
        "bytes": path.stat().st_size,
        "tensor_types": dict(Counter(k for k, _ in meta["tensors"].values())),
        "pre_tokenizer": meta["pre_tokenizer"],
        "tokenization_identical": not mismatched,
        "tokenization_mismatches": mismatched,
        "chat_template_in_metadata": meta["chat_template"] == tokenizer.chat_template,
        "eos_in_metadata": meta["eos_token_id"] == tokenizer.eos_token_id,
        "vs_merged": compare_logits(merged_logits, logits),
    }
    if kind in QUANT_TYPES:
        same_file = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch_dtype(ref_dtype)
        ).eval()
        entry["vs_transformers_same_file"] = compare_logits(token_logits(same_file, token_lists), logits)
        del same_file
        entry["fallback_tensors"] = fallback_tensors(meta["tensors"], kind)
        if entry["fallback_tensors"]:
            log.warning(
                "%s: %d tensors were not written as %s but as %s (rows not a multiple of 256?)",
                kind,
                len(entry["fallback_tensors"]),
                "/".join(sorted(QUANT_TYPES[kind][1])),
                dict(Counter(entry["fallback_tensors"].values())),
            )
        checked, (rel, agree) = entry["vs_transformers_same_file"], TOLERANCE["quant_same_file"]
    else:
        checked, (rel, agree) = entry["vs_merged"], TOLERANCE["float"]
    entry["chat"] = check_chat(llm, tokenizer, meta) if meta["chat_template"] else None
    del llm
    entry["within_tolerance"] = checked["relative_diff"] <= rel and checked["argmax_agreement"] >= agree
    failures = [
        f"{kind}: {check} failed"
        for check in ("tokenization_identical", "chat_template_in_metadata", "eos_in_metadata", "within_tolerance")
        if not entry[check]
    ]
    if entry["chat"] and not entry["chat"]["template_renders_identically"]:
        failures.append(f"{kind}: llama.cpp renders the chat template differently from transformers")
    log.info(
        "%s: %.1f MB, logits vs %s max diff %.4f (%.2f%%), argmax agreement %.3f, chat stops at EOS: %s",
        path.name,
        entry["bytes"] / 1e6,
        "same file in transformers" if kind in QUANT_TYPES else "merged",
        checked["max_abs_diff"],
        100 * checked["relative_diff"],
        checked["argmax_agreement"],
        entry["chat"] and entry["chat"]["stops_at_eos"],
    )
    return {"type": kind, **entry, "failures": failures}


def export_gguf(
    merged_dir: str | Path,
    types: list[str],
    out: str | Path | None = None,
    llama_cpp_dir: str | None = None,
    keep_intermediate: bool = False,
) -> dict:
    """Write the requested GGUF files into `out` (default MERGED_DIR/gguf) and return the report."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from train.models.loading import torch_dtype

    merged_dir = Path(merged_dir).resolve()
    _check_inputs(merged_dir, types)
    out = Path(out).resolve() if out else merged_dir / "gguf"
    check_output_dir(out, EXPORT_REPORT)
    claim_tmp(out, EXPORT_REPORT)
    llama_dir = find_llama_cpp(llama_cpp_dir)
    import_llama_cpp()  # fail before converting when the checks cannot run
    merge_file = merged_dir / MERGE_REPORT
    merge_report = json.loads(merge_file.read_text(encoding="utf-8")) if merge_file.is_file() else {}
    name = Path(merge_report["lineage"][-1]).name if merge_report.get("lineage") else merged_dir.name
    tmp = fresh_tmp(out, EXPORT_REPORT)

    # The reference: transformers on the merged weights, before any GGUF exists.
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    token_lists = [tokenizer(t, add_special_tokens=False)["input_ids"][:128] for t in TOKENIZER_TEXTS]
    ref_dtype = _reference_dtype(merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch_dtype(ref_dtype)).eval()
    merged_logits = token_logits(merged, token_lists)
    del merged

    float_type, files = _write_files(llama_dir, merged_dir, tmp, name, types)
    report: dict = {
        "merged_dir": str(merged_dir),
        "llama_cpp": str(llama_dir),
        "reference_dtype": ref_dtype,
        "tolerance": TOLERANCE,
        "files": {},
    }
    for kind, path in files.items():
        if kind in types or keep_intermediate:
            report["files"][path.name] = check_file(kind, path, tokenizer, token_lists, merged_logits, ref_dtype)
            report["files"][path.name]["ollama"] = ollama_modelfile(path, tokenizer, merged_dir)
    if float_type not in types and not keep_intermediate:
        files[float_type].unlink()
    report["failures"] = [f for entry in report["files"].values() for f in entry.pop("failures")]
    write_json(tmp / EXPORT_REPORT, report)
    if report["failures"]:
        raise UserError(f"GGUF parity failed ({'; '.join(report['failures'])}); files and report left in {tmp}")
    lineage = [Path(p) for p in merge_report.get("lineage", [])]
    if lineage:
        write_model_card(tmp, lineage, {"merge": merge_report, "export": report}, gguf_files=list(report["files"]))
    replace_output(tmp, out)
    report["out"] = str(out)
    return report


def format_export(report: dict) -> str:
    header = f"{'file':<34}{'MB':>8}{'max diff':>10}{'rel':>8}{'argmax':>8}{'tok ok':>8}{'EOS stop':>9}  tensor types"
    lines = [header, "-" * len(header)]
    for name, e in report["files"].items():
        checked = e.get("vs_transformers_same_file") or e["vs_merged"]
        stop = e["chat"]["stops_at_eos"] if e.get("chat") else None
        lines.append(
            f"{name:<34}{e['bytes'] / 1e6:>8.2f}{checked['max_abs_diff']:>10.4f}{checked['relative_diff']:>8.4f}"
            f"{checked['argmax_agreement']:>8.3f}{e['tokenization_identical']!s:>8}{stop!s:>9}  "
            f"{e['tensor_types']}" + (f"  FALLBACK {len(e['fallback_tensors'])}" if e.get("fallback_tensors") else "")
        )
    return (
        "\n".join(lines) + "\n(max diff: 16-bit files vs transformers on the merged weights; quantized files vs "
        f"transformers reading the same file)\nGGUF files, an Ollama Modelfile beside each, and export_report.json in "
        f"{report['out']}\n"
    )
