"""CodeI/O: the sandbox's limits, rejects by reason, verification by execution, the teacher path."""

from __future__ import annotations

import json
import time

import pytest

from data_prep.codeio import CodeIOSpec, TeacherConfig, build_codeio, parse_answer, verify
from data_prep.sandbox import Limits, run_sandboxed

LIMITS = Limits(timeout_s=2, memory_mb=256, max_output_chars=1000)
BAD = {
    "raises.py": "def main(x):\n    return 1 / x\n\nINPUTS = [{'x': 0}]\n",
    "loops.py": "def main(x):\n    while True:\n        x += 1\n\nINPUTS = [{'x': 1}]\n",
    "prints.py": "def main(x):\n    print('spam' * 10000)\n    return x\n\nINPUTS = [{'x': 1}]\n",
    "returns_set.py": "def main(x):\n    return {x, x + 1}\n\nINPUTS = [{'x': 1}]\n",
    "hog.py": "def main(x):\n    return len(bytearray(2 * 1024 ** 3))\n\nINPUTS = [{'x': 1}]\n",
    "good.py": "def main(a, b):\n    return sorted([a, b])\n\nINPUTS = [{'a': 3, 'b': 1}, {'a': 2, 'b': 5}]\n",
}


def test_sandbox_limits_are_enforced(tmp_path):
    started = time.monotonic()
    assert run_sandboxed("def main():\n    import time\n    time.sleep(60)", "main", {}, LIMITS)["reason"] == "timeout"
    assert time.monotonic() - started < 10  # killed, not waited for
    assert run_sandboxed("def main():\n    return bytearray(2 * 1024 ** 3)", "main", {}, LIMITS)["reason"] == "memory"
    assert run_sandboxed("def main():\n    print('x' * 5000)", "main", {}, LIMITS)["reason"] == "huge_output"
    assert run_sandboxed("def main():\n    return object()", "main", {}, LIMITS)["reason"] == "not_serializable"
    net = "def main():\n    import socket\n    socket.create_connection(('127.0.0.1', 9))"
    assert run_sandboxed(net, "main", {}, LIMITS)["reason"] == "network"
    escape = tmp_path / "escaped.txt"
    write = f"def main():\n    open({str(escape)!r}, 'w').write('x')"
    assert run_sandboxed(write, "main", {}, LIMITS)["reason"] == "file_write" and not escape.exists()
    inside = "def main():\n    open('scratch.txt', 'w').write('ok')\n    return open('scratch.txt').read()"
    assert run_sandboxed(inside, "main", {}, LIMITS) == {"ok": True, "value": "ok", "stdout": ""}


def test_bad_functions_are_rejected_with_their_reason_and_the_run_goes_on(tmp_path):
    folder = tmp_path / "functions"
    folder.mkdir()
    for name, code in BAD.items():
        (folder / name).write_text(code)
    (folder / "broken.py").write_text("def main(:\n")
    manifest = build_codeio(
        CodeIOSpec(
            functions_dir=str(folder), out=str(tmp_path / "out"), timeout_s=2, memory_mb=256, max_output_chars=1000
        )
    )
    assert manifest["rejected"] == {
        "raised": 1,
        "timeout": 1,
        "huge_output": 1,
        "not_serializable": 1,
        "memory": 1,
        "bad_source": 1,
    }
    assert manifest["rows"] == 4 and manifest["by_direction"] == {"output": 2, "input": 2}  # good.py, both ways
    rows = [json.loads(line) for line in open(tmp_path / "out" / "codeio.jsonl", encoding="utf-8")]
    assert {r["Response"] for r in rows if r["direction"] == "output"} == {"[1, 3]", "[2, 5]"}
    rejects = [json.loads(line) for line in open(tmp_path / "out" / "rejects.jsonl", encoding="utf-8")]
    assert {r["function"] for r in rejects} == {
        "raises.py",
        "loops.py",
        "prints.py",
        "returns_set.py",
        "hog.py",
        "broken.py",
    }


def test_input_prediction_is_verified_by_running_it():
    code = BAD["good.py"]
    assert verify(code, "input", {"a": 1, "b": 3}, [1, 3], LIMITS)[0]
    assert verify(code, "input", {"a": 3, "b": 1}, [1, 3], LIMITS)[0]  # another input with the same output
    ok, feedback = verify(code, "input", {"a": 0, "b": 3}, [1, 3], LIMITS)
    assert not ok and "returns [0, 3]" in feedback
    ok, feedback = verify(code, "input", {"c": 1}, [1, 3], LIMITS)
    assert not ok and "raised" in feedback
    assert verify(code, "output", [1, 3], [1, 3], LIMITS)[0] and not verify(code, "output", [3, 1], [1, 3], LIMITS)[0]


def test_answers_are_parsed_after_the_reasoning():
    assert parse_answer("<think>a + b</think>\nAnswer: [1, 3]") == [1, 3]
    assert parse_answer('Reasoning...\nAnswer: ```json\n{"a": 1}\n``` done') == {"a": 1}
    assert parse_answer("Answer: 1 then Answer: 2 and more words") == 2
    assert parse_answer("no answer here") is None


def test_starter_functions_build_both_directions(tmp_path):
    manifest = build_codeio(CodeIOSpec(functions_dir="data_prep/codeio_functions", out=str(tmp_path)))
    assert manifest["functions"] == 8 and manifest["rejected"] == {}
    assert manifest["by_direction"]["output"] == manifest["by_direction"]["input"] >= 24


def test_teacher_path_with_the_tiny_local_model(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "good.py").write_text(BAD["good.py"])
    spec = CodeIOSpec(
        functions_dir=str(folder),
        out=str(tmp_path / "out"),
        teacher=TeacherConfig(kind="local", model="tiny", max_new_tokens=24, revise=True),
    )
    manifest = build_codeio(spec)
    assert manifest["verified"] + manifest["revised"] + manifest["failed"] == manifest["questions"] == 4
    assert manifest["rows"] == manifest["verified"] + manifest["revised"]  # only answers execution confirmed
    assert manifest["schema"] == "medical_o1"


def test_openai_teacher_needs_its_key_from_the_environment(monkeypatch, tmp_path):
    from data_prep.codeio import Teacher
    from train.core.errors import UserError

    monkeypatch.delenv("CODEIO_TEST_KEY", raising=False)
    with pytest.raises(UserError, match=r"\$CODEIO_TEST_KEY"):
        Teacher(TeacherConfig(kind="openai", url="http://127.0.0.1:9/v1", model="m", api_key_env="CODEIO_TEST_KEY"))
