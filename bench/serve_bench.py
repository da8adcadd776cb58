"""Load on `train serve`: N concurrent streaming chat clients for a fixed time against a GGUF server.

    make bench-serve                      # after `make demo`: the demo's q4_k_m file, 16 clients, 60 s
    python -m bench.serve_bench --gguf FILE --clients 16 --seconds 60 --max-tokens 64

The server runs in its own process (`python -m train serve FILE`), the clients are `openai.AsyncOpenAI` streams
from this one. Each client asks a Korean medical question, reads the stream to the end, and asks again until
the time is up; a request still running then is finished and counted. Measured: requests, errors (any
exception or non-200), time to first token (first reasoning or content piece) and whole-request latency
(p50/p95), generated tokens per second over the run (a streamed piece is one token: llama.cpp sends one per
token), and the server's RSS before and after. llama.cpp answers one request at a time, so time to first token
includes the wait in the queue: with 16 clients, p50 TTFT is about 15 requests' worth of generation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import free_port, rss_mb, write_results
from train.serve.client import reasoning_of, wait_until_serving

REPO = Path(__file__).resolve().parent.parent
QUESTIONS = [
    "두통이 심하고 열이 나요. 어떻게 해야 하나요?",
    "고혈압 환자가 피해야 할 음식은 무엇인가요?",
    "당뇨병의 초기 증상을 알려주세요.",
    "흉통이 있을 때 감별해야 할 질환은?",
    "소아 발열 시 해열제 사용 기준은 무엇인가요?",
    "A 45-year-old man has crushing chest pain. What is the first test?",
]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def _client(client, model: str, index: int, deadline: float, max_tokens: int, stats: dict) -> None:
    n = index
    while time.perf_counter() < deadline:
        question = QUESTIONS[n % len(QUESTIONS)]
        n += 1
        start, first, pieces = time.perf_counter(), None, 0
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=max_tokens,
                temperature=0.7,
                stream=True,
            )
            async for chunk in stream:
                if chunk.choices and (chunk.choices[0].delta.content or reasoning_of(chunk.choices[0].delta)):
                    first = first or time.perf_counter()
                    pieces += 1
        except Exception as exc:  # noqa: BLE001 - every failure counts, by kind
            stats["errors"].append(type(exc).__name__)
            continue
        end = time.perf_counter()
        stats["ttft"].append((first or end) - start)
        stats["latency"].append(end - start)
        stats["tokens"] += pieces


async def _run(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=600)
    stats: dict = {"ttft": [], "latency": [], "tokens": 0, "errors": []}
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(_client(client, model, i, deadline, max_tokens, stats) for i in range(clients)))
    stats["wall"] = time.perf_counter() - start
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=str(REPO / "outputs/demo/merged/gguf/stage2_korean-q4_k_m.gguf"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    parser.add_argument("--results-dir", help="default bench/results/")
    args = parser.parse_args(argv)
    gguf = Path(args.gguf)
    if not gguf.is_file():
        raise SystemExit(f"error: {gguf} not found: run `make demo` first (or pass --gguf FILE)")

    port = free_port()
    cmd = [sys.executable, "-m", "train", "serve", str(gguf), "--port", str(port), "--name", "bench"]
    server = subprocess.Popen([*cmd, "--threads", str(args.threads)], cwd=REPO, env={**os.environ, "SERVE_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_serving(f"{url}/v1/models", server, timeout=120)
        except (RuntimeError, TimeoutError) as err:
            raise SystemExit(f"error: {err}") from None
        rss_start = rss_mb(server.pid)
        stats = asyncio.run(_run(url, "bench", args.clients, args.seconds, args.max_tokens))
        rss_end = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)

    row = {
        "gguf": gguf.name,
        "clients": args.clients,
        "seconds": round(stats["wall"], 1),
        "requests": len(stats["latency"]),
        "errors": len(stats["errors"]),
        "ttft_p50_s": round(_percentile(stats["ttft"], 50), 3),
        "ttft_p95_s": round(_percentile(stats["ttft"], 95), 3),
        "latency_p50_s": round(_percentile(stats["latency"], 50), 3),
        "latency_p95_s": round(_percentile(stats["latency"], 95), 3),
        "tokens_per_s": round(stats["tokens"] / stats["wall"], 1),
        "server_rss_start_mb": round(rss_start),
        "server_rss_end_mb": round(rss_end),
        "llama_threads": args.threads,
        "max_tokens": args.max_tokens,
    }
    notes = (
        f"`python -m bench.serve_bench`: {args.clients} concurrent streaming chat clients (openai.AsyncOpenAI) for "
        f"{args.seconds:.0f} s against `python -m train serve` (llama.cpp through llama-cpp-python) on the tiny demo "
        "GGUF, loopback. llama.cpp serves one request at a time, so time to first token includes the queue. "
        "Tokens = streamed pieces (one per generated token). Errors by kind: "
        f"{dict((e, stats['errors'].count(e)) for e in set(stats['errors'])) or 'none'}."
    )
    path = write_results(
        "serve: concurrent streaming chat clients (llama.cpp GGUF server)", [row], notes, args.results_dir
    )
    sys.stdout.write(f"{row}\nresults: {path}\n")
    if stats["errors"]:
        raise SystemExit(f"error: {len(stats['errors'])} requests failed")


if __name__ == "__main__":
    main()
