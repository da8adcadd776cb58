"""llama.cpp generation from a GGUF file (llama-cpp-python, the export extra): greedy or sampling."""

from __future__ import annotations

import os

from train.core.config import DecodingConfig
from train.core.errors import UserError
from train.inference.targets import Target

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # pinned in pyproject's `export` extra; its sdist carries the converter


def import_llama_cpp():
    """llama_cpp, or one line saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError(
            "GGUF quantization and parity checks need llama-cpp-python: run `make install-export` "
            f"(builds llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} for this CPU, ~6 min on 2 cores)"
        ) from None
    return llama_cpp


def gguf_chat_formatter(llm):
    """The GGUF's own chat template as llama-cpp-python renders it for a chat request (the formatter `Llama`
    registers as `chat_template.default`, with the file's EOS and BOS texts), or None when the file has none."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        return None
    eos, bos = llm.token_eos(), llm.token_bos()
    text = llm._model.token_get_text  # noqa: SLF001 - llama-cpp-python's own way to name a token
    return Jinja2ChatFormatter(template, eos_token=text(eos), bos_token=text(bos) if bos >= 0 else "")


class LlamaCppGenerator:
    """llama.cpp on a GGUF file (the export extra): greedy or sampling; llama.cpp has no beam search."""

    def __init__(self, target: Target):
        self.llm = import_llama_cpp().Llama(
            str(target.path), n_ctx=4096, logits_all=True, verbose=False, n_threads=os.cpu_count() or 1
        )
        self.formatter = gguf_chat_formatter(self.llm)

    def render(self, question: str) -> str:
        if self.formatter is None:
            return question
        return self.formatter(messages=[{"role": "user", "content": question}]).prompt

    def generate(self, prompts: list[str], dec: DecodingConfig, batch_size: int) -> list[list[tuple[str, float]]]:
        if dec.num_beams > 1:
            raise UserError(
                f"decoding '{dec.name}': llama.cpp (GGUF) has no beam search; use greedy or sampling, or "
                "evaluate the merged model for beams"
            )
        results = []
        for prompt in prompts:
            ids = self.llm.tokenize(prompt.encode(), add_bos=False, special=True)
            candidates = []
            for i in range(dec.num_return_sequences):
                self.llm.reset()
                reply = self.llm.create_completion(
                    ids,
                    max_tokens=dec.max_new_tokens,
                    temperature=dec.temperature if dec.do_sample else 0.0,
                    top_k=dec.top_k if dec.do_sample else 1,
                    top_p=dec.top_p,
                    repeat_penalty=dec.repetition_penalty,
                    seed=dec.seed + i,
                    logprobs=1,
                )
                choice = reply["choices"][0]
                candidates.append((choice["text"], float(sum(choice["logprobs"]["token_logprobs"] or [0.0]))))
            results.append(candidates)
        return results
