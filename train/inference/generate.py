"""Generate from a stage (base + its adapters), a merged model folder or a GGUF file.

    python -m train generate outputs/demo/stage2_korean --prompt "45세 남성이 흉통을 호소합니다. 진단은?"
    python -m train generate outputs/demo/merged --input questions.jsonl --out answers.jsonl --num-beams 3

Prompts are rendered with the stage's own template (or the merged model's chat template), batched
with left padding; `--input` reads `question` (or `prompt`) from each jsonl row.
"""

from __future__ import annotations

from pathlib import Path

from train.core.config import DecodingConfig
from train.inference.targets import Target, resolve_targets


def make_generator(target: Target):
    """llama.cpp for a GGUF file, transformers for anything else."""
    if target.kind == "gguf":
        from train.inference.llama_cpp import LlamaCppGenerator

        return LlamaCppGenerator(target)
    from train.inference.hf import HFGenerator

    return HFGenerator(target)


def generate_candidates(
    target: str | Path, questions: list[str], decoding=None, batch_size: int = 8, trust_remote_code: bool = False
):
    """(prompts, candidates): for each question its rendered prompt and [(completion, total log-prob), ...].

    `trust_remote_code`: the user's opt-in to a stage whose stored recipe asks for remote code."""
    (resolved,) = resolve_targets([str(target)], checkpoints=False, trust_remote_code=trust_remote_code)
    generator = make_generator(resolved)
    prompts = [generator.render(q) for q in questions]
    return prompts, generator.generate(prompts, decoding or DecodingConfig(), batch_size)


def generate(target: str | Path, questions: list[str], max_new_tokens: int = 128) -> list[str]:
    """Greedy completion of each question (the demo's generation step)."""
    _, candidates = generate_candidates(target, questions, DecodingConfig(max_new_tokens=max_new_tokens))
    return [c[0][0] for c in candidates]
