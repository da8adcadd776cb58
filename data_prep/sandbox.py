"""Run untrusted Python functions under bubblewrap: a security boundary, not only a guard against accidents.

Each call starts the base interpreter (`python -I -S -B`, standard library only) inside `bwrap` with:
- new user, PID, network, IPC, UTS and cgroup namespaces (`--unshare-all --unshare-user`, nested user
  namespaces disabled): no network at all (the new network namespace has no route out, not even to the
  host's 127.0.0.1), a private /proc that shows only the sandbox's own processes;
- a read-only view of the shared libraries and the interpreter only (no /home or /root, no /etc, no
  /usr/bin: no shell to start), a size-capped tmpfs at /sandbox (also $TMPDIR) as the work directory and
  the only writable place (the sandbox's root and /dev are remounted read-only);
- every capability dropped, uid 65534 inside, `--clearenv`, and bwrap itself started with an empty
  environment: bwrap is PID 1 inside, so /proc/1/environ shows bwrap's environment, and a token in the
  caller's environment would otherwise be readable there;
- a seccomp filter that refuses process creation (fork, vfork, clone without CLONE_THREAD; clone3 reports
  ENOSYS so threads fall back to clone) and ptrace: os.system, subprocess, ctypes' fork and fork bombs
  fail with EPERM. RLIMIT_NPROC cannot do this here: the kernel does not enforce it for host root;
- rlimits on memory (RLIMIT_AS), CPU time, file size and open files, and a wall-clock timeout after which
  the whole process group is killed (bwrap runs with `--die-with-parent`; when the PID namespace's init
  dies the kernel kills everything left in it, including a process that called setsid());
- stdout and stderr read with byte caps and decoded with errors="replace": stdout must be exactly one
  valid result line, anything else is a reject by reason (bad_output, huge_output, crashed, ...), never
  an exception in the caller.
An audit hook inside the child only names the reason when the function tried something the boundary
refuses (network, file_write, subprocess, native_code); it is not what enforces it.

Where bwrap is missing or cannot create namespaces, `require_isolation` refuses with one line saying why
and how to fix it. `Limits(isolated=False)` runs the same child without bwrap (rlimits, timeout, output
caps only): for trusted functions such as the starter set, never for collected code.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass

from train.core.errors import UserError

# Runs inside the child; reads {"code", "call", "kwargs", "seed", "limits"} from stdin, writes one JSON line.
_CHILD = r"""
import json, os, random, resource, sys

def emit(result):
    data = (json.dumps(result) + "\n").encode()
    while data:
        data = data[os.write(1, data):]
    os._exit(0)

payload = json.loads(sys.stdin.buffer.read())
limits = payload["limits"]
for name, soft, hard in (
    ("AS", limits["memory_bytes"], limits["memory_bytes"]),
    ("CPU", limits["cpu_s"], limits["cpu_s"] + 1),
    ("FSIZE", limits["file_bytes"], limits["file_bytes"]),
    ("NOFILE", 256, 256),
    ("CORE", 0, 0),
):
    resource.setrlimit(getattr(resource, "RLIMIT_" + name), (soft, hard))

WORK = os.path.realpath(os.getcwd())
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
ATTEMPTS = (("socket.", "network"), ("os.system", "subprocess"), ("os.fork", "subprocess"),
            ("os.exec", "subprocess"), ("os.posix_spawn", "subprocess"), ("os.spawn", "subprocess"),
            ("subprocess.", "subprocess"), ("pty.", "subprocess"), ("ctypes.", "native_code"))
PATH_ARGS = {"os.remove": 1, "os.rmdir": 1, "os.truncate": 1, "os.chmod": 1, "os.chown": 1, "os.mkdir": 1,
             "os.utime": 1, "shutil.rmtree": 1, "os.rename": 2, "shutil.move": 2, "os.link": -1,
             "os.symlink": -1, "shutil.copyfile": -1, "shutil.copytree": -1}
tried = []

def outside(path):
    if isinstance(path, int):
        return False
    try:
        path = os.path.realpath(os.path.join(WORK, os.fsdecode(path)))
    except Exception:
        return True
    return path not in (os.devnull, WORK) and not path.startswith(WORK + os.sep)

def watch(event, args):  # names the reason; the sandbox's namespaces and filter are what refuse
    if tried:
        return
    try:
        if event == "open":
            if (args[2] or 0) & WRITE and outside(args[0]):
                tried.append(("file_write", f"open({args[0]!r}) for writing"))
        elif event in PATH_ARGS:
            n = PATH_ARGS[event]
            paths = args[1:2] if n == -1 else args[:n]
            if any(outside(p) for p in paths):
                tried.append(("file_write", f"{event}{tuple(args)!r}"[:300]))
        else:
            for prefix, reason in ATTEMPTS:
                if event.startswith(prefix):
                    tried.append((reason, event))
                    break
    except Exception:
        pass

class Capped:
    def __init__(self, cap):
        self.cap, self.parts, self.size, self.over = cap, [], 0, False
    def write(self, text):
        text = str(text)
        if self.size + len(text) > self.cap:
            self.over = True
            text = text[: max(0, self.cap - self.size)]
        self.parts.append(text)
        self.size += len(text)
        return len(text)
    def flush(self):
        pass

out = Capped(limits["max_output_chars"])
error = None
sys.addaudithook(watch)
try:
    namespace = {"__name__": "sandboxed"}
    sys.stdout = out
    exec(compile(payload["code"], "<function>", "exec"), namespace)
    if payload["call"] not in namespace:
        raise NameError(f"the code defines no {payload['call']}()")
    fn = namespace[payload["call"]]
    value = fn(**payload["kwargs"]) if payload.get("kwargs") is not None else fn(random.Random(payload["seed"]))
except MemoryError:
    error = ("memory", "MemoryError")
except BaseException as err:
    error = ("raised", f"{type(err).__name__}: {err}"[:500])
sys.stdout = sys.__stdout__
if tried:
    emit({"ok": False, "reason": tried[0][0], "detail": f"refused by the sandbox: {tried[0][1]}"[:500]})
if error:
    emit({"ok": False, "reason": error[0], "detail": error[1]})
if out.over:
    emit({"ok": False, "reason": "huge_output", "detail": f"printed more than {out.cap} characters"})
try:
    encoded = json.loads(json.dumps(value))
except MemoryError:
    emit({"ok": False, "reason": "memory", "detail": "MemoryError while encoding the result"})
except (TypeError, ValueError, RecursionError) as err:
    emit({"ok": False, "reason": "not_serializable", "detail": f"{type(value).__name__}: {err}"[:500]})
emit({"ok": True, "value": encoded, "stdout": "".join(out.parts)})
"""

REASONS = frozenset(
    {
        "timeout",
        "memory",
        "raised",
        "huge_output",
        "not_serializable",
        "network",
        "file_write",
        "subprocess",
        "native_code",
        "bad_output",
        "crashed",
    }
)
WORK_DIR = "/sandbox"  # inside: a tmpfs, the only writable place (not /tmp: host paths there stay foreign)
FIX = (
    "install it (`apt-get install bubblewrap`, part of `make install`) or run where unprivileged user namespaces "
    "are allowed; --no-isolation runs without the boundary, for trusted functions such as the starter set only"
)


@dataclass
class Limits:
    timeout_s: float = 5.0
    memory_mb: int = 512
    max_output_chars: int = 10_000
    file_bytes: int = 1_000_000
    work_dir_bytes: int = 16_000_000  # the tmpfs work directory, the only writable place
    max_result_bytes: int = 2_000_000  # the one result line on stdout (JSON value + printed text)
    max_stderr_bytes: int = 1_000_000
    isolated: bool = True  # False: no bubblewrap, for trusted code only (see require_isolation)


# The seccomp filter: refuse process creation and ptrace; a syscall of another ABI kills the process.
# machine -> (AUDIT_ARCH, clone, clone3, denied syscalls, has an x32 ABI to refuse)
_SYSCALLS = {
    # fork, vfork, ptrace, process_vm_readv, process_vm_writev, pidfd_getfd
    "x86_64": (0xC000003E, 56, 435, (57, 58, 101, 310, 311, 438), True),
    # ptrace, process_vm_readv, process_vm_writev, pidfd_getfd (no fork or vfork on arm64)
    "aarch64": (0xC00000B7, 220, 435, (117, 270, 271, 438), False),
}
_LD, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ/JGE/JSET|K, BPF_RET|K
_ALLOW, _KILL, _ERRNO, _EPERM, _ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000, 1, 38
_CLONE_THREAD = 0x00010000


@functools.cache
def process_filter(machine: str) -> bytes:
    """A classic-BPF seccomp program (struct sock_filter[]) for `bwrap --seccomp`."""
    arch, clone, clone3, denied, x32 = _SYSCALLS[machine]
    prog = [(_LD, 0, 0, 4), (_JEQ, 1, 0, arch), (_RET, 0, 0, _KILL), (_LD, 0, 0, 0)]  # arch, then syscall nr
    if x32:
        prog += [(_JGE, 0, 1, 0x40000000), (_RET, 0, 0, _KILL)]
    n = len(denied)
    prog += [(_JEQ, n + 4 - i, 0, nr) for i, nr in enumerate(denied)]  # -> DENY
    prog += [
        (_JEQ, 5, 0, clone3),  # -> NOSYS (glibc then creates threads with clone)
        (_JEQ, 0, 2, clone),  # clone: look at its flags; anything else -> ALLOW
        (_LD, 0, 0, 16),  # low 32 bits of args[0] (little-endian): the clone flags
        (_JSET, 0, 1, _CLONE_THREAD),  # a thread -> ALLOW, a process -> DENY
        (_RET, 0, 0, _ALLOW),
        (_RET, 0, 0, _ERRNO | _EPERM),  # DENY
        (_RET, 0, 0, _ERRNO | _ENOSYS),  # NOSYS
    ]
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


@functools.cache
def _interpreter() -> tuple[str, tuple[str, ...]]:
    """The base interpreter (not the venv: the child needs the standard library only) and what it reads."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    stdlib = os.path.dirname(os.path.realpath(os.__file__))
    paths = [exe, stdlib]
    paths += [os.path.realpath(p) for p in sys.path if os.path.basename(p) == "lib-dynload"]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        if libdir and soname and os.path.exists(os.path.join(libdir, soname)):
            paths.append(os.path.realpath(os.path.join(libdir, soname)))
    inside_stdlib = stdlib + os.sep  # lib-dynload usually is: bound with it already
    return exe, tuple(dict.fromkeys(p for p in paths if not p.startswith(inside_stdlib)))


@functools.cache
def _bwrap_argv(bwrap: str, work_dir_bytes: int, seccomp_fd: int) -> tuple[str, ...]:
    exe, reads = _interpreter()
    argv = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
    argv += ["--cap-drop", "ALL", "--uid", "65534", "--gid", "65534", "--hostname", "sandbox"]
    for path in ("/usr/lib", "/usr/lib64", "/usr/lib32", "/lib", "/lib64", "/lib32"):  # the shared libraries
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for path in reads:
        argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(work_dir_bytes), "--tmpfs", WORK_DIR]
    argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORK_DIR]
    argv += ["--clearenv", "--setenv", "TMPDIR", WORK_DIR]
    argv += ["--seccomp", str(seccomp_fd), "--", exe, "-I", "-S", "-B", "-X", "utf8", "-c", _CHILD]
    return tuple(argv)


def run_sandboxed(
    code: str, call: str, kwargs: dict | None = None, limits: Limits | None = None, seed: int = 0
) -> dict:
    """{"ok": True, "value": ..., "stdout": ...} or {"ok": False, "reason": ..., "detail": ...}, reason one of
    REASONS. Never raises for anything the code does; raises UserError when isolation is asked for and
    bubblewrap cannot provide it.

    With `kwargs` None, `call` is an input generator and receives a seeded random.Random.
    """
    limits = limits or Limits()
    if limits.isolated:
        require_isolation()
    return _run(code, call, kwargs, limits, seed)


@functools.lru_cache(maxsize=1)
def isolation_problem() -> str | None:
    """Why bubblewrap cannot isolate the functions here, or None (probed once: a trivial sandboxed call)."""
    if not shutil.which("bwrap"):
        return "bubblewrap (bwrap) is not installed"
    if platform.machine() not in _SYSCALLS:
        return f"no process filter is written for {platform.machine()} (only {', '.join(_SYSCALLS)})"
    probe = _run("def main():\n    return 1", "main", {}, Limits(timeout_s=30), 0)
    if probe != {"ok": True, "value": 1, "stdout": ""}:
        return f"bubblewrap cannot start a sandbox here ({probe.get('reason')}: {probe.get('detail')})"
    return None


def require_isolation() -> None:
    """Refuse, in one line with the fix, where the sandbox cannot be a boundary."""
    problem = isolation_problem()
    if problem:
        raise UserError(f"cannot sandbox the CodeI/O functions: {problem}; {FIX}")


def _run(code: str, call: str, kwargs: dict | None, limits: Limits, seed: int) -> dict:
    payload = {
        "code": code,
        "call": call,
        "kwargs": kwargs,
        "seed": seed,
        "limits": {
            "memory_bytes": limits.memory_mb * 1024 * 1024,
            "cpu_s": max(1, int(limits.timeout_s) + 1),
            "file_bytes": limits.file_bytes,
            "max_output_chars": limits.max_output_chars,
        },
    }
    data = json.dumps(payload).encode()
    if limits.isolated:
        bwrap = shutil.which("bwrap") or "bwrap"
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, process_filter(platform.machine()))  # a few hundred bytes: fits the pipe
        finally:
            os.close(write_end)
        try:
            # Each call gets its own pipe, usually with the same fd number: the argv is then cached.
            argv = _bwrap_argv(bwrap, limits.work_dir_bytes, read_end)
            return _communicate(argv, data, limits, cwd=None, pass_fds=(read_end,))
        finally:
            os.close(read_end)
    exe, _ = _interpreter()
    with tempfile.TemporaryDirectory(prefix="sandbox-") as workdir:
        return _communicate(
            (exe, "-I", "-S", "-B", "-X", "utf8", "-c", _CHILD),
            data,
            limits,
            cwd=workdir,
            pass_fds=(),
            env={"TMPDIR": workdir},
        )


def _communicate(
    argv: Sequence[str], data: bytes, limits: Limits, cwd: str | None, pass_fds: tuple, env: dict | None = None
) -> dict:
    """Start `argv` in its own session with an empty environment, feed `data`, read both pipes with byte
    caps until it ends or the time is up, and kill the whole group in every case."""
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env or {},  # nothing of ours (tokens included) reaches bwrap, which is PID 1 inside
            pass_fds=pass_fds,
            start_new_session=True,
        )
    except OSError as err:
        return {"ok": False, "reason": "crashed", "detail": f"could not start the sandbox: {err}"}
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None  # all three are pipes
    stdin, stdout, stderr = proc.stdin.fileno(), proc.stdout.fileno(), proc.stderr.fileno()
    read = {stdout: bytearray(), stderr: bytearray()}
    caps = {stdout: (limits.max_result_bytes, "stdout"), stderr: (limits.max_stderr_bytes, "stderr")}
    failure = None
    try:
        with selectors.DefaultSelector() as selector:
            os.set_blocking(stdin, False)
            selector.register(stdin, selectors.EVENT_WRITE)
            selector.register(stdout, selectors.EVENT_READ)
            selector.register(stderr, selectors.EVENT_READ)
            view = memoryview(data)
            while selector.get_map() and failure is None:
                left = limits.timeout_s - (time.monotonic() - started)
                if left <= 0:
                    failure = ("timeout", f"no result within {limits.timeout_s}s")
                    break
                for key, _ in selector.select(left):
                    if key.fd == stdin:
                        try:
                            view = view[os.write(stdin, view[:65536]) :]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:  # it ended without reading its input: its output tells why
                            view = view[:0]
                        if not view:
                            selector.unregister(stdin)
                            proc.stdin.close()
                        continue
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        selector.unregister(key.fd)
                        continue
                    read[key.fd] += chunk
                    cap, name = caps[key.fd]
                    if len(read[key.fd]) > cap:
                        failure = ("huge_output", f"more than {cap} bytes on {name}")
                        break
        if failure is None:
            try:
                proc.wait(max(0.0, limits.timeout_s - (time.monotonic() - started)) + 0.5)
            except subprocess.TimeoutExpired:
                failure = ("timeout", f"no exit within {limits.timeout_s}s")
    finally:
        if proc.poll() is None:  # not yet reaped: the group id cannot have been reused
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if not pipe.closed:
                pipe.close()
    if failure:
        return {"ok": False, "reason": failure[0], "detail": failure[1]}
    return _result(bytes(read[stdout]), read[stderr].decode("utf-8", errors="replace"), proc.returncode)


def _result(out: bytes, err: str, returncode: int) -> dict:
    """The one result line, checked; anything else becomes a reject with its reason."""
    if out:
        result = _valid(out)
        if result is None:
            shown = out[:200].decode("utf-8", errors="replace")
            return {"ok": False, "reason": "bad_output", "detail": f"not one result line: {shown!r}"}
        return result
    if "MemoryError" in err:
        return {"ok": False, "reason": "memory", "detail": "MemoryError"}
    if returncode in (128 + signal.SIGXCPU, -signal.SIGXCPU):
        return {"ok": False, "reason": "timeout", "detail": "CPU time limit"}
    tail = err.strip()[-300:] or "no output"
    return {"ok": False, "reason": "crashed", "detail": f"exit status {returncode}: {tail}"}


def _valid(out: bytes) -> dict | None:
    if not out.endswith(b"\n") or out.count(b"\n") != 1:
        return None
    try:
        result = json.loads(out)
    except ValueError:  # invalid JSON or invalid UTF-8
        return None
    if not isinstance(result, dict) or not isinstance(result.get("ok"), bool):
        return None
    if result["ok"]:
        return result if set(result) == {"ok", "value", "stdout"} and isinstance(result["stdout"], str) else None
    if set(result) == {"ok", "reason", "detail"} and result["reason"] in REASONS and isinstance(result["detail"], str):
        return result
    return None
