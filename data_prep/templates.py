"""Render a canonical record into (prompt, completion) text and token ids with a loss mask.

The prompt comes from the stage's template (train/core/formats.py: `reasoning` or the tokenizer's
`chat` template); the completion is `<think>\n{reasoning}\n</think>\n{answer}` and EOS.

The prompt and the completion are tokenized separately and concatenated. The prompt's ids are
then exactly what the model is given at inference (prompt alone, as `generate` tokenizes it),
and a BPE merge across the boundary cannot move the mask: every prompt id is masked, every
completion id through EOS is trained. (TRL's own prompt+completion tokenization re-tokenizes the
joined text and moves the boundary to the common prefix instead.)
"""

from __future__ import annotations

from dataclasses import dataclass

from data_prep.schemas import Record
from train.core.errors import UserError
from train.core.formats import THINK_CLOSE, THINK_OPEN, render_prompt


@dataclass
class Rendered:
    prompt: str
    completion: str  # text, without the EOS token
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with EOS

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def completion_mask(self) -> list[int]:
        return [0] * len(self.prompt_ids) + [1] * len(self.completion_ids)


def render_completion(record: Record, prompt: str, empty_think: bool) -> str:
    if record.reasoning is not None:
        body = f"{THINK_OPEN}\n{record.reasoning}\n{THINK_CLOSE}\n{record.answer}"
    elif empty_think:
        body = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n{record.answer}"
    else:
        body = record.answer
    # R1's chat template already opens the think block in the generation prompt.
    if prompt.endswith(f"{THINK_OPEN}\n") and body.startswith(f"{THINK_OPEN}\n"):
        body = body[len(THINK_OPEN) + 1 :]
    return body


def render_texts(records: list[Record], template: str, system_prompt: str, empty_think: bool, tokenizer):
    prompts = [render_prompt(r.question, r.system or system_prompt, template, tokenizer) for r in records]
    completions = [render_completion(r, p, empty_think) for r, p in zip(records, prompts, strict=True)]
    return prompts, completions


def tokenize_pairs(prompts: list[str], completions: list[str], tokenizer, chunk_size: int = 4096) -> list[Rendered]:
    """Batched tokenization (the fast tokenizer runs each batch in parallel in Rust)."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer '{tokenizer.name_or_path}' has no EOS token; training needs one")
    eos = tokenizer.eos_token_id
    out: list[Rendered] = []
    # Chunks bound memory: a batch call keeps every Encoding (offsets, masks) alive until it returns.
    for start in range(0, len(prompts), chunk_size):
        p_chunk, c_chunk = prompts[start : start + chunk_size], completions[start : start + chunk_size]
        # Only the ids: an attention mask would be one more Python int list per row, all ones.
        prompt_ids = tokenizer(p_chunk, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        completion_ids = tokenizer(c_chunk, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        out.extend(
            Rendered(p, c, pi, ci + [eos])
            for p, c, pi, ci in zip(p_chunk, c_chunk, prompt_ids, completion_ids, strict=True)
        )
    return out
