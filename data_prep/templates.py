"""Render a canonical record into (prompt, completion) text and token ids with a loss mask; a conversation
into token ids whose mask covers exactly its trained assistant turns (render_conversation).

The prompt comes from the stage's template (train/core/formats.py: `reasoning` or the tokenizer's
`chat` template); the completion is `<think>\n{reasoning}\n</think>\n{answer}` and EOS.

The prompt and the completion are tokenized separately and concatenated. The prompt's ids are
then exactly what the model is given at inference (prompt alone, as `generate` tokenizes it),
and a BPE merge across the boundary cannot move the mask: every prompt id is masked, every
completion id through EOS is trained. (TRL's own prompt+completion tokenization re-tokenizes the
joined text and moves the boundary to the common prefix instead.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from data_prep.schemas import Record, Turn
from train.core.errors import UserError
from train.core.formats import THINK_CLOSE, THINK_OPEN, reasoning_chat_template, render_prompt


@dataclass
class Rendered:
    prompt: str
    completion: str  # text, without the EOS token
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with EOS
    # A conversation trained on every assistant turn: token counts of alternating untrained/trained pieces
    # over input_ids, starting untrained (prompt_ids is the first piece). None: [prompt, completion].
    runs: list[int] | None = None

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def mask_runs(self) -> list[int]:
        return self.runs if self.runs is not None else [len(self.prompt_ids), len(self.completion_ids)]

    @property
    def completion_mask(self) -> list[int]:
        return [i % 2 for i, n in enumerate(self.mask_runs) for _ in range(n)]


def completion_body(answer: str, reasoning: str | None, empty_think: bool) -> str:
    """What the model is trained to write: its think block (empty with empty_think when there is no reasoning),
    then the answer."""
    if reasoning is not None:
        return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{answer}"
    return f"{THINK_OPEN}\n\n{THINK_CLOSE}\n{answer}" if empty_think else answer


def after_prompt(prompt: str, body: str) -> str:
    """`body` as it continues `prompt`: R1's chat template already opens the think block in the generation prompt."""
    if prompt.endswith(f"{THINK_OPEN}\n") and body.startswith(f"{THINK_OPEN}\n"):
        return body[len(THINK_OPEN) + 1 :]
    return body


def render_completion(record: Record, prompt: str, empty_think: bool) -> str:
    return after_prompt(prompt, completion_body(record.answer, record.reasoning, empty_think))


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


# --- conversations (schemas messages, sharegpt) -------------------------------------------------------------


def conversation_template(template: str, system_prompt: str, tokenizer) -> str:
    """The Jinja chat template conversations are rendered with: for `reasoning`, the very template merge and
    export write into the model (train.core.formats.reasoning_chat_template), so the multi-turn text trained on
    and the one served cannot drift; for `chat`, the tokenizer's own."""
    if template == "reasoning":
        return reasoning_chat_template(system_prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"data.template is 'chat' but tokenizer '{tokenizer.name_or_path}' has no chat template; "
            "use data.template: reasoning"
        )
    return tokenizer.chat_template


def _render(tokenizer, chat_template: str, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=generation
    )


def resolve_multi_turn(mode: str, template: str, chat_template: str, tokenizer) -> str:
    """`auto`: expand where the history a model sees at inference differs from what it was trained to write,
    i.e. reasoning models (the reasoning template; chat templates whose generation prompt opens <think>, as
    R1's and Qwen3's do: clients send earlier answers back without their think block); all_turns otherwise."""
    if mode != "auto":
        return mode
    if template == "reasoning":
        return "expand"
    probe = _render(tokenizer, chat_template, [{"role": "user", "content": "?"}], True)
    return "expand" if probe.rstrip().endswith(THINK_OPEN) else "all_turns"


def _assistant_text(turn: Turn, trained: bool, empty_think: bool) -> str:
    """An assistant turn as the model writes it (trained: with its think block) or as a client sends it back
    in the history (the answer alone)."""
    return completion_body(turn.content, turn.reasoning, empty_think) if trained else turn.content


def _messages(record: Record, system: str, template: str, trained: set[int], empty_think: bool) -> list[dict]:
    messages = []
    if template == "chat" and system:  # the reasoning template carries the system text itself
        messages.append({"role": "system", "content": system})
    elif template == "reasoning" and record.system:
        messages.append({"role": "system", "content": record.system})
    for i, turn in enumerate(record.turns or ()):
        content = _assistant_text(turn, i in trained, empty_think) if turn.role == "assistant" else turn.content
        messages.append({"role": turn.role, "content": content})
    return messages


def _segments(tokenizer, chat_template: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: each assistant turn's own text (its content
    and what the template closes it with, EOS) is trained; everything else, its role header included, is not.

    Written by hand because the library route (apply_chat_template's return_assistant_tokens_mask) needs
    {% generation %} tags that most chat templates (R1-Distill's among them) do not have. Each piece is the
    difference between two renders of growing prefixes, so the pieces join to exactly the template's text."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, chat_template, messages[:i], True)
        after = _render(tokenizer, chat_template, messages[: i + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise UserError(
                "data.multi_turn: all_turns needs a chat template that renders an assistant turn in the history "
                "as its generation prompt followed by the answer; this one does not (its generation prompt "
                f"{before[len(done) :][-24:]!r} is not how a past answer starts: reasoning templates open or strip "
                "<think>); use data.multi_turn: expand"
            )
        pieces += [(before[len(done) :], False), (after[len(before) :], True)]
        done = after
    return pieces


def render_conversation(
    record: Record, template: str, system_prompt: str, empty_think: bool, tokenizer, chat_template: str
) -> Rendered:
    """One conversation as token ids with a loss mask over exactly its trained assistant turns.

    `record.train_last_only` (data.multi_turn expand): the history as a client sends it at inference (answers
    without their think block), rendered with the generation prompt, then the last assistant turn with its
    reasoning and EOS: tokenized as prompt and completion apart, exactly as single-turn rows are. Otherwise
    (all_turns) every assistant turn is trained, the history rendered as the template renders it."""
    turns = record.turns or ()
    system = record.system or system_prompt
    if record.train_last_only:
        messages = _messages(record, system, template, {len(turns) - 1}, empty_think)
        prompt = _render(tokenizer, chat_template, messages[:-1], True)
        return tokenize_pairs([prompt], [after_prompt(prompt, messages[-1]["content"])], tokenizer)[0]
    trained = {i for i, t in enumerate(turns) if t.role == "assistant"}
    pieces = _segments(tokenizer, chat_template, _messages(record, system, template, trained, empty_think))
    ids = tokenizer([text for text, _ in pieces], add_special_tokens=False, return_attention_mask=False)["input_ids"]
    runs = [len(i) for i in ids]
    first = ids[0]
    return Rendered(
        pieces[0][0], "".join(text for text, _ in pieces[1:]), first, [t for part in ids[1:] for t in part], runs
    )


def expand_turns(record: Record) -> list[Record]:
    """data.multi_turn expand: one record per assistant turn, its history before it (row ids `ROW#turnN`)."""
    turns = record.turns or ()
    out = []
    for i, turn in enumerate(turns):
        if turn.role == "assistant":
            out.append(
                replace(
                    record,
                    row_id=f"{record.row_id}#turn{i // 2 + 1}",
                    question=turns[i - 1].content,
                    answer=turn.content,
                    reasoning=turn.reasoning,
                    turns=turns[: i + 1],
                    train_last_only=True,
                )
            )
    return out


def drop_first_exchange(record: Record) -> Record | None:
    """The conversation without its earliest user/assistant pair (length policy truncate: whole turns from
    the front, never part of one); None when only the trained last exchange is left."""
    turns = record.turns or ()
    if len(turns) <= 2:
        return None
    return replace(record, turns=turns[2:])
