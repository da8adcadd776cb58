"""Faults around merge, export and the Hub: a hanging name lookup, proxies, credentials in URLs, an unreachable
Hub before --push-to-hub, a failed final rename, a foreign `<out>.tmp`, and a received stage folder whose
stage.json asks for trust_remote_code."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, train_tiny_stage, write_jsonl

from train.core.errors import UserError

PROXY_VARIABLES = [
    v for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY") for v in (name, name.lower())
] + ["REQUEST_METHOD"]


# --- The Hub probe ---------------------------------------------------------------------------------------


@pytest.fixture
def probe(monkeypatch, caplog):
    """A fresh, online-looking process for offline_unless_hub_reachable(): no proxies, no HF_HUB_OFFLINE, the
    trainer's log captured; everything the probe changes is put back afterwards."""
    import huggingface_hub.constants as hub_constants

    from train.core.hub import FALLBACK_VARIABLE, offline_unless_hub_reachable

    for name in [*PROXY_VARIABLES, "HF_HUB_OFFLINE", FALLBACK_VARIABLE]:
        monkeypatch.setenv(name, "x")  # recorded, so that the teardown restores (or removes) it
        monkeypatch.delenv(name)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    try:
        import datasets.config

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    except ImportError:
        pass
    trainer = logging.getLogger("trainer")  # propagate=False: caplog's handler is attached to it directly
    trainer.addHandler(caplog.handler)
    offline_unless_hub_reachable.cache_clear()

    def run(endpoint: str) -> bool:
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # as a fresh process would start
        monkeypatch.setattr(hub_constants, "ENDPOINT", endpoint)
        offline_unless_hub_reachable.cache_clear()
        return offline_unless_hub_reachable()

    yield run
    offline_unless_hub_reachable.cache_clear()
    trainer.removeHandler(caplog.handler)


@pytest.fixture
def listener():
    """A local TCP port that accepts connections: a reachable "Hub" or "proxy"."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    yield sock
    sock.close()


def _dead_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    return port


def test_probe_is_bounded_when_the_name_lookup_hangs(probe, monkeypatch):
    """A dead DNS server: getaddrinfo blocks for 30 s; the probe gives up after its 5 s, lookup included."""
    import huggingface_hub.constants as hub_constants

    release = threading.Event()

    def hanging_getaddrinfo(*args, **kwargs):
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging_getaddrinfo)
    start = time.monotonic()
    try:
        assert probe("https://hub.example.invalid") is False
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert elapsed < 6.5, f"the probe took {elapsed:.1f} s"
    assert hub_constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"


def test_probe_goes_through_the_proxy_and_never_logs_its_password(probe, monkeypatch, listener, caplog):
    port = listener.getsockname()[1]
    asked = []
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: asked.append(host) or real(host, *a, **k))
    monkeypatch.setenv("HTTPS_PROXY", f"http://proxyuser:s3cret-proxy@127.0.0.1:{port}")
    # The endpoint's own name does not resolve: only the proxy is contacted, as the libraries would do.
    assert probe("https://hub.example.invalid") is True
    listener.settimeout(2)
    listener.accept()[0].close()
    assert asked == ["127.0.0.1"]
    assert f"through the proxy http://127.0.0.1:{port}" in caplog.text
    assert "s3cret" not in caplog.text and "proxyuser" not in caplog.text

    monkeypatch.setenv("HTTPS_PROXY", f"http://proxyuser:s3cret-proxy@127.0.0.1:{_dead_port()}")
    assert probe("https://hub.example.invalid") is False  # a dead proxy: offline, and said so
    assert "unreachable through the proxy http://127.0.0.1:" in caplog.text
    assert "s3cret" not in caplog.text + os.environ.get("TRAIN_HUB_UNREACHABLE", "")


def test_no_proxy_covering_the_endpoint_probes_it_directly(probe, monkeypatch, listener):
    endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
    dead_proxy = f"http://127.0.0.1:{_dead_port()}"
    monkeypatch.setenv("HTTP_PROXY", dead_proxy)
    monkeypatch.setenv("HTTPS_PROXY", dead_proxy)
    assert probe(endpoint) is False  # the proxy applies, and it is dead
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    assert probe(endpoint) is True  # NO_PROXY: straight to the endpoint, which answers


def test_endpoint_credentials_are_never_logged(probe, caplog):
    port = _dead_port()
    assert probe(f"http://hubuser:hunter2-token@127.0.0.1:{port}/mirror?token=abc") is False
    assert f"the Hub (http://127.0.0.1:{port}) was unreachable" in caplog.text
    leaked = caplog.text + os.environ["TRAIN_HUB_UNREACHABLE"]
    assert "hunter2" not in leaked and "hubuser" not in leaked and "token=abc" not in leaked


def test_push_to_hub_says_the_hub_was_unreachable_not_unset_a_variable(probe, monkeypatch):
    import huggingface_hub.constants as hub_constants

    from train.export.hub import hub_token

    monkeypatch.setenv("HF_TOKEN", "hf_SENTINEL_probe")
    port = _dead_port()
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://u:pw-secret@127.0.0.1:{port}")
    with pytest.raises(UserError) as err:
        hub_token()
    message = str(err.value)
    assert f"the Hub (http://127.0.0.1:{port}) was unreachable when probed" in message
    assert "not a setting of yours" in message and "HTTPS_PROXY" in message
    assert "unset HF_HUB_OFFLINE" not in message and "pw-secret" not in message and "\n" not in message

    # The user's own HF_HUB_OFFLINE (not our fallback) is named as theirs.
    monkeypatch.delenv("TRAIN_HUB_UNREACHABLE")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1 in your environment: unset HF_HUB_OFFLINE"):
        hub_token()


def test_merge_push_to_hub_with_an_unreachable_hub_fails_before_the_merge(tmp_path):
    """The command as a user runs it: one error line, before any work, naming the Hub without credentials."""
    env = {k: v for k, v in os.environ.items() if k not in (*PROXY_VARIABLES, "HF_HUB_OFFLINE")}
    port = _dead_port()
    env.update(OMP_NUM_THREADS="1", HF_TOKEN="hf_SENTINEL_cli", HF_ENDPOINT=f"http://u:pw-secret@127.0.0.1:{port}")
    proc = subprocess.run(
        [sys.executable, "-m", "train", "merge", str(tmp_path / "stage"), "--out", str(tmp_path / "m")]
        + ["--push-to-hub", "team/x"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --push-to-hub: the Hub (http://127.0.0.1:{port}) was unreachable"), last
    assert "pw-secret" not in proc.stderr and "hf_SENTINEL" not in proc.stderr and not (tmp_path / "m").exists()


# --- Replacing an output folder ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    train_tiny_stage("stage1_medical", root / "stage1", root / "data1", max_steps=2, logging_steps=1)
    return root / "stage1"


def test_a_failed_final_rename_keeps_the_previous_output(stage, tmp_path, monkeypatch):
    from train.core.io import TMP_MARKER
    from train.export.merge import merge_stage

    out = tmp_path / "merged"
    merge_stage(stage, out, dtype="float32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert TMP_MARKER not in before
    tmp = out.with_name("merged.tmp")
    real_rename = Path.rename

    def failing_rename(self, target):
        if Path(self) == tmp:
            raise OSError(5, "Input/output error")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(UserError, match=r"could not move .*merged\.tmp .*; .*merged is unchanged"):
        merge_stage(stage, out, dtype="bfloat16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert (tmp / TMP_MARKER).is_file()  # the new files are kept, marked as ours
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "merged.tmp"]  # nothing renamed aside left

    monkeypatch.undo()  # the next run takes its own leftover tmp back and replaces the output
    report = merge_stage(stage, out, dtype="bfloat16")
    assert json.loads((out / "merge_report.json").read_text())["dtype"] == "bfloat16" == report["dtype"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no tmp, no renamed-aside copy left
    assert not (out / TMP_MARKER).exists() and TMP_MARKER not in report["files"]


def test_a_foreign_tmp_folder_is_never_deleted(stage, tmp_path):
    from train.export.gguf import export_gguf
    from train.export.merge import merge_stage

    foreign = tmp_path / "merged.tmp"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("someone's work")
    with pytest.raises(UserError, match=r"merged\.tmp exists and was not left by this command .*move it away"):
        merge_stage(stage, tmp_path / "merged", dtype="float32")
    assert (foreign / "notes.txt").read_text() == "someone's work" and not (tmp_path / "merged").exists()

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "gguf.tmp").write_text("a file of someone's")
    with pytest.raises(UserError, match=r"gguf\.tmp exists and is not a folder this command left"):
        export_gguf(model, ["f16"])  # refused before looking for llama.cpp or loading anything
    assert (model / "gguf.tmp").read_text() == "a file of someone's"


# --- trust_remote_code from a received stage.json -------------------------------------------------------


@pytest.fixture
def remote_code_stage(stage, tmp_path):
    """The trained stage as received from someone else, its stage.json asking for trust_remote_code."""
    received = tmp_path / "received"
    shutil.copytree(stage, received, ignore=shutil.ignore_patterns("checkpoint-*"))
    info = json.loads((received / "stage.json").read_text())
    info["recipe"]["model"]["trust_remote_code"] = True
    (received / "stage.json").write_text(json.dumps(info))
    return received


def test_stored_trust_remote_code_needs_the_flag(remote_code_stage, tmp_path, capsys):
    from train.cli import main
    from train.core.config import EvalConfig
    from train.evaluation.lm_eval import run_lm_eval
    from train.evaluation.task_eval import run_eval
    from train.export.merge import merge_stage
    from train.inference.hf import load_stage_model

    refusal = rf"{remote_code_stage / 'stage.json'} sets model.trust_remote_code: true .* pass --trust-remote-code"
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "answer": "a"}])

    for attempt in (
        lambda: merge_stage(remote_code_stage, tmp_path / "m"),
        lambda: load_stage_model(remote_code_stage),
        lambda: run_eval([str(remote_code_stage)], EvalConfig(), tmp_path / "eval", data=str(data)),
        lambda: run_lm_eval(str(remote_code_stage), ["kormedmcqa_sample"], tmp_path / "lme"),
    ):
        with pytest.raises(UserError, match=refusal):
            attempt()
    assert not (tmp_path / "m").exists() and not (tmp_path / "eval").exists()

    for command in (["generate", str(remote_code_stage), "--prompt", "hi"], ["merge", str(remote_code_stage)]):
        with pytest.raises(SystemExit) as exit_:
            main(command)
        assert exit_.value.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert (
            line.startswith("error: ")
            and "stage.json sets model.trust_remote_code: true" in line
            and "--trust-remote-code" in line
        )

    # With the user's flag, the same folder loads and generates.
    main(["generate", str(remote_code_stage), "--prompt", "hi", "--max-new-tokens", "2", "--trust-remote-code"])
    assert capsys.readouterr().out.startswith("### hi")
    report = merge_stage(remote_code_stage, tmp_path / "m", dtype="float32", trust_remote_code=True)
    assert report["merged_vs_base_plus_adapter"]["relative_diff"] < 1e-4
