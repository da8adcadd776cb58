"""An OpenAI-compatible server for a GGUF file: llama.cpp's server as llama-cpp-python ships it, with the
chat route replaced so that a reasoning model's `<think>` block comes back apart and bad requests get a 4xx.

    python -m train serve outputs/demo/merged/gguf/stage2_korean-q4_k_m.gguf [--host 127.0.0.1] [--port 8000]

From llama-cpp-python's server (`llama_cpp.server.app.create_app`): model loading, `/v1/models`,
`/v1/completions`, `/v1/embeddings`, the API-key check and the request lock. Replaced: `/v1/chat/completions`,
because its response model drops fields it does not know (the reasoning) and it neither refuses an unknown
model (it answers with the one it has) nor a negative `max_tokens` (which it reads as "until the context is
full"). Added: `POST /tokenize` in vLLM's shape (`{"messages": [...]}` -> `{"tokens", "count", "prompt"}`), so
a test can check that the server prompts exactly as training did, on either backend.

The chat template is the one in the GGUF's metadata (`tokenizer.chat_template`, written by `train export`
from the stage's tokenizer), rendered by llama-cpp-python's Jinja2 formatter; its own guess of a built-in
format from the template is switched off. llama.cpp serves one request at a time; the others wait their turn
(`interrupt_requests` off, so a new request never cuts a running stream short).
"""

import contextlib
import json
import os
from functools import partial
from pathlib import Path

from train.core.errors import UserError
from train.core.formats import THINK_CLOSE, THINK_OPEN
from train.core.log import get_logger
from train.serve.reasoning import CONTENT, ReasoningSplitter, split_reasoning

log = get_logger(__name__)

SERVE_PACKAGES = "fastapi, uvicorn, sse-starlette, starlette-context, pydantic-settings"


def import_server():
    """llama-cpp-python's server module, or one line saying how to install it."""
    try:
        import llama_cpp.server.app as server_app
    except ImportError as exc:
        raise UserError(
            f"serving a GGUF file needs llama-cpp-python's server ({SERVE_PACKAGES}): run `make install-serve` "
            f"(missing: {exc.name})"
        ) from None
    return server_app


def _error(status: int, message: str, code: str | None = None, param: str | None = None):
    from fastapi.responses import JSONResponse

    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return JSONResponse(status_code=status, content=body)


class ChatModel:
    """What the routes need to know about the served model, read once from the GGUF (vocabulary only)."""

    def __init__(self, path: Path, name: str, n_ctx: int):
        import llama_cpp

        from train.inference.llama_cpp import gguf_chat_formatter

        vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        self.name, self.n_ctx = name, n_ctx
        self.formatter = gguf_chat_formatter(vocab)
        self._tokenize = partial(vocab.tokenize, add_bos=False, special=True)
        # A reasoning model: </think> is one token of its vocabulary, or its generation prompt opens a block.
        self.opens_think = bool(self.formatter) and self.render([{"role": "user", "content": "?"}]).rstrip().endswith(
            THINK_OPEN
        )
        self.reasoning = self.opens_think or len(self._tokenize(THINK_CLOSE.encode())) == 1

    def render(self, messages: list[dict]) -> str:
        if self.formatter is None:
            raise UserError("this GGUF file has no chat template (tokenizer.chat_template); re-export it")
        return self.formatter(messages=messages).prompt

    def tokens(self, messages: list[dict]) -> tuple[str, list[int]]:
        prompt = self.render(messages)
        return prompt, self._tokenize(prompt.encode())


def _check_request(model: ChatModel, raw: dict, body) -> tuple | None:
    """A 4xx response for a request this server cannot answer as asked, else None."""
    if body.model not in (None, "", model.name):
        return 404, f"model '{body.model}' is not served here; this server serves '{model.name}'", "model_not_found"
    if not body.messages:
        return 400, "messages: give at least one message", None
    if body.max_tokens is not None and body.max_tokens < 1:
        return 400, f"max_tokens must be at least 1 (got {body.max_tokens})", None
    if (raw.get("n") or 1) != 1:
        return 400, "n: llama.cpp returns one choice per request; send several requests", None
    if raw.get("use_beam_search"):
        return 400, "llama.cpp (GGUF) has no beam search; serve the merged folder with vLLM for beams", None
    return None


def _stream(chunks, name: str, splitter: ReasoningSplitter | None):
    """llama-cpp-python's chat chunks under the served name, the think block moved to `reasoning_content`
    deltas when `splitter` is given."""

    def piece(chunk, field, text):
        delta = {"content": text} if field == CONTENT else {"reasoning_content": text, "reasoning": text}
        return {**chunk, "choices": [{**chunk["choices"][0], "delta": delta, "finish_reason": None}]}

    for chunk in chunks:
        chunk = {**chunk, "model": name}
        choice = chunk["choices"][0]
        text = choice["delta"].get("content")
        finished = choice.get("finish_reason") is not None
        if splitter is None or not (text or finished):
            yield chunk
            continue
        if text:
            yield from (piece(chunk, f, t) for f, t in splitter.feed(text))
        if finished:
            yield from (piece(chunk, f, t) for f, t in splitter.finish())
            yield {**chunk, "choices": [{**choice, "delta": {}}]}


def build_app(gguf: Path, name: str, n_ctx: int = 4096, threads: int | None = None, api_key: str | None = None):
    server_app = import_server()
    import anyio
    from fastapi import Depends, Request
    from fastapi.exceptions import RequestValidationError
    from llama_cpp.server.settings import ModelSettings, ServerSettings
    from llama_cpp.server.types import CreateChatCompletionRequest
    from sse_starlette.sse import EventSourceResponse
    from starlette.concurrency import run_in_threadpool

    model = ChatModel(gguf, name, n_ctx)
    settings = ModelSettings(
        model=str(gguf),
        model_alias=name,
        n_ctx=n_ctx,
        n_threads=threads or os.cpu_count() or 1,
        chat_format="chat_template.default" if model.formatter else None,
        verbose=False,
    )
    app = server_app.create_app(
        server_settings=ServerSettings(api_key=api_key, interrupt_requests=False), model_settings=[settings]
    )
    auth = [Depends(server_app.authenticate)]
    locked = contextlib.asynccontextmanager(server_app.get_llama_proxy)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request, exc):  # FastAPI answers 422 with its own shape; clients expect OpenAI's 400
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return _error(400, f"the request body is not valid JSON (at character {first['loc'][-1]})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error(400, f"invalid request body at {where}: {first.get('msg', 'not valid')}")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat(request: Request, body: CreateChatCompletionRequest):
        raw = await request.json()
        refused = _check_request(model, raw, body)
        if refused:
            return _error(refused[0], refused[1], code=refused[2])
        try:
            _, ids = await run_in_threadpool(model.tokens, raw["messages"])
        except Exception as exc:  # noqa: BLE001 - the template's own message (raise_exception, bad roles) is the answer
            return _error(400, f"messages: the chat template refused them: {exc}", param="messages")
        wanted = len(ids) + (body.max_tokens or 1)
        if wanted > model.n_ctx:
            return _error(
                400,
                f"the prompt is {len(ids)} tokens and max_tokens {body.max_tokens}: together over this server's "
                f"context of {model.n_ctx} (--n-ctx); shorten the messages or max_tokens",
                code="context_length_exceeded",
                param="messages",
            )
        kwargs = body.model_dump(exclude={"n", "logit_bias_type", "user", "min_tokens"})
        if body.stream:
            send, recv = anyio.create_memory_object_stream(10)

            def call(llama, **kw):
                splitter = ReasoningSplitter(model.opens_think) if model.reasoning else None
                return _stream(llama.create_chat_completion(**kw), model.name, splitter)

            publisher = partial(
                server_app.get_event_publisher, request=request, inner_send_chan=send, body=body,
                body_model=body.model, llama_call=call, kwargs=kwargs,
            )  # fmt: skip
            return EventSourceResponse(recv, data_sender_callable=publisher, sep="\n")
        async with locked() as proxy:
            llama = server_app.prepare_request_resources(body, proxy, body.model, kwargs)
            result = await run_in_threadpool(llama.create_chat_completion, **kwargs)
        result["model"] = model.name
        if model.reasoning:
            for choice in result["choices"]:
                reasoning, content = split_reasoning(choice["message"].get("content") or "", model.opens_think)
                choice["message"].update(content=content, reasoning_content=reasoning, reasoning=reasoning)
        return result

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request):
        try:
            raw = await request.json()
            messages = raw["messages"]
            prompt, ids = model.tokens(messages)
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            return _error(400, f'give {{"messages": [{{"role": ..., "content": ...}}]}} ({exc})')
        return {"tokens": ids, "count": len(ids), "max_model_len": model.n_ctx, "prompt": prompt}

    # Ours first: the library's routes sit in one included router, matched in order, so putting these ahead is
    # how its chat route is replaced without editing its module.
    ours = [r for r in app.router.routes if getattr(r, "endpoint", None) in (chat, tokenize)]
    app.router.routes[:] = ours + [r for r in app.router.routes if r not in ours]
    return app


def serve_gguf(gguf: Path, host: str, port: int, name: str, n_ctx: int, threads: int | None, api_key: str | None):
    import uvicorn

    app = build_app(gguf, name, n_ctx, threads, api_key)
    log.info(
        "serving %s as '%s' on http://%s:%d/v1 (llama.cpp, one request at a time, context %d)%s",
        gguf.name, name, host, port, n_ctx, "; API key required" if api_key else "",
    )  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="warning")
