"""Generate from a trained stage (its base, every ancestor's adapter and its own, merged).

    python -m train generate outputs/demo/stage2_korean --prompt "45세 남성이 흉통을 호소합니다. 진단은?"
"""

from __future__ import annotations

from pathlib import Path

from data_prep.templates import render_prompt
from train.config import recipe_from_dict
from train.errors import UserError
from train.model import ADAPTER_DIR, adapter_chain, load_merged_16bit, read_stage


def load_stage_model(stage_dir: str | Path):
    """(model, tokenizer, recipe) of a finished stage, adapters merged into the 16-bit base."""
    from transformers import AutoTokenizer

    stage_dir = Path(stage_dir)
    info = read_stage(stage_dir)
    recipe = recipe_from_dict(info["recipe"], origin=str(stage_dir / "stage.json"))
    adapters = adapter_chain(info.get("parent")) + [stage_dir / ADAPTER_DIR]
    if not (stage_dir / ADAPTER_DIR / "adapter_config.json").is_file():
        raise UserError(f"{stage_dir} has no trained adapter in {ADAPTER_DIR}/")
    model = load_merged_16bit(info["base_model"], adapters, recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(str(stage_dir / ADAPTER_DIR))
    model.eval()
    return model, tokenizer, recipe


def generate(stage_dir: str | Path, prompts: list[str], max_new_tokens: int = 128) -> list[str]:
    """Greedy completions for each question, rendered with the stage's own template."""
    import torch

    model, tokenizer, recipe = load_stage_model(stage_dir)
    tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
    texts = [render_prompt(p, recipe.data.system_prompt, recipe.data.template, tokenizer) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    new_tokens = output[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]
