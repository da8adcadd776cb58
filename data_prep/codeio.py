"""CodeI/O data (arXiv 2502.07316): Python functions -> verified output- and input-prediction rows.

    python -m data_prep codeio recipes/codeio/starter.yaml

Each `*.py` in `functions_dir` defines `main(...)` and either `INPUTS` (a list of keyword dicts) or
`gen_input(rng)`. Every function runs in the sandbox (data_prep/sandbox.py: bubblewrap namespaces with
no network, a read-only system, a tmpfs work directory, no process creation, and time, memory and output
limits) to get ground-truth outputs; without bubblewrap the command refuses, unless `--no-isolation`
(trusted functions only, logged as a warning). Two directions per input:
- output prediction: code + input -> the output;
- input prediction: code + output -> an input that produces it (any such input counts: checked by
  running the function on it).
With a teacher (a local model: stage folder, merged folder or `tiny`; or an OpenAI-compatible endpoint),
each question gets a reasoning trace and an answer, verified by execution. A wrong answer gets one
more attempt with the execution feedback in the prompt (CodeI/O++); the revised trace is kept when it
becomes correct. Without a teacher the rows carry no reasoning. Rows are written in the stage-1 shape
(Question, Complex_CoT, Response; schema medical_o1, or `columns` when there is no reasoning) with
counts of verified, revised and failed answers and rejected functions by reason in manifest.json.
Each teacher answer is appended to `teacher_answers.jsonl` in the output folder as it arrives; a rerun
reuses them and asks only the missing questions (a failed HTTP call ends with one line: host, status).
"""

from __future__ import annotations

import ast
import hashlib
import http.client
import json
import os
import random
import re
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_prep.sandbox import Limits, require_isolation, run_sandboxed
from train.core.errors import UserError
from train.core.formats import THINK_BLOCK
from train.core.io import atomic_write_text, read_jsonl, write_json, write_jsonl, write_rejects
from train.core.log import get_logger
from train.core.paths import REPO_ROOT
from train.core.typed_config import build_config, read_yaml

log = get_logger("codeio")
ANSWERS_FILE = "teacher_answers.jsonl"
NO_ISOLATION_HELP = (
    "run the functions WITHOUT the bubblewrap boundary (rlimits and timeouts only): only for trusted "
    "functions such as the starter set, never for collected or generated code"
)
OUTPUT_Q = (
    "You are given a Python function and an input. Predict the exact output of `main` for this input. "
    "Think it through step by step, then give the output as JSON after 'Answer:'.\n\n```python\n{code}\n```"
    "\n\nInput (keyword arguments as JSON): {input}"
)
INPUT_Q = (
    "You are given a Python function and an output. Give an input for which `main` returns exactly this "
    "output. Think it through step by step, then give the keyword arguments as a JSON object after "
    "'Answer:'.\n\n```python\n{code}\n```\n\nOutput (JSON): {output}"
)
FEEDBACK = (
    "\n\nYour previous answer was {answer}. Running the function showed: {feedback}. "
    "Reason again and give the corrected answer after 'Answer:'."
)


@dataclass
class TeacherConfig:
    kind: Literal["none", "local", "openai"] = field(
        default="none",
        metadata={
            "help": "none = rows without reasoning; local = a model on disk (stage/merged folder or 'tiny'); "
            "openai = an OpenAI-compatible /chat/completions endpoint."
        },
    )
    model: str = field(default="", metadata={"help": "local: model folder; openai: the model name."})
    url: str = field(default="", metadata={"help": "openai: base URL, e.g. http://localhost:8000/v1."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "Environment variable holding the key."})
    max_new_tokens: int = field(default=512, metadata={"help": "Room for the reasoning and the answer."})
    revise: bool = field(default=True, metadata={"help": "CodeI/O++: one more attempt with execution feedback."})


@dataclass
class CodeIOSpec:
    functions_dir: str = field(metadata={"help": "Folder of *.py files, each with main() and INPUTS or gen_input."})
    out: str = field(metadata={"help": "Output folder: codeio.jsonl, manifest.json, rejects.jsonl."})
    inputs_per_function: int = field(default=4, metadata={"help": "Generated inputs per function (gen_input)."})
    directions: list[Literal["output", "input"]] = field(
        default_factory=lambda: ["output", "input"], metadata={"help": "Which predictions to build."}
    )
    seed: int = field(default=0, metadata={"help": "Input generation seed."})
    timeout_s: float = field(default=5.0, metadata={"help": "Wall-clock limit per call."})
    memory_mb: int = field(default=512, metadata={"help": "Address-space limit per call."})
    max_output_chars: int = field(default=10_000, metadata={"help": "Printed output allowed per call."})
    max_answer_chars: int = field(default=2_000, metadata={"help": "Longer outputs make poor questions: rejected."})
    teacher: TeacherConfig = field(default_factory=TeacherConfig, metadata={"help": "Who writes reasoning."})


def load_spec(path: str | Path, overrides: list[str] | None = None) -> CodeIOSpec:
    return build_config(CodeIOSpec, read_yaml(path, "CodeI/O spec"), str(path), overrides)


def _literal_inputs(code: str) -> list[dict] | None:
    """INPUTS read without executing the file (ast.literal_eval)."""
    for node in ast.parse(code).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "INPUTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def parse_answer(text: str):
    """The JSON after the last 'Answer:' (reasoning stripped), or None."""
    text = THINK_BLOCK.sub("", text)
    if "Answer:" not in text:
        return None
    tail = text.rsplit("Answer:", 1)[1].strip().strip("`").strip()
    tail = re.sub(r"^json\s*", "", tail)
    for end in range(len(tail), 0, -1):  # the longest JSON prefix (a model may keep talking after it)
        try:
            return json.loads(tail[:end])
        except json.JSONDecodeError:
            continue
    return None


def verify(code: str, direction: str, answer, expected_output, limits: Limits) -> tuple[bool, str]:
    """Execution decides: the predicted output equals the real one, or the predicted input reproduces it."""
    if answer is None:
        return False, "no JSON answer after 'Answer:'"
    if direction == "output":
        return (answer == expected_output, f"the output is {json.dumps(expected_output)}")
    if not isinstance(answer, dict):
        return False, "the answer must be a JSON object of keyword arguments"
    run = run_sandboxed(code, "main", answer, limits)
    if not run["ok"]:
        return False, f"main({json.dumps(answer)}) failed: {run['reason']} ({run['detail']})"
    return (run["value"] == expected_output, f"main({json.dumps(answer)}) returns {json.dumps(run['value'])}")


def _origin(url: str) -> tuple[str, str, int | None]:
    """scheme, host, port (default ports filled in): what decides whether a redirect leaves the endpoint."""
    parts = urllib.parse.urlsplit(url)
    return (
        parts.scheme.lower(),
        (parts.hostname or "").lower(),
        parts.port or {"http": 80, "https": 443}.get(parts.scheme),
    )


def _host(url: str) -> str:
    """host:port of a URL, without any user:password part."""
    _, host, port = _origin(url)
    return f"{host}:{port}"


class _KeyStaysWithItsHost(urllib.request.HTTPRedirectHandler):
    """urllib copies every header into the redirected request: the key would follow a redirect anywhere.
    A redirect to another scheme, host or port goes there without the Authorization header."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and new.has_header("Authorization") and _origin(new.full_url) != _origin(req.full_url):
            new.remove_header("Authorization")
            log.warning(
                "teacher: %s redirected to %s, another host: the Authorization header is not sent there",
                _host(req.full_url),
                _host(new.full_url),
            )
        return new


class Teacher:
    """Asks the questions it has no answer for yet; with `answers_path`, each answer is appended there as it
    arrives (keyed by a hash of the teacher and the question) and reused on the next run."""

    def __init__(self, cfg: TeacherConfig, answers_path: Path | None = None):
        self.cfg = cfg
        if cfg.kind == "local":
            from train.core.config import DecodingConfig
            from train.inference.generate import make_generator
            from train.inference.targets import resolve_targets
            from train.models.loading import resolve_model_path

            (target,) = resolve_targets([resolve_model_path(cfg.model or "tiny")], checkpoints=False)
            self.generator = make_generator(target)
            self.decoding = DecodingConfig(name="teacher", max_new_tokens=cfg.max_new_tokens)
        elif cfg.kind == "openai":
            if not cfg.url or not cfg.model:
                raise UserError("teacher.kind openai needs teacher.url and teacher.model")
            if not os.environ.get(cfg.api_key_env):
                raise UserError(f"teacher.kind openai reads its key from ${cfg.api_key_env}, which is not set")
            self.opener = urllib.request.build_opener(_KeyStaysWithItsHost)
        self.answers_path = answers_path
        self.answers = self._load()
        if self.answers:
            log.info("teacher: %d answers from an earlier run reused (%s)", len(self.answers), answers_path)

    def key(self, question: str) -> str:
        """The same question to the same teacher (kind, model, token budget) has the same key."""
        ident = [self.cfg.kind, self.cfg.model, self.cfg.max_new_tokens, question]
        return hashlib.sha256(json.dumps(ident, ensure_ascii=False).encode()).hexdigest()

    def _load(self) -> dict[str, str]:
        path = self.answers_path
        if path is None or not path.is_file():
            return {}
        try:
            rows = read_jsonl(path)
        except ValueError:  # a line cut short by a kill mid-write: keep the others, rewrite the file whole
            rows = []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
            log.warning("%s: dropped damaged line(s); those questions are asked again", path)
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return {r["key"]: r["answer"] for r in rows if isinstance(r, dict) and {"key", "answer"} <= set(r)}

    def _keep(self, question: str, answer: str) -> None:
        key = self.key(question)
        self.answers[key] = answer
        if self.answers_path is not None:
            write_jsonl(self.answers_path, [{"key": key, "answer": answer}], append=True)

    def ask(self, questions: list[str]) -> list[str]:
        missing = [q for q in dict.fromkeys(questions) if self.key(q) not in self.answers]
        if self.cfg.kind == "local":
            for start in range(0, len(missing), 4):
                batch = missing[start : start + 4]
                prompts = [self.generator.render(q) for q in batch]
                for question, c in zip(
                    batch, self.generator.generate(prompts, self.decoding, batch_size=4), strict=True
                ):
                    self._keep(question, c[0][0])
        else:
            for number, question in enumerate(missing, 1):
                self._keep(question, self._chat(question, number, len(missing)))
        return [self.answers[self.key(q)] for q in questions]

    def _chat(self, question: str, number: int = 1, of: int = 1) -> str:
        body = json.dumps(
            {
                "model": self.cfg.model,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": self.cfg.max_new_tokens,
                "temperature": 0,
            }
        ).encode()
        url = self.cfg.url.rstrip("/") + "/chat/completions"
        request = urllib.request.Request(
            url,
            data=body,
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {os.environ[self.cfg.api_key_env]}"},
        )
        try:
            with self.opener.open(request, timeout=300) as response:
                return json.loads(response.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as err:  # the status and the host that gave it (never the request headers)
            problem = f"{_host(err.filename or url)} answered HTTP {err.code} ({err.reason})"
        except urllib.error.URLError as err:
            problem = f"{_host(url)} could not be reached ({err.reason})"
        except (OSError, http.client.HTTPException) as err:
            problem = f"{_host(url)} failed ({type(err).__name__}: {err})"
        except (ValueError, KeyError, IndexError, TypeError) as err:
            problem = f"{_host(url)} sent no chat completion ({type(err).__name__}: {err})"
        kept = f"the {len(self.answers)} answers so far are kept in {self.answers_path}: run again to ask only the rest"
        raise UserError(
            f"teacher endpoint {problem} on question {number} of {of}; "
            + (kept if self.answers_path else f"{len(self.answers)} answers so far")
        )


def build_codeio(spec: CodeIOSpec, isolation: bool = True) -> dict:
    """`isolation` False (the --no-isolation flag) runs the functions without bubblewrap: trusted code only."""
    if isolation:
        require_isolation()  # one line with the reason and the fix, before any function runs
    else:
        log.warning("--no-isolation: the functions run WITHOUT the sandbox boundary; only trusted code belongs here")
    limits = Limits(spec.timeout_s, spec.memory_mb, spec.max_output_chars, isolated=isolation)
    folder = Path(spec.functions_dir)
    folder = folder if folder.is_absolute() else REPO_ROOT / folder
    files = sorted(folder.glob("*.py"))
    if not files:
        raise UserError(f"{folder}: no *.py functions")
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    rejects: list[dict] = []
    items: list[dict] = []
    rng = random.Random(spec.seed)
    for path in files:
        code = path.read_text(encoding="utf-8")
        try:
            inputs = _literal_inputs(code)
        except (SyntaxError, ValueError) as err:
            rejects.append({"function": path.name, "reason": "bad_source", "detail": str(err)[:300]})
            continue
        if inputs is None:
            inputs = []
            for i in range(spec.inputs_per_function):
                made = run_sandboxed(code, "gen_input", None, limits, seed=rng.randrange(2**31) + i)
                if not made["ok"] or not isinstance(made["value"], dict):
                    rejects.append(
                        {
                            "function": path.name,
                            "reason": f"gen_input_{made.get('reason', 'not_dict')}",
                            "detail": made.get("detail", "gen_input must return a dict"),
                        }
                    )
                    break
                inputs.append(made["value"])
        for kwargs in {json.dumps(k, sort_keys=True): k for k in inputs}.values():  # each distinct input once
            run = run_sandboxed(code, "main", kwargs, limits)
            if not run["ok"]:
                rejects.append(
                    {"function": path.name, "input": kwargs, "reason": run["reason"], "detail": run["detail"]}
                )
                continue
            if len(json.dumps(run["value"])) > spec.max_answer_chars:
                rejects.append(
                    {
                        "function": path.name,
                        "input": kwargs,
                        "reason": "answer_too_long",
                        "detail": f"{len(json.dumps(run['value']))} characters",
                    }
                )
                continue
            for direction in spec.directions:
                question = (
                    OUTPUT_Q.format(code=code.strip(), input=json.dumps(kwargs, ensure_ascii=False))
                    if direction == "output"
                    else INPUT_Q.format(code=code.strip(), output=json.dumps(run["value"], ensure_ascii=False))
                )
                items.append(
                    {
                        "function": path.name,
                        "direction": direction,
                        "question": question,
                        "input": kwargs,
                        "output": run["value"],
                        "code": code,
                    }
                )
    rows, counts = _answer(items, spec, limits, out / ANSWERS_FILE)
    write_jsonl(out / "codeio.jsonl", rows)
    write_rejects(out, rejects)
    manifest = {
        "functions": len(files),
        "questions": len(items),
        "rows": len(rows),
        "by_direction": dict(Counter(r["direction"] for r in rows)),
        **counts,
        "rejected": dict(Counter(r["reason"] for r in rejects)),
        "teacher": spec.teacher.kind,
        "schema": "medical_o1" if spec.teacher.kind != "none" else "columns",
    }
    write_json(out / "manifest.json", manifest)
    return manifest


def _answer(
    items: list[dict], spec: CodeIOSpec, limits: Limits, answers_path: Path | None = None
) -> tuple[list[dict], dict]:
    """Rows in the stage-1 shape; with a teacher, only answers that execution confirms. The teacher's
    answers are kept in `answers_path` as they arrive and reused by a rerun."""

    def row(item, reasoning, answer):
        return {
            "Question": item["question"],
            "Complex_CoT": reasoning,
            "Response": json.dumps(answer, ensure_ascii=False),
            "function": item["function"],
            "direction": item["direction"],
        }

    if spec.teacher.kind == "none":
        truth = [it["output"] if it["direction"] == "output" else it["input"] for it in items]
        return [row(it, "", t) for it, t in zip(items, truth, strict=True)], {
            "verified": len(items),
            "revised": 0,
            "failed": 0,
        }
    teacher = Teacher(spec.teacher, answers_path)
    counts = Counter(verified=0, revised=0, failed=0)
    rows = []
    first = teacher.ask([it["question"] for it in items])
    retry = []
    for item, text in zip(items, first, strict=True):
        answer = parse_answer(text)
        ok, feedback = verify(item["code"], item["direction"], answer, item["output"], limits)
        if ok:
            counts["verified"] += 1
            rows.append(row(item, _reasoning(text), answer))
        elif spec.teacher.revise:
            retry.append((item, item["question"] + FEEDBACK.format(answer=json.dumps(answer), feedback=feedback)))
        else:
            counts["failed"] += 1
    if retry:
        for (item, _), text in zip(retry, teacher.ask([q for _, q in retry]), strict=True):
            answer = parse_answer(text)
            ok, _ = verify(item["code"], item["direction"], answer, item["output"], limits)
            counts["revised" if ok else "failed"] += 1
            if ok:
                rows.append(row(item, _reasoning(text), answer))
    log.info(
        "teacher answers: %d verified, %d revised, %d failed", counts["verified"], counts["revised"], counts["failed"]
    )
    return rows, dict(counts)


def _reasoning(text: str) -> str:
    """The trace before 'Answer:' (without <think> tags: the stage-1 template adds them)."""
    body = text.rsplit("Answer:", 1)[0]
    return body.replace("<think>", "").replace("</think>", "").strip()
