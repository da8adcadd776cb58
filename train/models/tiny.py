"""The embedded default model: a tiny Qwen2ForCausalLM and a locally trained tokenizer, and tiny
models of other families (Llama, Mistral, Gemma-3, Qwen3, GPT-2) on the very same tokenizer.

Nothing is downloaded. The tokenizer is a byte-level BPE trained on the bundled sample text
with Qwen2's pre-tokenizer regex (so transformers, raw `tokenizers` and llama.cpp split Korean
identically), carrying the special tokens of DeepSeek-R1-Distill-Qwen (BOS/EOS, User/Assistant,
<think>) and an R1-style chat template. The model has the real architecture (GQA, q/k/v biases,
untied head, hidden size 256 so GGUF k-quants apply) with seeded random weights.

Built once into `$TRAIN_CACHE/tiny-qwen2-<hash>` (default `.cache/` in the repository) and reused;
the hash covers the build spec and the corpus, so editing either rebuilds. The other families
(`model.name_or_path: tiny-llama`, ... see `VARIANTS`) go to `$TRAIN_CACHE/<name>-<hash>`.

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

from train.core.config import (
    TINY_GEMMA3,
    TINY_GPT2,
    TINY_LLAMA,
    TINY_MISTRAL,
    TINY_MODEL,
    TINY_MODELS,
    TINY_QWEN3,
    TINY_STUDENT,
)
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

# Qwen3's chat template (Qwen/Qwen3-8B; TRL ships it as trl/chat_templates/qwen3.jinja) without its tool
# calls, for tiny-qwen3: the reasoning of an assistant turn is split off at `</think>` (or taken from
# `reasoning_content`) and shown only after the last user question, an empty think block when called with
# enable_thinking=False. Qwen3's turn end `<|im_end|>` is its EOS; here the shared tokenizer's EOS plays that
# part (so generation stops at a turn's end), and `<|im_start|>` stays plain text. `{% generation %}` marks the
# assistant tokens for TRL's assistant_only_loss, as in CHAT_TEMPLATE.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + eos_token + '\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + eos_token + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}{%- generation %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- content }}{%- endif %}"
    "{{- eos_token + '\\n' }}{%- endgeneration %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
CHAT_TEMPLATES = {"r1": CHAT_TEMPLATE, "qwen3": QWEN3_CHAT_TEMPLATE}

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
# The family variants are other architectures of the same sizes: `family` picks the transformers
# model type (FAMILIES), `chat_template` one of CHAT_TEMPLATES (default: the R1 template). Absent keys
# mean qwen2 and r1, so the hashes (and folders) of the first two stay what they were.
VARIANTS = {
    TINY_MODEL: {},
    TINY_STUDENT: {"num_hidden_layers": 2, "intermediate_size": 512, "seed": 1},
    TINY_LLAMA: {"family": "llama", "seed": 2},
    TINY_MISTRAL: {"family": "mistral", "seed": 3},
    # Gemma-3's head size is its own setting (256 in Gemma-3 1B to 12B, not hidden / heads), and so is the
    # query_pre_attn_scalar that scales its attention: transformers' GGUF reader assumes 256 for that scale (the
    # file has no such key), llama.cpp takes 1/sqrt(head size), so they agree only at 256
    TINY_GEMMA3: {"family": "gemma3", "head_dim": 256, "seed": 4},
    # Qwen3's head size is its own setting, 128 in every Qwen3 (not hidden / heads); transformers' GGUF reader
    # also assumes 128 for qwen3 (it does not read the file's key_length)
    TINY_QWEN3: {"family": "qwen3", "chat_template": "qwen3", "head_dim": 128, "seed": 5},
    # GPT-2's MLP is 4 x hidden (llama.cpp's converter assumes it): 1024, still a multiple of 256. Its learned
    # position table has GPT-2's 1024 rows, which transformers' GGUF reader assumes (it reads the file's
    # context length into n_ctx, which GPT2Config no longer has).
    TINY_GPT2: {"family": "gpt2", "intermediate_size": 1024, "max_position_embeddings": 1024, "seed": 6},
}
assert set(VARIANTS) == set(TINY_MODELS)
# family -> transformers model_type (AutoConfig.for_model). Gemma-3, not Gemma-2: llama.cpp converts Gemma-2
# only with a SentencePiece tokenizer.model, Gemma-3 also with a BPE tokenizer.json such as ours.
FAMILIES = {
    "qwen2": "qwen2",
    "llama": "llama",
    "mistral": "mistral",
    "gemma3": "gemma3_text",
    "qwen3": "qwen3",
    "gpt2": "gpt2",
}


def variant_spec(name: str = TINY_MODEL) -> dict:
    return {**SPEC, **VARIANTS[name]}


def family(name: str) -> str:
    return variant_spec(name).get("family", "qwen2")


def chat_template(name: str) -> str:
    return CHAT_TEMPLATES[variant_spec(name).get("chat_template", "r1")]


CORPUS_VERSION = 2  # bump when corpus_texts reads the samples differently (2: a conversation's turns too)


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
            for value in row.values():  # a conversation's turns (schemas messages, sharegpt)
                if isinstance(value, list):
                    texts.extend(
                        v for turn in value if isinstance(turn, dict) for v in turn.values() if isinstance(v, str)
                    )
    # The template words, so prompts tokenize compactly.
    texts += ["### Instruction:\n", "### Question:\n", "### Response:\n", "You are a medical expert."]
    return texts


def tiny_build_name(name: str = TINY_MODEL) -> str:
    """The folder name of the embedded model this checkout builds (it changes when the samples change)."""
    if name == TINY_MODEL:
        prefix = "tiny-qwen2"
    else:  # tiny-student-qwen2-..., tiny-llama-...
        prefix = f"{name}-qwen2" if family(name) == "qwen2" else name
    return f"{prefix}-{_build_hash(name)}"


@functools.cache
def _build_hash(name: str = TINY_MODEL) -> str:
    h = hashlib.sha256(json.dumps(variant_spec(name), sort_keys=True).encode())
    h.update(QWEN2_SPLIT_REGEX.encode())
    h.update(CHAT_TEMPLATE.encode())
    if chat_template(name) != CHAT_TEMPLATE:
        h.update(chat_template(name).encode())
    h.update(f"corpus:{CORPUS_VERSION}".encode())
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


def model_config(tokenizer, name: str = TINY_MODEL):
    """The transformers config of an embedded model: SPEC's sizes in its family's terms."""
    from transformers import AutoConfig

    spec = variant_spec(name)
    kind = family(name)
    vocab = ((len(tokenizer) + 63) // 64) * 64  # padded like real checkpoints
    if kind == "gemma3":
        # not padded: llama.cpp's Gemma-3 converter cuts the embeddings to the tokenizer.json's tokens but writes a
        # padded token list, and llama.cpp then refuses the file ("token_embd.weight has wrong shape")
        vocab = len(tokenizer)
    tokens = {
        "vocab_size": vocab,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "dtype": "float32",
    }
    if kind == "gpt2":  # GPT-2's names; its MLP is always 4 x n_embd (n_inner unset), its head tied
        assert spec["intermediate_size"] == 4 * spec["hidden_size"], spec
        return AutoConfig.for_model(
            "gpt2",
            n_embd=spec["hidden_size"],
            n_layer=spec["num_hidden_layers"],
            n_head=spec["num_attention_heads"],
            n_positions=spec["max_position_embeddings"],
            **tokens,
        )
    sizes = {
        "hidden_size": spec["hidden_size"],
        "intermediate_size": spec["intermediate_size"],
        "num_hidden_layers": spec["num_hidden_layers"],
        "num_attention_heads": spec["num_attention_heads"],
        "num_key_value_heads": spec["num_key_value_heads"],
        "max_position_embeddings": spec["max_position_embeddings"],
    }
    if kind == "qwen2":  # exactly as before the other families existed: the same weights for the same hash
        from transformers import Qwen2Config

        return Qwen2Config(**sizes, rope_theta=spec["rope_theta"], tie_word_embeddings=False, **tokens)
    head_dim = spec.get("head_dim") or spec["hidden_size"] // spec["num_attention_heads"]
    extra: dict = {"head_dim": head_dim}
    if kind == "gemma3":
        # Gemma-3 ties its head and keeps its own RoPE bases and attention scale (query_pre_attn_scalar 256);
        # the sliding window (local layers) is longer than any tiny sequence.
        extra.update(sliding_window=512)
    else:
        extra.update(rope_theta=spec["rope_theta"], tie_word_embeddings=False)
    return AutoConfig.for_model(FAMILIES[kind], **sizes, **extra, **tokens)


def build_model(tokenizer, name: str = TINY_MODEL):
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    spec = variant_spec(name)
    config = model_config(tokenizer, name)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # a tied head (Gemma-3, GPT-2) shares this tensor with the embeddings
        model.get_output_embeddings().weight.normal_(0.0, spec["lm_head_std"])
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")  # what save_pretrained writes


def cache_root() -> Path:
    return Path(os.environ.get("TRAIN_CACHE", REPO_ROOT / ".cache"))


def ensure_tiny_model(name: str = TINY_MODEL) -> Path:
    """Return the folder of an embedded model (`VARIANTS`) + tokenizer, building it on first use."""
    if name not in VARIANTS:
        raise KeyError(f"no embedded model '{name}'; choose one of {sorted(VARIANTS)}")
    target = cache_root() / tiny_build_name(name)
    if (target / "model.safetensors").is_file():
        return target
    log.info("building the embedded %s model (%s) and tokenizer -> %s", name, family(name), target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename: concurrent ranks or an interrupted build never leave a half folder.
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=target.parent))
    try:
        if name == TINY_MODEL:
            tokenizer = build_tokenizer(corpus_texts())
            tokenizer.save_pretrained(tmp)
        else:  # the very same tokenizer files as the default's: a variant shares its vocabulary by construction
            from transformers import AutoTokenizer

            source = ensure_tiny_model(TINY_MODEL)
            tokenizer = AutoTokenizer.from_pretrained(source)
            # copied, not saved again: a save rewrites tokenizer.json (same tokens, other bytes)
            for file in TOKENIZER_FILES:
                shutil.copyfile(source / file, tmp / file)
            if chat_template(name) != CHAT_TEMPLATE:  # tiny-qwen3: only its chat template differs
                (tmp / "chat_template.jinja").write_text(chat_template(name), encoding="utf-8")
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
