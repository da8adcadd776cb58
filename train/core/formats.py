"""Prompt formats: how a question becomes the prompt a model trained on, the same for data prep,
generation, evaluation and the chat template written into merged and GGUF models.

- `reasoning`: the team's notebook template (stage 1):

      ### Instruction:
      {system}

      ### Question:
      {question}

      ### Response:
      <think>
      {reasoning}
      </think>
      {answer}<eos>

- `chat`: the tokenizer's own chat template (R1-distill: `<｜User｜>...<｜Assistant｜><think>\\n`).
"""

from __future__ import annotations

import re

from train.core.errors import UserError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)
REASONING_PROMPT = "### Instruction:\n{system}\n\n### Question:\n{question}\n\n### Response:\n"


def render_prompt(question: str, system: str, template: str, tokenizer) -> str:
    """The prompt text for a question, exactly as training renders it (used by generation too)."""
    if template == "reasoning":
        bos = tokenizer.bos_token or ""
        return bos + REASONING_PROMPT.format(system=system, question=question)
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                f"data.template is 'chat' but tokenizer '{tokenizer.name_or_path}' has no chat template; "
                "use data.template: reasoning"
            )
        messages = [{"role": "user", "content": question}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise UserError(f"unknown template '{template}' (use reasoning or chat)")


def reasoning_chat_template(default_system: str) -> str:
    """A Jinja chat template that renders exactly what the `reasoning` template trains on.

    Written here because no tokenizer ships one: a merged or GGUF model of a reasoning-template
    stage must be prompted the way it was trained, and chat front ends (llama.cpp, Ollama,
    transformers pipelines) read the tokenizer's chat template. A conversation of one question
    renders to `render_prompt(question, system, "reasoning", tokenizer)`; each assistant turn is
    its content followed by EOS, as in training; later questions repeat the Question/Response pair.
    """
    system = default_system.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return (
        "{%- set ns = namespace(system='" + system + "') -%}"
        "{%- for m in messages if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endfor -%}"
        "{{- bos_token if bos_token else '' -}}"
        "{{- '### Instruction:\\n' + ns.system + '\\n\\n' -}}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{- '### Question:\\n' + m['content'] + '\\n\\n### Response:\\n' -}}"
        "{%- elif m['role'] == 'assistant' -%}{{- m['content'] + eos_token -}}"
        "{%- if not loop.last -%}{{- '\\n\\n' -}}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
