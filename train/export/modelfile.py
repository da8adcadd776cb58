"""An Ollama Modelfile beside each GGUF file: `ollama create NAME -f stage2-q4_k_m.Modelfile`.

Ollama prompts with a Go text/template, not the tokenizer's Jinja, and nobody converts Jinja to Go in general
(Ollama and Unsloth keep tables of hand-written Go templates per model family). So do we: one Go template per
chat template this project produces, each written beside the Jinja it mirrors and recognised by exact match:

- `reasoning` stages: the Jinja comes from `train.core.formats.reasoning_chat_template(system)`; the Go template
  is built from the same system text, so a stage's two templates cannot drift;
- R1-style chat templates (`<｜User｜>`/`<｜Assistant｜>`, the generation prompt opening `<think>`), as the embedded
  tiny tokenizer ships: earlier assistant turns keep their text and end with EOS, as in the Jinja.

A template not in the table gets no TEMPLATE line (Ollama then matches the GGUF's own chat template against
its library) and the export report says so. tests/test_serve.py renders each Go template with Go's own
text/template, given the variables Ollama gives (`.System` = the system messages joined, `.Messages`), and
compares with transformers' rendering of the Jinja for several conversations.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from train.core.formats import THINK_OPEN, reasoning_chat_template

_REASONING_SYSTEM = re.compile(r"^\{%- set ns = namespace\(system='((?:[^'\\]|\\.)*)'\) -%\}")
R1_USER, R1_ASSISTANT = "<｜User｜>", "<｜Assistant｜>"


def _go_string(text: str) -> str:
    """A Go template string literal (JSON's escapes are Go's)."""
    return json.dumps(text, ensure_ascii=False)


def _reasoning_system(template: str) -> str | None:
    """The default system text when `template` is exactly a `reasoning` stage's template, else None."""
    match = _REASONING_SYSTEM.match(template)
    if not match:
        return None
    system = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), match.group(1))
    return system if reasoning_chat_template(system) == template else None


# Both Go templates are one line without trim markers ({{- ... -}}): every newline in them is prompt text.
def _reasoning_go(system: str, bos: str, eos: str) -> str:
    return (
        "{{ $system := " + _go_string(system) + " }}"
        '{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
        + bos
        + "### Instruction:\n{{ $system }}\n\n"
        "{{ range $i, $m := .Messages }}"
        '{{ if eq .Role "user" }}### Question:\n{{ .Content }}\n\n### Response:\n'
        '{{ else if eq .Role "assistant" }}{{ .Content }}'
        + eos
        + "{{ if gt (len (slice $.Messages $i)) 1 }}\n\n{{ end }}"
        "{{ end }}{{ end }}"
    )


def _r1_go(bos: str, eos: str, opens_think: bool) -> str:
    return (
        bos + "{{ range $i, $m := .Messages }}"
        '{{ if eq .Role "system" }}{{ if eq $i 0 }}{{ .Content }}{{ end }}'
        '{{ else if eq .Role "user" }}' + R1_USER + "{{ .Content }}"
        '{{ else if eq .Role "assistant" }}'
        + R1_ASSISTANT
        + "{{ .Content }}"
        + eos
        + "{{ end }}{{ end }}"
        + R1_ASSISTANT
        + (f"{THINK_OPEN}\n" if opens_think else "")
    )


def ollama_template(chat_template: str | None, bos: str, eos: str) -> tuple[str | None, str, list[str]]:
    """(Go template or None, the family it was recognised as, extra stop strings)."""
    if not chat_template:
        return None, "none", []
    system = _reasoning_system(chat_template)
    if system is not None:
        return _reasoning_go(system, bos, eos), "reasoning", ["### Question:", "### Instruction:"]
    r1_generation = f"{R1_ASSISTANT}{THINK_OPEN}\n"
    if R1_USER in chat_template and R1_ASSISTANT in chat_template and "tools" not in chat_template:
        return _r1_go(bos, eos, r1_generation in chat_template), "r1", [R1_USER]
    return None, "unknown", []


def _quote(text: str) -> str:
    if '"""' in text:
        raise ValueError("a Modelfile block cannot contain three double quotes")
    return f'"""{text}"""'


def write_modelfile(
    gguf: Path, chat_template: str | None, bos: str, eos: str, generation: dict, num_ctx: int = 4096
) -> dict:
    """Write `<gguf stem>.Modelfile` beside the file; return what went into it."""
    template, family, stops = ollama_template(chat_template, bos, eos)
    lines = [f"# Ollama: ollama create {gguf.stem} -f {gguf.stem}.Modelfile", f"FROM ./{gguf.name}"]
    if template is not None:
        lines.append(f"TEMPLATE {_quote(template)}")
    else:
        lines.append(f"# no TEMPLATE: this chat template ({family}) has no Go equivalent here; Ollama uses its own")
    for stop in [eos, *stops]:
        if stop:
            lines.append(f"PARAMETER stop {_go_string(stop)}")
    sampling = bool(generation.get("do_sample"))
    lines.append(f"PARAMETER temperature {generation.get('temperature', 0.6) if sampling else 0}")
    if sampling and generation.get("top_p") is not None:
        lines.append(f"PARAMETER top_p {generation['top_p']}")
    if sampling and generation.get("top_k"):
        lines.append(f"PARAMETER top_k {generation['top_k']}")
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    path = gguf.with_suffix(".Modelfile")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"file": path.name, "template_family": family, "stops": [eos, *stops]}
