"""Model cards (README.md) for merged and GGUF outputs, written from the stages' own records.

Everything comes from `stage.json`, each stage's data manifest and the merge/export reports, so a
card says what was really run. Nothing from the environment is read here (no tokens can leak).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from train.models.lineage import read_stage
from train.models.loading import resolve_model_path

CARD = "README.md"


def base_license(base_model: str) -> str | None:
    """The `license:` of the base model's own card, when the base is on disk."""
    try:
        card = Path(resolve_model_path(base_model)) / CARD
    except Exception:  # noqa: BLE001 - a Hub id not cached locally: no card to read
        return None
    if not card.is_file():
        return None
    match = re.match(r"---\n(.*?)\n---", card.read_text(encoding="utf-8"), re.DOTALL)
    if not match:
        return None
    meta = yaml.safe_load(match.group(1)) or {}
    return meta.get("license")


def _manifest(info: dict) -> dict:
    path = Path(info.get("data", {}).get("processed_dir") or "") / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _stage_section(stage_dir: Path) -> str:
    info = read_stage(stage_dir)
    recipe = info["recipe"]
    lora, training, data = recipe.get("lora", {}), recipe.get("training", {}), recipe.get("data", {})
    manifest = _manifest(info)
    metrics = info.get("metrics", {})
    sources = ", ".join(f"{s.get('name')} ({s.get('schema')}, {s.get('path')})" for s in data.get("sources", []))
    counts = {
        k: manifest[k]
        for k in (
            "raw_rows",
            "rejected",
            "duplicates_removed",
            "near_duplicates_removed",
            "contaminated_removed",
            "mixed_rows",
            "train_tokens",
        )
        if k in manifest
    }
    rows = [
        f"### {info['stage']}" + (f": {info.get('description')}" if info.get("description") else ""),
        "",
        f"- parent: {Path(info['parent']).name if info.get('parent') else 'none (starts from the base)'}",
        f"- data: {sources}; template `{data.get('template')}`; fingerprint `{info['data'].get('fingerprint')}`;"
        f" {info['data'].get('train_rows')} train / {info['data'].get('eval_rows')} eval rows"
        + (f"; counts {json.dumps(counts, ensure_ascii=False)}" if counts else ""),
        (
            f"- full fine-tuning (every weight trained) in {recipe.get('model', {}).get('dtype')}"
            if lora == "none"
            else f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
            f"targets {', '.join(lora.get('target_modules', []))}; quantization {info.get('quantization')}"
        ),
        f"- training: lr {training.get('learning_rate')} ({training.get('lr_scheduler_type')}), "
        f"epochs {training.get('num_train_epochs')}, micro-batch {training.get('per_device_train_batch_size')} x "
        f"accumulation {training.get('gradient_accumulation_steps')} x {metrics.get('world_size', 1)} processes, "
        f"seed {training.get('seed')}, max length {data.get('max_length')}",
        f"- metrics: train loss {metrics.get('train_loss_first')} -> {metrics.get('train_loss_last')}, "
        f"eval loss {metrics.get('eval_loss')}, {metrics.get('train_tokens')} tokens, "
        f"{metrics.get('global_steps')} steps",
        f"- recipe: `{info.get('recipe_path')}` (resolved copy in the stage folder's recipe.yaml); "
        f"git {info.get('git_commit')}",
    ]
    return "\n".join(rows)


def write_model_card(
    folder: Path, lineage: list[Path], report: dict, license_id: str | None = None, gguf_files: list[str] | None = None
) -> Path:
    """README.md in `folder`: base, every stage in order, parity figures, and how to run it."""
    last = read_stage(lineage[-1])
    base = last["base_model"]
    license_id = license_id or base_license(base) or "other"
    meta = {
        "license": license_id,
        "base_model": base,
        "language": ["ko", "en"],
        "tags": ["medical", "reasoning", "full-finetune" if last.get("finetune") == "full" else "lora", "merged"]
        + (["gguf"] if gguf_files else []),
        "library_name": "gguf" if gguf_files else "transformers",
    }
    title = f"{last['stage']} ({'GGUF' if gguf_files else 'merged 16-bit'})"
    if gguf_files:
        first = gguf_files[-1]
        usage = (
            f"```bash\nllama-cli -m {first} -cnv            # llama.cpp; chat template and EOS come from the file\n"
            f"python -m train serve {first}          # OpenAI-compatible server, <think> returned apart\n"
            f"ollama create {Path(first).stem} -f {Path(first).stem}.Modelfile   # Ollama: the Modelfile beside each file\n"
            f"```\n```python\nfrom llama_cpp import Llama\nllm = Llama('{first}', n_ctx=4096)\n"
            "print(llm.create_chat_completion([{'role': 'user', 'content': '흉통의 감별진단은?'}]))\n```"
        )
    else:
        usage = (
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "model = AutoModelForCausalLM.from_pretrained('.', dtype='auto')\n"
            "tokenizer = AutoTokenizer.from_pretrained('.')\n```"
        )
    license_note = (
        ""
        if license_id != "other"
        else ("\nThe base model's license could not be read here: check it before you publish (`--license`).\n")
    )
    text = "\n".join(
        [
            "---",
            yaml.safe_dump(meta, allow_unicode=True, sort_keys=False).strip(),
            "---",
            "",
            f"# {title}",
            "",
            f"Base model: `{base}`. Stages, oldest first, each merged in order into the base's 16-bit weights "
            "(a full fine-tuning stage replaces them):",
            "",
            *[_stage_section(d) + "\n" for d in lineage],
            "## Checks run when this was written",
            "",
            "```json",
            json.dumps(report, indent=2, ensure_ascii=False),
            "```",
            "",
            "## How to run it",
            "",
            usage,
            license_note,
        ]
    )
    path = folder / CARD
    path.write_text(text, encoding="utf-8")
    return path
