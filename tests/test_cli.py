"""User mistakes end in one clear line naming the file, column or key, and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO, write_jsonl

from train.cli import main as train_main


def run_cli(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train_main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


def write_recipe(tmp_path, stage1_dict, **changes) -> str:
    for dotted, value in changes.items():
        node = stage1_dict
        *parents, key = dotted.split("__")
        for part in parents:
            node = node[part]
        node[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(stage1_dict, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_missing_recipe(capsys, tmp_path):
    assert "recipe not found" in run_cli(capsys, ["sft", str(tmp_path / "nope.yaml")])


def test_missing_data_file(capsys, tmp_path, stage1_dict):
    stage1_dict["data"]["sources"][0]["path"] = str(tmp_path / "missing.json")
    line = run_cli(capsys, ["sft", write_recipe(tmp_path, stage1_dict)])
    assert "data file not found" in line and "missing.json" in line


def test_empty_dataset(capsys, tmp_path, stage1_dict):
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    stage1_dict["data"]["sources"][0]["path"] = str(tmp_path / "empty.jsonl")
    assert "the sources hold no rows" in run_cli(capsys, ["sft", write_recipe(tmp_path, stage1_dict)])


def test_missing_column(capsys, tmp_path, stage1_dict):
    write_jsonl(tmp_path / "m.jsonl", [{"Question": "Q?", "Complex_CoT": "C"}] * 3)
    stage1_dict["data"]["sources"][0]["path"] = str(tmp_path / "m.jsonl")
    assert "column 'Response' is missing" in run_cli(capsys, ["sft", write_recipe(tmp_path, stage1_dict)])


def test_unknown_template_and_model(capsys, tmp_path, stage1_dict):
    path = write_recipe(tmp_path, stage1_dict)
    assert "'data.template' is 'alpaca'" in run_cli(capsys, ["sft", path, "data.template=alpaca"])
    line = run_cli(capsys, ["sft", path, "model.name_or_path=no-such-org/no-such-model"])
    assert "cannot load tokenizer 'no-such-org/no-such-model'" in line


def test_misspelled_override(capsys, tmp_path, stage1_dict):
    line = run_cli(capsys, ["sft", write_recipe(tmp_path, stage1_dict), "training.lerning_rate=1e-4"])
    assert "unknown key 'training.lerning_rate'" in line and "learning_rate" in line


def test_real_cli_process_exits_2_with_one_line(tmp_path, stage1_dict):
    stage1_dict["data"]["sources"][0]["path"] = str(tmp_path / "missing.json")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "train", "sft", write_recipe(tmp_path, stage1_dict)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: data file not found")
    assert "Traceback" not in proc.stderr
    # bitsandbytes' note about an optional CPU kernel package used to precede every error line
    assert "gemm_4bit_forward" not in proc.stderr and "kernels-community" not in proc.stderr


def test_unreachable_hub_fails_at_once_instead_of_retrying(tmp_path):
    """A Hub id on a machine without network: one warning and one error line, not a minute of back-off."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(OMP_NUM_THREADS="1", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # nothing listens
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(proxy, None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "train",
            "pick-strategy",
            "recipes/stage1_medical.yaml",
            "--gpus",
            "1",
            "--gpu-memory-gb",
            "24",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Retrying" not in proc.stderr
    assert "unreachable" in proc.stderr and "using the local HF cache only" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read the config of 'deepseek-ai/")


def test_reachable_hub_stays_online(monkeypatch):
    import socket

    import huggingface_hub.constants as hub_constants

    from train.core.hub import offline_unless_hub_reachable

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    offline_unless_hub_reachable.cache_clear()
    try:
        assert offline_unless_hub_reachable() is True
        assert hub_constants.HF_HUB_OFFLINE is False
    finally:
        offline_unless_hub_reachable.cache_clear()
        listener.close()
