"""transformers generation from a stage (adapters merged into the 16-bit base) or a merged folder:
batched with left padding, each candidate with its total log-probability."""

from __future__ import annotations

from pathlib import Path

from train.core.config import DecodingConfig
from train.core.formats import render_prompt
from train.inference.targets import Target, stage_recipe
from train.models.lineage import read_stage, stage_chain, stage_weights
from train.models.loading import load_merged_16bit


def load_stage_model(stage_dir: str | Path, adapter: str | Path | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, recipe) of a finished stage, adapters merged into the 16-bit base (or its own model/).

    `adapter` replaces the stage's final weights (one of its checkpoints: an adapter, or a model folder for a full
    fine-tuning stage); ancestors stay. A stored
    recipe with model.trust_remote_code is refused unless `trust_remote_code` (the user's --trust-remote-code).
    """
    from transformers import AutoTokenizer

    stage_dir = Path(stage_dir)
    info = read_stage(stage_dir)
    recipe = stage_recipe(stage_dir, info, trust_remote_code)
    model = load_merged_16bit(stage_chain(stage_dir, adapter), recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(str(stage_weights(stage_dir)))
    model.eval()
    return model, tokenizer, recipe


def _token_logprobs_sum(model, out, input_len: int, eos_id: int, beams: bool):
    """Total log-probability of each generated sequence, up to and including its EOS."""
    import torch

    trans = model.compute_transition_scores(
        out.sequences, out.scores, getattr(out, "beam_indices", None) if beams else None, normalize_logits=not beams
    )
    generated = out.sequences[:, input_len:]
    keep = torch.ones_like(generated, dtype=torch.bool)
    for i, row in enumerate(generated):
        eos = (row == eos_id).nonzero()
        if len(eos):
            keep[i, int(eos[0]) + 1 :] = False
    trans = trans[:, : generated.shape[1]].masked_fill(~keep[:, : trans.shape[1]], 0.0)
    return trans.sum(-1).tolist()


class HFGenerator:
    """transformers generate(): stage folders (adapters merged in 16-bit) and merged folders."""

    def __init__(self, target: Target):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.recipe = None
        if target.kind == "stage":
            self.model, self.tokenizer, self.recipe = load_stage_model(
                target.path, adapter=target.adapter, trust_remote_code=target.trust_remote_code
            )
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(target.path), dtype="auto").eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(target.path))
        self.tokenizer.padding_side = "left"  # decoder-only batches pad on the left

    def render(self, question: str) -> str:
        if self.recipe is not None:
            return render_prompt(question, self.recipe.data.system_prompt, self.recipe.data.template, self.tokenizer)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return question

    def generate(self, prompts: list[str], dec: DecodingConfig, batch_size: int) -> list[list[tuple[str, float]]]:
        import torch
        from tqdm.auto import tqdm

        tok = self.tokenizer
        results: list[list[tuple[str, float]]] = []
        kwargs = {
            "max_new_tokens": dec.max_new_tokens,
            "num_beams": dec.num_beams,
            "do_sample": dec.do_sample,
            "num_return_sequences": dec.num_return_sequences,
            "repetition_penalty": dec.repetition_penalty,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "output_scores": True,
            "return_dict_in_generate": True,
        }
        if dec.num_beams > 1:
            kwargs.update(length_penalty=dec.length_penalty, early_stopping=True)
        if dec.do_sample:
            kwargs.update(temperature=dec.temperature, top_k=dec.top_k or None, top_p=dec.top_p)
        batches = range(0, len(prompts), batch_size)
        for start in tqdm(batches, desc=f"generate {dec.name}", disable=len(batches) < 2):
            batch = tok(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            )
            torch.manual_seed(dec.seed + start)
            with torch.no_grad():
                out = self.model.generate(**batch.to(self.model.device), **kwargs)
            input_len = batch["input_ids"].shape[1]
            logprobs = _token_logprobs_sum(self.model, out, input_len, tok.eos_token_id, dec.num_beams > 1)
            texts = tok.batch_decode(out.sequences[:, input_len:], skip_special_tokens=True)
            n = dec.num_return_sequences
            results.extend(
                list(zip(texts[i * n : (i + 1) * n], logprobs[i * n : (i + 1) * n], strict=True))
                for i in range(len(texts) // n)
            )
        return results
