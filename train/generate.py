"""Generate from a stage (base + its adapters), a merged model folder or a GGUF file.

    python -m train generate outputs/demo/stage2_korean --prompt "45세 남성이 흉통을 호소합니다. 진단은?"
    python -m train generate outputs/demo/merged --input questions.jsonl --out answers.jsonl --num-beams 3

Prompts are rendered with the stage's own template (or the merged model's chat template), batched
with left padding; `--input` reads `question` (or `prompt`) from each jsonl row.
"""

from __future__ import annotations

from pathlib import Path

from train.config import recipe_from_dict
from train.errors import UserError
from train.model import ADAPTER_DIR, adapter_chain, load_merged_16bit, read_stage


def load_stage_model(stage_dir: str | Path, adapter: str | Path | None = None):
    """(model, tokenizer, recipe) of a finished stage, adapters merged into the 16-bit base.

    `adapter` replaces the stage's final adapter (e.g. one of its checkpoints); ancestors stay.
    """
    from transformers import AutoTokenizer

    stage_dir = Path(stage_dir)
    info = read_stage(stage_dir)
    recipe = recipe_from_dict(info["recipe"], origin=str(stage_dir / "stage.json"))
    own = Path(adapter) if adapter else stage_dir / ADAPTER_DIR
    if not (own / "adapter_config.json").is_file():
        raise UserError(f"{own} holds no trained adapter (adapter_config.json missing)")
    model = load_merged_16bit(info["base_model"], adapter_chain(info.get("parent")) + [own], recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(str(stage_dir / ADAPTER_DIR))
    model.eval()
    return model, tokenizer, recipe


def generate_candidates(target: str | Path, questions: list[str], decoding=None, batch_size: int = 8):
    """(prompts, candidates): for each question its rendered prompt and [(completion, total log-prob), ...]."""
    from train.config import DecodingConfig
    from train.evaluation import make_generator, resolve_targets

    (resolved,) = resolve_targets([str(target)], checkpoints=False)
    generator = make_generator(resolved)
    prompts = [generator.render(q) for q in questions]
    return prompts, generator.generate(prompts, decoding or DecodingConfig(), batch_size)


def generate(target: str | Path, questions: list[str], max_new_tokens: int = 128) -> list[str]:
    """Greedy completion of each question (the demo's generation step)."""
    from train.config import DecodingConfig

    _, candidates = generate_candidates(target, questions, DecodingConfig(max_new_tokens=max_new_tokens))
    return [c[0][0] for c in candidates]
