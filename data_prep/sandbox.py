"""Run untrusted Python functions in a child process with time, memory, output, network and file limits.

Each call starts `python -I` with: RLIMIT_AS (memory), RLIMIT_CPU and a wall-clock timeout (time),
RLIMIT_FSIZE, a fresh temporary working directory, and a PEP 578 audit hook that refuses sockets and
any file opened for writing outside that directory. Output printed by the function is captured and
capped. The result must be JSON-serializable. This is a guard against accidents in generated or
collected code (infinite loops, memory hogs, stray writes), not a security boundary against hostile
code: run those in a container.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs inside the child; reads {"code", "call", "kwargs", "limits"} from stdin, writes one JSON line.
_CHILD = r"""
import io, json, os, resource, sys, contextlib
payload = json.loads(sys.stdin.read())
limits = payload["limits"]
mem = limits["memory_mb"] * 1024 * 1024
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_s"], limits["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limits["file_bytes"], limits["file_bytes"]))
workdir = os.path.realpath(os.getcwd())

def guard(event, args):
    if event.startswith("socket."):
        raise PermissionError("network access is not allowed in the sandbox")
    if event == "open" and args[0] is not None and not isinstance(args[0], int):
        mode = args[1] or "r"
        path = os.path.realpath(os.fsdecode(args[0]))
        if any(c in str(mode) for c in "wax+") and not path.startswith(workdir + os.sep):
            raise PermissionError(f"writing outside the sandbox directory: {path}")
sys.addaudithook(guard)

out = io.StringIO()
cap = limits["max_output_chars"]
def emit(result):
    sys.__stdout__.write(json.dumps(result) + "\n")
    sys.__stdout__.flush()
try:
    namespace = {"__name__": "sandboxed"}
    with contextlib.redirect_stdout(out):
        exec(compile(payload["code"], "<function>", "exec"), namespace)
        if payload["call"] not in namespace:
            raise NameError(f"the code defines no {payload['call']}()")
        fn = namespace[payload["call"]]
        value = fn(**payload["kwargs"]) if payload.get("kwargs") is not None else fn(__import__("random").Random(payload["seed"]))
    printed = out.getvalue()
    if len(printed) > cap:
        emit({"ok": False, "reason": "huge_output", "detail": f"printed {len(printed)} characters (limit {cap})"})
    else:
        try:
            encoded = json.loads(json.dumps(value))
        except (TypeError, ValueError) as err:
            emit({"ok": False, "reason": "not_serializable", "detail": f"{type(value).__name__}: {err}"})
        else:
            emit({"ok": True, "value": encoded, "stdout": printed})
except MemoryError:
    emit({"ok": False, "reason": "memory", "detail": "MemoryError"})
except PermissionError as err:
    forbidden = "network" if "network" in str(err) else "file_write" if "outside the sandbox" in str(err) else "raised"
    emit({"ok": False, "reason": forbidden, "detail": f"PermissionError: {err}"[:500]})
except BaseException as err:
    emit({"ok": False, "reason": "raised", "detail": f"{type(err).__name__}: {err}"[:500]})
"""


@dataclass
class Limits:
    timeout_s: float = 5.0
    memory_mb: int = 512
    max_output_chars: int = 10_000
    file_bytes: int = 1_000_000


def run_sandboxed(
    code: str, call: str, kwargs: dict | None = None, limits: Limits | None = None, seed: int = 0
) -> dict:
    """{"ok": True, "value": ...} or {"ok": False, "reason": timeout|memory|raised|huge_output|not_serializable|
    network|file_write|crashed, "detail": ...}.

    With `kwargs` None, `call` is an input generator and receives a seeded random.Random.
    """
    limits = limits or Limits()
    payload = {
        "code": code,
        "call": call,
        "kwargs": kwargs,
        "seed": seed,
        "limits": {
            "memory_mb": limits.memory_mb,
            "cpu_s": max(1, int(limits.timeout_s) + 1),
            "file_bytes": limits.file_bytes,
            "max_output_chars": limits.max_output_chars,
        },
    }
    with tempfile.TemporaryDirectory(prefix="sandbox-") as workdir:
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-c", _CHILD],
                input=json.dumps(payload),
                cwd=workdir,
                capture_output=True,
                text=True,
                timeout=limits.timeout_s,
                env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "reason": "timeout", "detail": f"no result within {limits.timeout_s}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if lines:
        result = json.loads(lines[-1])
        if not result["ok"] and result["reason"] == "raised" and "MemoryError" in result["detail"]:
            result["reason"] = "memory"
        return result
    if proc.returncode < 0 or "MemoryError" in proc.stderr:  # killed by a limit (SIGKILL/SIGXCPU) or out of memory
        reason = "memory" if "MemoryError" in proc.stderr or proc.returncode == -9 else "timeout"
        return {"ok": False, "reason": reason, "detail": f"child ended with {proc.returncode}"}
    return {"ok": False, "reason": "crashed", "detail": (proc.stderr or "no output").strip()[-300:]}
