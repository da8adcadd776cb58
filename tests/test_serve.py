"""Serving: the OpenAI-compatible server on a GGUF file, the reasoning split, the chat page in a real browser,
and the Ollama Modelfile rendered by Go's own text/template."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import REPO, _free_port, train_tiny_stage

from train.serve.client import decoding_for, request_params, wait_until_serving
from train.serve.reasoning import ReasoningSplitter, split_reasoning

QUESTION = "두통이 심하고 열이 나요. 어떻게 해야 하나요?"
API_KEY = "test-key-not-a-secret"
ARTIFACTS = REPO / "outputs" / "test-artifacts"


# --- the reasoning split (no server) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "opened", "expected"),
    [
        ("<think>\nWeigh causes.\n</think>\n해열제를 드세요.", False, ("Weigh causes.", "해열제를 드세요.")),
        ("Weigh causes.\n</think>\n\n해열제", True, ("Weigh causes.", "해열제")),  # R1: the prompt opened it
        ("<think>\n\n</think>\n답", False, (None, "답")),  # an empty think block
        ("바로 답합니다.", False, (None, "바로 답합니다.")),  # no think block: all content (vLLM: all reasoning)
        ("<think>\nstill thinking", False, ("still thinking", None)),  # cut off inside the block
        ("a </thin", True, ("a </thin", None)),
    ],
)
def test_reasoning_split_of_a_whole_answer(text, opened, expected):
    assert split_reasoning(text, opened) == expected


def test_streamed_pieces_join_to_the_whole_split():
    """However the answer is cut into pieces (tags split across them too), the streamed reasoning and content
    join to what the whole answer splits into."""
    rng = random.Random(0)
    texts = [
        "<think>\nFever and headache: infection first.  \n</think>\n해열제를 드시고 병원에 가세요. ",
        "  <think>a<b </think x</think>\n\n",
        "reasoning only, opened by the prompt </think>answer",
        "<thi",
        "",
    ]
    for text in texts:
        for opened in (False, True):
            whole = split_reasoning(text, opened)
            for _ in range(30):
                cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text), rng.randint(0, 6))))
                pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
                splitter, got = ReasoningSplitter(opened), {"reasoning": "", "content": ""}
                for piece in pieces:
                    for field, part in splitter.feed(piece):
                        got[field] += part
                for field, part in splitter.finish():
                    got[field] += part
                assert (got["reasoning"] or None, got["content"] or None) == whole, (text, pieces)


def test_the_page_decoding_choices_become_the_requests_the_eval_would_make():
    assert request_params(decoding_for("greedy", max_new_tokens=64)) == {"max_tokens": 64, "temperature": 0.0}
    top_k = request_params(decoding_for("top-k", temperature=0.8, top_k=20))
    assert top_k["temperature"] == 0.8 and top_k["extra_body"] == {"top_k": 20} and "top_p" not in top_k
    top_p = request_params(decoding_for("top-p", top_p=0.9))
    assert top_p["top_p"] == 0.9 and "extra_body" not in top_p
    beam = request_params(decoding_for("beam", num_beams=4))
    assert beam["temperature"] == 0.0 and beam["extra_body"]["use_beam_search"] and beam["extra_body"]["n"] == 4
    with pytest.raises(ValueError, match="choose from"):
        decoding_for("mirostat")


# --- a briefly trained stage, exported, served --------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Stage 1 (reasoning template) trained briefly, merged, exported to q8_0 GGUF with its Modelfile."""
    from train.export.gguf import export_gguf
    from train.export.merge import merge_stage

    root = tmp_path_factory.mktemp("serve")
    train_tiny_stage("stage1_medical", root / "stage1", root / "data1", max_steps=60, logging_steps=30)
    merge_stage(root / "stage1", root / "merged")
    report = export_gguf(root / "merged", ["q8_0"])
    (gguf,) = (root / "merged" / "gguf").glob("*.gguf")
    return root, gguf, report


@pytest.fixture(scope="module")
def server(exported):
    """`python -m train serve FILE` in its own process, with an API key from the environment."""
    _, gguf, _ = exported
    port = _free_port()
    env = {**os.environ, "SERVE_API_KEY": API_KEY, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "train",
        "serve",
        str(gguf),
        "--port",
        str(port),
        "--name",
        "medical",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/v1/models", proc, headers={"Authorization": f"Bearer {API_KEY}"})
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.e2e
def test_server_answers_korean_plain_and_streamed_with_the_think_block_apart(server):
    import openai
    import requests

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["medical"]
    messages = [{"role": "user", "content": QUESTION}]
    reply = client.chat.completions.create(model="medical", messages=messages, max_tokens=48, temperature=0)
    message = reply.choices[0].message
    reasoning = (message.model_extra or {}).get("reasoning_content")

    # What llama.cpp generated, unsplit: the library's own completion route on the very same prompt tokens.
    headers = {"Authorization": f"Bearer {API_KEY}"}
    prompt = requests.post(f"{server}/tokenize", json={"messages": messages}, headers=headers).json()
    raw = requests.post(
        f"{server}/v1/completions",
        json={"prompt": prompt["prompt"], "max_tokens": 48, "temperature": 0},
        headers=headers,
        timeout=120,
    ).json()["choices"][0]["text"]
    assert raw.lstrip().startswith("<think>"), raw  # the stage learned to open its think block
    assert (reasoning, message.content) == split_reasoning(raw, opened=False)
    assert "<think>" not in (message.content or "") and "</think>" not in (reasoning or "")

    streamed = {"reasoning": "", "content": ""}
    for chunk in client.chat.completions.create(
        model="medical", messages=messages, max_tokens=48, temperature=0, stream=True
    ):
        delta = chunk.choices[0].delta
        streamed["reasoning"] += (delta.model_extra or {}).get("reasoning_content") or ""
        streamed["content"] += delta.content or ""
    assert (streamed["reasoning"] or None, streamed["content"] or None) == (reasoning, message.content)

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.e2e
def test_server_prompts_exactly_as_training_did(server, exported):
    """The server's prompt for a one-question conversation is training's prompt, token for token: a row of the
    stage's own processed data, and a Korean question rendered by data_prep's code with the data's tokenizer."""
    import pyarrow.parquet as pq
    import requests
    from transformers import AutoTokenizer

    from data_prep.schemas import Record
    from data_prep.templates import render_texts, tokenize_pairs
    from train.inference.targets import stage_recipe

    root, _, _ = exported
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def served(question: str) -> dict:
        body = {"messages": [{"role": "user", "content": question}]}
        return requests.post(f"{server}/tokenize", json=body, headers=headers, timeout=30).json()

    row = pq.read_table(root / "data1" / "train.parquet").slice(0, 1).to_pylist()[0]
    prompt_ids = [t for t, m in zip(row["input_ids"], row["completion_mask"], strict=True) if m == 0]
    question = re.search(r"### Question:\n(.*)\n\n### Response:\n$", row["prompt"], re.DOTALL).group(1)
    assert served(question)["tokens"] == prompt_ids

    data = stage_recipe(root / "stage1").data
    manifest = json.loads((root / "data1" / "manifest.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(manifest["tokenizer"])
    record = Record(source="s", row_id="1", question=QUESTION, answer="-", reasoning="-")
    prompts, completions = render_texts([record], data.template, data.system_prompt, True, tokenizer)
    korean = served(QUESTION)
    assert korean["tokens"] == tokenize_pairs(prompts, completions, tokenizer)[0].prompt_ids
    assert korean["prompt"] == prompts[0]


@pytest.mark.e2e
def test_bad_requests_get_a_clear_4xx_and_the_server_stays_up(server):
    import requests

    url, headers = f"{server}/v1/chat/completions", {"Authorization": f"Bearer {API_KEY}"}
    ok = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4}
    cases = [
        ("{not json", 400, "JSON"),
        (json.dumps({**ok, "model": "gpt-4"}), 404, "not served here; this server serves 'medical'"),
        (json.dumps({**ok, "max_tokens": -5}), 400, "max_tokens must be at least 1"),
        (
            json.dumps({**ok, "messages": [{"role": "user", "content": "열 " * 5000}]}),
            400,
            "over this server's context",
        ),
        (json.dumps({**ok, "messages": []}), 400, "at least one message"),
        (json.dumps({**ok, "use_beam_search": True}), 400, "no beam search"),
        (json.dumps({**ok, "messages": "hello"}), 400, "invalid request body at messages"),
    ]
    for body, status, message in cases:
        reply = requests.post(
            url, data=body.encode(), headers={**headers, "Content-Type": "application/json"}, timeout=60
        )
        assert reply.status_code == status, (body[:80], reply.text)
        assert message in reply.json()["error"]["message"], reply.text
    assert requests.post(url, json=ok, headers=headers, timeout=60).status_code == 200


@pytest.mark.vllm
def test_vllm_serves_the_merged_folder_with_the_training_prompt(exported):
    """`train serve MERGED_DIR` starts vLLM's CPU build (make install-serve-vllm): a Korean answer plain and
    streamed, the think block apart (vLLM names it `reasoning`), the prompt equal to the GGUF server's."""
    import openai
    import requests

    from train.serve.client import reasoning_of

    root, gguf, _ = exported
    port = _free_port()
    env = {**os.environ, "SERVE_API_KEY": API_KEY, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "train", "serve", str(root / "merged"), "--port", str(port), "--name", "medical"]
    proc = subprocess.Popen([*cmd, "--n-ctx", "2048"], env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(f"{url}/health", proc, timeout=300)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        messages = [{"role": "user", "content": QUESTION}]
        message = client.chat.completions.create(model="medical", messages=messages, max_tokens=48, temperature=0)
        message = message.choices[0].message
        assert message.content or reasoning_of(message), message
        streamed = "".join(
            (c.choices[0].delta.content or "") + (reasoning_of(c.choices[0].delta) or "")
            for c in client.chat.completions.create(
                model="medical", messages=messages, max_tokens=48, temperature=0, stream=True
            )
            if c.choices
        )
        assert streamed == (reasoning_of(message) or "") + (message.content or "")
        served = requests.post(f"{url}/tokenize", json={"model": "medical", "messages": messages}, timeout=30).json()
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(root / "merged")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert served["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
        assert requests.get(f"{url}/v1/models", timeout=10).status_code == 401  # the key is required
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# --- the chat page in headless Chromium ---------------------------------------------------------------


@pytest.mark.e2e
def test_chat_page_streams_a_korean_answer_in_a_real_browser(server, tmp_path):
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download a driver
    import openai
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_bin, "Debian's chromium and chromium-driver are missing: run `make install-serve`"
    port = _free_port()
    env = {**os.environ, "SERVE_API_KEY": API_KEY}
    page = subprocess.Popen(
        [sys.executable, "-m", "train", "chat", "--server", server, "--port", str(port)], env=env, cwd=REPO
    )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new --no-sandbox --disable-gpu --window-size=1280,900 --no-first-run --disable-quic "
        "--disable-background-networking --disable-component-update --disable-sync"
    ).split():
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    browser = None
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/_stcore/health", page)
        browser = webdriver.Chrome(service=Service(driver_bin), options=options)
        browser.get(f"http://127.0.0.1:{port}")
        box = WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']")
        )
        box.send_keys(QUESTION)
        box.send_keys(Keys.ENTER)
        WebDriverWait(browser, 120).until(
            lambda b: any(
                "answered:" in e.text for e in b.find_elements(By.CSS_SELECTOR, "[data-testid='stCaptionContainer']")
            )
        )
        messages = browser.find_elements(By.CSS_SELECTOR, "[data-testid='stChatMessage']")
        messages[1].find_element(By.CSS_SELECTOR, "[data-testid='stExpander'] summary").click()  # open the reasoning
        time.sleep(1.5)  # the expander's opening animation, for the screenshot
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "chat_page.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        assert len(messages) == 2 and QUESTION in messages[0].text
        answer = messages[1]
        assert answer.find_elements(By.CSS_SELECTOR, "[data-testid='stExpander']"), "no collapsible reasoning block"
        assert re.search(r"answered: [1-9]\d* pieces", answer.text), answer.text
        assert not browser.find_elements(By.CSS_SELECTOR, "[data-testid='stAlert']"), "the page showed an error"
        # What the page streamed is what the server answers to the same request (greedy, no system prompt).
        client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
        reply = (
            client.chat.completions.create(
                model="medical", messages=[{"role": "user", "content": QUESTION}], max_tokens=512, temperature=0
            )
            .choices[0]
            .message
        )
        shown = " ".join(answer.text.split())
        for part in (reply.content, (reply.model_extra or {}).get("reasoning_content")):
            words = " ".join((part or "").split()[:4])
            assert words in shown, (words, shown)
    finally:
        if browser is not None:
            browser.quit()
        page.terminate()
        page.wait(timeout=30)


# --- Ollama: the Modelfile's Go template against the Jinja chat template ------------------------------


def _go_render(template: str, messages: list[dict]) -> str:
    go = shutil.which("go")
    assert go, "Go is missing (Debian's golang-go): run `make install-serve`"
    out = subprocess.run(
        [go, "run", "."],
        cwd=REPO / "tests" / "ollama_render",
        input=json.dumps({"template": template, "messages": messages}),
        capture_output=True,
        text=True,
        env={**os.environ, "GOFLAGS": "-mod=mod", "GOTOOLCHAIN": "local"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


CONVERSATIONS = [
    [{"role": "user", "content": QUESTION}],
    [{"role": "system", "content": "친절한 의사로 답하세요."}, {"role": "user", "content": QUESTION}],
    [
        {"role": "user", "content": "열이 나요"},
        {"role": "assistant", "content": "<think>\n감염?\n</think>\n해열제를 드세요."},
        {"role": "user", "content": 'Still "hot" {{ .System }}'},
    ],
]


@pytest.mark.e2e
def test_modelfile_prompts_as_the_chat_template_does(exported, tiny_dir):
    from transformers import AutoTokenizer

    from train.export.modelfile import ollama_template

    root, gguf, report = exported
    modelfile = gguf.with_suffix(".Modelfile").read_text(encoding="utf-8")
    assert f"FROM ./{gguf.name}" in modelfile and report["files"][gguf.name]["ollama"]["template_family"] == "reasoning"
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.DOTALL).group(1)
    tokenizer = AutoTokenizer.from_pretrained(root / "merged")
    assert f'PARAMETER stop "{tokenizer.eos_token}"' in modelfile
    # R1-style: the embedded tokenizer's own template, the family the team's 32B base uses.
    base = AutoTokenizer.from_pretrained(tiny_dir)
    r1, family, _ = ollama_template(base.chat_template, base.bos_token, base.eos_token)
    assert family == "r1"
    for tok, go_template in ((tokenizer, template), (base, r1)):
        for messages in CONVERSATIONS:
            expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert _go_render(go_template, messages) == expected
    assert ollama_template("{{ messages }}", "", "</s>")[:2] == (None, "unknown")
