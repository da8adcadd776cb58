"""The embedded default model: a tiny Qwen2ForCausalLM and a locally trained tokenizer.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on the bundled sample text
with Qwen2's pre-tokenizer regex (so transformers, raw `tokenizers` and llama.cpp split Korean
identically), carrying the special tokens of DeepSeek-R1-Distill-Qwen (BOS/EOS, User/Assistant,
<think>) and an R1-style chat template. The model has the real architecture (GQA, q/k/v biases,
untied head, hidden size 256 so GGUF k-quants apply) with seeded random weights.

Built once into `$TRAIN_CACHE/tiny-qwen2-<hash>` (default `.cache/` in the repository) and reused;
the hash covers the build spec and the corpus, so editing either rebuilds.

    python -m train build-tiny        # prints the folder
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from train.core.config import TINY_MODEL, TINY_MODELS, TINY_STUDENT
from train.core.formats import THINK_CLOSE, THINK_OPEN
from train.core.log import get_logger
from train.core.paths import REPO_ROOT

log = get_logger("tiny")

SAMPLES_DIR = REPO_ROOT / "data_prep" / "samples"

# Qwen2's pre-tokenizer split (from its tokenizer.json); llama.cpp recognises tokenizers built on it.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<|endoftext|>"  # distinct from EOS so EOS is never mistaken for padding
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT]
ADDED_TOKENS = [THINK_OPEN, THINK_CLOSE]  # plain added tokens, as in R1-distill

# R1-distill's template, reduced to what SFT and generation use. `{% generation %}` marks the
# assistant tokens so TRL's assistant_only_loss works with it too.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{{ bos_token }}{{ system }}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}" + USER + "{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    + ASSISTANT
    + "{% generation %}{{ message['content'] }}"
    + EOS
    + "{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}" + ASSISTANT + THINK_OPEN + "\n{% endif %}"
)

SPEC = {
    "version": 1,
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 768,  # multiple of 256: every matrix quantizes with k-quants
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "seed": 0,
    # A frozen random head at the usual std 0.02 caps logits near +-5 (|W_x| * |h| with |h| ~ 16 after
    # RMSNorm), so no LoRA update can make the model confident. 0.1 gives real pretrained heads' range.
    "lm_head_std": 0.1,
}
# Other embedded models with the same tokenizer, selected by name (model.name_or_path: tiny-student):
# each changes only the listed fields of SPEC. tiny-student is the smaller model a distillation test
# trains from a tiny teacher (half the layers, a narrower MLP; hidden size kept for GGUF k-quants).
VARIANTS = {
    TINY_MODEL: {},
    TINY_STUDENT: {"num_hidden_layers": 2, "intermediate_size": 512, "seed": 1},
}
assert set(VARIANTS) == set(TINY_MODELS)


def variant_spec(name: str = TINY_MODEL) -> dict:
    return {**SPEC, **VARIANTS[name]}


def corpus_files() -> list[Path]:
    files = sorted(p for p in SAMPLES_DIR.rglob("*") if p.suffix in {".json", ".jsonl", ".xlsx"})
    if not files:
        raise FileNotFoundError(f"no bundled sample data under {SAMPLES_DIR}")
    return files


def corpus_texts() -> list[str]:
    """Every text cell of the bundled samples (the tokenizer's training corpus)."""
    from openpyxl import load_workbook

    texts: list[str] = []
    for path in corpus_files():
        if path.suffix == ".xlsx":
            wb = load_workbook(path, read_only=True)
            for ws in wb.worksheets:
                for row in ws.iter_rows(values_only=True):
                    texts.extend(str(v) for v in row if isinstance(v, str))
            wb.close()
            continue
        raw = path.read_text(encoding="utf-8")
        rows = json.loads(raw) if path.suffix == ".json" else [json.loads(x) for x in raw.splitlines() if x.strip()]
        for row in rows:
            texts.extend(v for v in row.values() if isinstance(v, str) and v)
    # The template words, so prompts tokenize compactly.
    texts += ["### Instruction:\n", "### Question:\n", "### Response:\n", "You are a medical expert."]
    return texts


def tiny_build_name(name: str = TINY_MODEL) -> str:
    """The folder name of the embedded model this checkout builds (it changes when the samples change)."""
    prefix = "tiny-qwen2" if name == TINY_MODEL else f"{name}-qwen2"
    return f"{prefix}-{_build_hash(name)}"


@functools.cache
def _build_hash(name: str = TINY_MODEL) -> str:
    h = hashlib.sha256(json.dumps(variant_spec(name), sort_keys=True).encode())
    h.update(QWEN2_SPLIT_REGEX.encode())
    h.update(CHAT_TEMPLATE.encode())
    for path in corpus_files():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def build_tokenizer(texts: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SPEC["vocab_size"] - len(SPECIAL_TOKENS) - len(ADDED_TOKENS),
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens(ADDED_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=SPEC["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, name: str = TINY_MODEL):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    spec = variant_spec(name)
    vocab = ((len(tokenizer) + 63) // 64) * 64  # padded like real checkpoints
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        rope_theta=spec["rope_theta"],
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(spec["seed"])
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, spec["lm_head_std"])
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def cache_root() -> Path:
    return Path(os.environ.get("TRAIN_CACHE", REPO_ROOT / ".cache"))


def ensure_tiny_model(name: str = TINY_MODEL) -> Path:
    """Return the folder of an embedded model (`VARIANTS`) + tokenizer, building it on first use."""
    if name not in VARIANTS:
        raise KeyError(f"no embedded model '{name}'; choose one of {sorted(VARIANTS)}")
    target = cache_root() / tiny_build_name(name)
    if (target / "model.safetensors").is_file():
        return target
    log.info("building the embedded %s Qwen2 model and tokenizer -> %s", name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename: concurrent ranks or an interrupted build never leave a half folder.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        if name == TINY_MODEL:
            tokenizer = build_tokenizer(corpus_texts())
        else:  # the very same tokenizer files as the default's: a variant shares its vocabulary by construction
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(ensure_tiny_model(TINY_MODEL))
        tokenizer.save_pretrained(tmp)
        build_model(tokenizer, name).save_pretrained(tmp, safe_serialization=True)
        (tmp / "build_spec.json").write_text(json.dumps(variant_spec(name), indent=2) + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
