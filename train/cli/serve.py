"""Serving commands: serve (an OpenAI-compatible server) and chat (a browser chat page in front of it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from train.cli.export import TRUST_HELP
from train.core.cli import Command
from train.core.errors import UserError

API_KEY_ENV = "SERVE_API_KEY"  # the server's key, and the one the chat page sends; never a flag (ps would show it)


def _serve_arguments(p) -> None:
    p.add_argument("target", help="a .gguf file (llama.cpp), a merged model folder or a stage folder (vLLM)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", help="the model name clients send (default: the file or folder name)")
    p.add_argument("--n-ctx", type=int, default=4096, help="context length in tokens (prompt + answer)")
    p.add_argument("--threads", type=int, help="llama.cpp CPU threads (default: all cores)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: GPUs to split the model over")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def _default_name(path: Path) -> str:
    if path.suffix == ".gguf":
        return path.stem
    return path.parent.name if path.name == "merged" else path.name


def _serve(args) -> None:
    from train.core.log import get_logger
    from train.inference.targets import resolve_targets

    (target,) = resolve_targets([args.target], checkpoints=False, trust_remote_code=args.trust_remote_code)
    name = args.name or _default_name(target.path)
    api_key = os.environ.get(API_KEY_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        get_logger(__name__).warning(
            "binding %s without an API key: anyone who reaches this port can use the model (set %s)",
            args.host, API_KEY_ENV,
        )  # fmt: skip
    if target.kind == "gguf":
        from train.serve.llama_server import serve_gguf

        return serve_gguf(target.path, args.host, args.port, name, args.n_ctx, args.threads, api_key)
    from train.serve.vllm_server import serve_vllm, vllm_entry

    vllm_entry()  # fails before a long merge when vLLM is missing
    model_dir = target.path
    if target.kind == "stage":
        model_dir = target.path / "merged"
        if not (model_dir / "config.json").is_file():
            from train.export.merge import merge_stage

            merge_stage(target.path, model_dir, trust_remote_code=args.trust_remote_code)
    serve_vllm(model_dir, name, args.host, args.port, args.tensor_parallel_size, args.n_ctx, api_key)


def _chat_arguments(p) -> None:
    p.add_argument("--server", default="http://127.0.0.1:8000", help="the server `train serve` started")
    p.add_argument("--host", default="127.0.0.1", help="address the page binds (default loopback only)")
    p.add_argument("--port", type=int, default=8501)


def _chat(args) -> None:
    try:
        import streamlit  # noqa: F401
    except ImportError:
        raise UserError("the chat page needs Streamlit and the openai client: run `make install-serve`") from None
    page = Path(__file__).resolve().parents[1] / "serve" / "chat_page.py"
    cmd = [sys.executable, "-m", "streamlit", "run", str(page), "--server.address", args.host]
    cmd += ["--server.port", str(args.port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    cmd += ["--client.toolbarMode", "minimal"]
    cmd += ["--", "--server", args.server]
    raise SystemExit(subprocess.call(cmd))


COMMANDS = [
    Command(
        "serve", "an OpenAI-compatible server for a GGUF file, a merged folder or a stage", _serve_arguments, _serve
    ),
    Command("chat", "a browser chat page for the team, in front of `train serve`", _chat_arguments, _chat),
]
