"""The team's chat page, a Streamlit app in front of `train serve` (any OpenAI-compatible server).

    python -m train serve outputs/demo/merged/gguf/stage2_korean-q4_k_m.gguf     # terminal 1
    python -m train chat --server http://127.0.0.1:8000                          # terminal 2: http://127.0.0.1:8501

Streamlit rather than Gradio: it is what the team's notes use, and Gradio's current release needs pillow < 13,
which conflicts with the pinned set (constraints.txt). Answers stream in; the reasoning shows in a collapsible
block above the answer; the sidebar holds the system prompt and the eval's decoding choices (greedy, beam, top-k,
top-p, temperature). The API key, if the server wants one, comes from SERVE_API_KEY in the environment.
"""

import argparse
import os
import time

import openai
import streamlit as st

from train.serve.client import STRATEGIES, decoding_for, stream_answer


def _server() -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", default="http://127.0.0.1:8000")
    return parser.parse_known_args()[0].server.rstrip("/")


@st.cache_resource
def _client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=os.environ.get("SERVE_API_KEY") or "none", max_retries=0)


def _show(message: dict) -> None:
    with st.chat_message(message["role"]):
        if message.get("reasoning"):
            with st.expander("Reasoning (생각)", expanded=False):
                st.markdown(message["reasoning"])
        st.markdown(message["content"])


server = _server()
client = _client(server)
st.set_page_config(page_title="Model chat", page_icon=":speech_balloon:")
st.title("Model chat")

with st.sidebar:
    try:
        models = [m.id for m in client.models.list().data]
    except openai.APIError as exc:
        st.error(f"cannot reach {server}: {exc}")
        st.stop()
    model = st.selectbox("Model", models)
    system = st.text_area("System prompt (empty: the one the stage trained with)", "")
    strategy = st.selectbox("Decoding", STRATEGIES, help="as in `train eval --decoding`")
    values = {"max_new_tokens": st.slider("Max new tokens", 16, 4096, 512, step=16)}
    if strategy in ("top-k", "top-p", "temperature"):
        values["temperature"] = st.slider("Temperature", 0.05, 2.0, 0.7, step=0.05)
    if strategy == "top-k":
        values["top_k"] = st.slider("Top-k", 1, 200, 40)
    if strategy == "top-p":
        values["top_p"] = st.slider("Top-p", 0.05, 1.0, 0.9, step=0.05)
    if strategy == "beam":
        values["num_beams"] = st.slider("Beams", 2, 8, 3)
    if st.button("New conversation"):
        st.session_state.messages = []
    st.caption(f"Server: {server}")

st.session_state.setdefault("messages", [])
for past in st.session_state.messages:
    _show(past)

question = st.chat_input("질문을 입력하세요 / Ask a question")
if question:
    st.session_state.messages.append({"role": "user", "content": question})
    _show(st.session_state.messages[-1])
    history = [{"role": m["role"], "content": m["content"]} for m in st.session_state.messages]
    if system.strip():
        history.insert(0, {"role": "system", "content": system.strip()})
    with st.chat_message("assistant"):
        thinking = st.expander("Reasoning (생각)", expanded=False)
        reasoning_box, answer_box = thinking.empty(), st.empty()
        parts, start, pieces = {"reasoning": "", "content": ""}, time.perf_counter(), 0
        try:
            for field, text in stream_answer(client, model, history, decoding_for(strategy, **values)):
                parts[field] += text
                pieces += 1
                (reasoning_box if field == "reasoning" else answer_box).markdown(parts[field] + " ▌")
        except openai.APIStatusError as exc:
            st.error(f"{exc.status_code}: {exc.body.get('message') if isinstance(exc.body, dict) else exc.message}")
        except openai.APIConnectionError as exc:
            st.error(f"cannot reach {server}: {exc}")
        reasoning_box.markdown(parts["reasoning"] or "(none)")
        answer_box.markdown(parts["content"])
        st.caption(f"answered: {pieces} pieces in {time.perf_counter() - start:.1f} s ({strategy})")
    st.session_state.messages.append(
        {"role": "assistant", "content": parts["content"], "reasoning": parts["reasoning"]}
    )
