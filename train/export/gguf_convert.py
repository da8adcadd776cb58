"""Run llama.cpp's own `convert_hf_to_gguf.py`, teaching it one tokenizer it cannot know and one config
name that transformers no longer writes.

    python -m train.export.gguf_convert LLAMA_CPP_DIR MODEL_DIR --outtype f16 --outfile model-f16.gguf

`train export` runs this in a subprocess; every argument after LLAMA_CPP_DIR goes to the converter
unchanged. The converter names a BPE pre-tokenizer by hashing the token ids a fixed text encodes
to, so a freshly trained vocabulary (the embedded tiny model's) matches no known hash even though it
splits text with Qwen2's exact regex. This wrapper answers "qwen2" for such a tokenizer and nothing
else: the hash lookup runs first, and any other unknown tokenizer still fails as upstream does.
`train export` then checks that llama.cpp and transformers tokenize Korean and English identically.

GPT-2: the converter reads the context length from `n_ctx`, which GPT2Config (transformers 5) no longer
has; it is `n_positions` (the learned position table), the same number in every GPT-2 config that has
both, so the wrapper supplies it where it is missing.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

from train.models.tiny import QWEN2_SPLIT_REGEX


def splits_like_qwen2(model_dir: Path) -> bool:
    """True when tokenizer.json pre-tokenizes exactly as Qwen2's does (Split regex, then ByteLevel)."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [])
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return False
    split, byte_level = steps
    return (
        split.get("type") == "Split"
        and split.get("pattern", {}).get("Regex") == QWEN2_SPLIT_REGEX
        and split.get("behavior") == "Isolated"
        and byte_level.get("type") == "ByteLevel"
        and byte_level.get("use_regex") is False
    )


def _patch(text_model_cls, model_dir: Path) -> None:
    original = text_model_cls.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if splits_like_qwen2(model_dir):
                return "qwen2"
            raise

    text_model_cls.get_vocab_base_pre = get_vocab_base_pre


def _patch_hparams(model_base_cls) -> None:
    original = model_base_cls.load_hparams

    def load_hparams(*args, **kwargs):
        hparams = original(*args, **kwargs)
        if hparams.get("model_type") == "gpt2" and "n_ctx" not in hparams and "n_positions" in hparams:
            hparams["n_ctx"] = hparams["n_positions"]
        return hparams

    model_base_cls.load_hparams = staticmethod(load_hparams)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m train.export.gguf_convert LLAMA_CPP_DIR MODEL_DIR [converter args...]")
    llama_cpp_dir = Path(argv[0]).resolve()
    model_dir = Path(argv[1])
    script = llama_cpp_dir / "convert_hf_to_gguf.py"
    sys.path.insert(0, str(llama_cpp_dir))
    sys.path.insert(1, str(llama_cpp_dir / "gguf-py"))
    if (llama_cpp_dir / "conversion" / "__init__.py").is_file():  # llama.cpp 2026+: classes in a package
        from conversion import base

        _patch(base.TextModel, model_dir)
        _patch_hparams(base.ModelBase)
        sys.argv = [str(script), *argv[1:]]
        runpy.run_path(str(script), run_name="__main__")
    else:  # older checkouts: one big script
        module = runpy.run_path(str(script), run_name="convert_hf_to_gguf")
        _patch(module["TextModel"], model_dir)
        _patch_hparams(module["ModelBase"])
        sys.argv = [str(script), *argv[1:]]
        module["main"]()


if __name__ == "__main__":
    main(sys.argv[1:])
