"""A reasoning model's `<think>` block returned apart from its answer, as vLLM's `deepseek_r1` reasoning
parser returns it, for servers that have no such parser (llama.cpp's, through llama-cpp-python 0.3.36).

Written by hand because llama-cpp-python has no reasoning split and vLLM's parser needs vLLM's tokenizer
and request classes. The rules follow vLLM's parser, with one difference that matters for stages trained
on the `reasoning` template: an answer is reasoning only when the model is inside a think block, i.e. the
generation prompt opened one (R1's chat template ends with `<think>\\n`) or the output starts with
`<think>`. A model that answers without thinking keeps its answer as content, where vLLM would move all of
it to the reasoning. Whitespace around the tags is dropped, so the fields read as the text between them.

Streamed and whole outputs split the same way: `ReasoningSplitter.feed` holds back only what could still be
the start of a tag (or trailing whitespace of the reasoning), so the streamed pieces join to the same
reasoning and content as `split_reasoning` gives for the joined text.
"""

from __future__ import annotations

from train.core.formats import THINK_CLOSE, THINK_OPEN

REASONING, CONTENT = "reasoning", "content"


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Feed generated text piece by piece; get (field, text) pieces back, field being reasoning or content."""

    def __init__(self, opened: bool):
        self.state = REASONING if opened else "start"
        self.buffer = ""
        self.started = {REASONING: False, CONTENT: False}  # leading whitespace of a field is dropped

    def _emit(self, field: str, text: str) -> list[tuple[str, str]]:
        if not self.started[field]:
            text = text.lstrip()
            if not text:
                return []
            self.started[field] = True
        return [(field, text)] if text else []

    def feed(self, piece: str) -> list[tuple[str, str]]:
        self.buffer += piece
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "start":
                head = self.buffer.lstrip()
                if head.startswith(THINK_OPEN):
                    self.buffer, self.state = head[len(THINK_OPEN) :], REASONING
                    continue
                if THINK_OPEN.startswith(head):  # empty, or could still become <think>
                    return out
                self.state = CONTENT
                continue
            if self.state == REASONING:
                end = self.buffer.find(THINK_CLOSE)
                if end >= 0:
                    out += self._emit(REASONING, self.buffer[:end].rstrip())
                    self.buffer, self.state = self.buffer[end + len(THINK_CLOSE) :], CONTENT
                    continue
                keep = _partial_tag(self.buffer, THINK_CLOSE)
                text = self.buffer[: len(self.buffer) - keep]
                safe = text.rstrip()  # trailing whitespace waits: it is dropped if </think> follows
                out += self._emit(REASONING, safe)
                self.buffer = self.buffer[len(safe) :]
                return out
            out += self._emit(CONTENT, self.buffer)
            self.buffer = ""
            return out

    def finish(self) -> list[tuple[str, str]]:
        """What is left when generation ends: an unclosed think block stays reasoning (as in vLLM)."""
        field = REASONING if self.state == REASONING else CONTENT
        text, self.buffer = self.buffer, ""
        return self._emit(field, text.rstrip() if field == REASONING else text)


def split_reasoning(text: str, opened: bool) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output; None where a field is empty."""
    splitter = ReasoningSplitter(opened)
    parts = {REASONING: "", CONTENT: ""}
    for field, piece in [*splitter.feed(text), *splitter.finish()]:
        parts[field] += piece
    return parts[REASONING] or None, parts[CONTENT] or None
