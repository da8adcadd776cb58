"""The client side of `train serve`, shared by the chat page, the load benchmark and the tests: the eval's
decoding settings as an OpenAI request, a streamed answer read back as reasoning and content, and waiting for a
server started in another process."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Iterator

from train.core.config import DecodingConfig

# The page's choices, each the DecodingConfig the eval would use (train/core/config.py).
STRATEGIES = ("greedy", "top-k", "top-p", "temperature", "beam")


def decoding_for(
    strategy: str,
    temperature: float = 0.7,
    top_k: int = 40,
    top_p: float = 0.9,
    num_beams: int = 3,
    max_new_tokens: int = 512,
) -> DecodingConfig:
    if strategy == "greedy":
        return DecodingConfig(name="greedy", max_new_tokens=max_new_tokens)
    if strategy == "beam":
        return DecodingConfig(name=f"beam{num_beams}", num_beams=num_beams, max_new_tokens=max_new_tokens)
    if strategy not in STRATEGIES:
        raise ValueError(f"decoding '{strategy}': choose from {', '.join(STRATEGIES)}")
    return DecodingConfig(
        name=strategy,
        do_sample=True,
        temperature=temperature,
        top_k=top_k if strategy == "top-k" else 0,
        top_p=top_p if strategy == "top-p" else 1.0,
        max_new_tokens=max_new_tokens,
    )


def request_params(dec: DecodingConfig) -> dict:
    """Keyword arguments for `client.chat.completions.create`: OpenAI's fields, plus `top_k` and beam search
    in `extra_body` (both servers read `top_k`; only vLLM has beam search, llama.cpp's answers 400)."""
    params: dict = {"max_tokens": dec.max_new_tokens, "temperature": dec.temperature if dec.do_sample else 0.0}
    extra: dict = {}
    if dec.do_sample and dec.top_p < 1.0:
        params["top_p"] = dec.top_p
    if dec.do_sample and dec.top_k > 0:
        extra["top_k"] = dec.top_k
    if dec.num_beams > 1:
        extra.update(use_beam_search=True, n=dec.num_beams, length_penalty=dec.length_penalty)
        params["temperature"] = 0.0
    if dec.repetition_penalty != 1.0:
        extra["repetition_penalty"] = dec.repetition_penalty
    if extra:
        params["extra_body"] = extra
    return params


def reasoning_of(delta_or_message) -> str | None:
    """The reasoning a server returned apart: `reasoning_content` (ours, DeepSeek's API) or `reasoning`
    (vLLM's name since it renamed the field)."""
    extra = getattr(delta_or_message, "model_extra", None) or {}
    return extra.get("reasoning_content") or extra.get("reasoning")


def stream_answer(client, model: str, messages: list[dict], dec: DecodingConfig) -> Iterator[tuple[str, str]]:
    """("reasoning" | "content", text) pieces as the server streams them; beam search (not streamable on
    vLLM) arrives as one piece of each."""
    params = request_params(dec)
    if dec.num_beams > 1:
        message = client.chat.completions.create(model=model, messages=messages, **params).choices[0].message
        if reasoning_of(message):
            yield "reasoning", reasoning_of(message)
        if message.content:
            yield "content", message.content
        return
    for chunk in client.chat.completions.create(model=model, messages=messages, stream=True, **params):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        reasoning = reasoning_of(delta)
        if reasoning:
            yield "reasoning", reasoning
        if delta.content:
            yield "content", delta.content


def wait_until_serving(url: str, process, headers: dict | None = None, timeout: float = 90.0) -> None:
    """Poll `url` until it answers 200; fail at once when `process` (the server's Popen) has exited, or after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{' '.join(map(str, process.args))} exited with {process.returncode} before {url} answered"
            )
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):  # not listening yet, or an error status while it starts
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
