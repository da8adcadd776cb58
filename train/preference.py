"""Reward model, DPO and GRPO stages on TRL's own trainers, in the same lineage as SFT.

    python -m train reward recipes/tiny/reward.yaml
    python -m train dpo recipes/tiny/dpo.yaml
    python -m train grpo recipes/tiny/grpo.yaml
    accelerate launch --config_file accelerate_configs/zero2.yaml --num_processes 8 -m train dpo RECIPE

Each starts from a named parent stage (its adapters merged into the 16-bit base, as SFT children
do), trains a LoRA (QLoRA when model.quantization is nf4), and writes adapter/ + stage.json with
`method`, so merge, export and eval take dpo and grpo stages like SFT ones. DPO's reference model is
the same weights with the adapter disabled (no second copy). A reward stage also writes
reward_model/ (LoRA merged into a sequence-classification model with one output) for GRPO to use.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from data_prep.build import processed_dir
from data_prep.preference import build_preference_data
from data_prep.schemas import THINK_CLOSE, THINK_OPEN
from train.config import Recipe
from train.errors import UserError
from train.launch import check_launch, detect_launch
from train.logging_utils import get_logger
from train.model import ADAPTER_DIR, adapter_chain, load_model_for_training, load_tokenizer, parent_merged_dir
from train.qa_metrics import clean_answer, contains_reference
from train.stage import MetricsLogCallback, losses, write_stage_outputs

log = get_logger("preference")
REWARD_MODEL_DIR = "reward_model"
_FORMAT = re.compile(rf"^\s*(?:{re.escape(THINK_OPEN)})?(.+?){re.escape(THINK_CLOSE)}\s*(\S.*)$", re.DOTALL)


# ---------------------------------------------------------------------------------------------
# GRPO reward functions (TRL calls them with the prompts, completions and the dataset's columns)


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 for reasoning closed by </think> and followed by an answer, else 0.0.

    The completion may open with <think> or not: the R1 chat template already opens it in the prompt.
    """
    return [1.0 if (m := _FORMAT.match(c)) and m.group(1).strip() and THINK_OPEN not in m.group(2) else 0.0
            for c in completions]


def exact_answer_reward(prompts, completions, ground_truth, **kwargs) -> list[float]:
    """1.0 when the answer after the reasoning contains the ground truth (KorQuAD-normalized), else 0.0."""
    return [contains_reference(clean_answer(c), [truth]) for c, truth in zip(completions, ground_truth, strict=True)]


def _reward_funcs(recipe: Recipe) -> list:
    funcs = []
    for name in recipe.preference.rewards:
        if name == "format":
            funcs.append(format_reward)
        elif name == "exact_answer":
            funcs.append(exact_answer_reward)
        else:
            path = Path(recipe.preference.reward_model) / REWARD_MODEL_DIR
            if not (path / "config.json").is_file():
                raise UserError(f"preference.reward_model: {path} is missing; train the reward stage first "
                                "(python -m train reward ...)")
            funcs.append(str(path))  # TRL loads it as a sequence classifier with one output
    return funcs


# ---------------------------------------------------------------------------------------------


def _reward_model(recipe: Recipe, tokenizer):
    """A one-output sequence classifier on the parent chain's merged weights."""
    from transformers import AutoModelForSequenceClassification

    from train.model import quantization_config, resolve_model_path, torch_dtype

    adapters = adapter_chain(recipe.parent)
    source = parent_merged_dir(recipe, adapters) if adapters else resolve_model_path(recipe.model.name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=1, dtype=torch_dtype(recipe.model.dtype), quantization_config=quantization_config(
            recipe.model))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _trainer(recipe: Recipe, tokenizer, train_ds, eval_ds, out: Path, callbacks):
    from transformers import set_seed
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

    from train.model import peft_lora_config
    from train.trainer import build_sft_config

    # The SFT arguments (batch, schedule, precision, logging, saving) carry over; each method adds its own.
    base = build_sft_config(recipe, str(out), has_eval=eval_ds is not None).to_dict()
    keep = {k: v for k, v in base.items() if k in {
        "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
        "warmup_steps", "weight_decay", "max_grad_norm", "num_train_epochs", "max_steps", "seed", "logging_steps",
        "save_steps", "save_total_limit", "report_to", "bf16", "fp16", "use_cpu", "gradient_checkpointing",
        "eval_strategy", "eval_steps", "dataloader_num_workers"}}
    keep.update(output_dir=str(out), remove_unused_columns=False)
    pref = recipe.preference
    lora = peft_lora_config(recipe.lora)
    set_seed(recipe.training.seed)
    if recipe.method == "reward":
        lora.task_type = "SEQ_CLS"
        args = RewardConfig(**keep, max_length=recipe.data.max_length)
        return RewardTrainer(model=_reward_model(recipe, tokenizer), args=args, train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=tokenizer, peft_config=lora, callbacks=callbacks)
    model = load_model_for_training(recipe)
    if recipe.method == "dpo":
        try:
            args = DPOConfig(**keep, beta=pref.beta, loss_type=pref.loss_type, max_length=recipe.data.max_length)
        except ValueError as err:
            raise UserError(f"preference.loss_type '{pref.loss_type}': {err}") from None
        # ref_model=None with a PEFT model: the reference is the same weights with the adapter disabled.
        return DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, peft_config=lora, callbacks=callbacks)
    keep.pop("eval_strategy", None)
    keep.pop("eval_steps", None)
    args = GRPOConfig(**keep, beta=pref.beta, num_generations=pref.num_generations,
                      max_completion_length=pref.max_completion_length, temperature=pref.temperature,
                      use_vllm=pref.use_vllm)  # TRL sizes generation batches from batch x processes
    return GRPOTrainer(model=model, reward_funcs=_reward_funcs(recipe), args=args, train_dataset=train_ds,
                       processing_class=tokenizer, peft_config=lora, callbacks=callbacks)


def run_preference(recipe: Recipe) -> dict:
    """Train one reward / dpo / grpo stage; return its stage record."""
    started = time.perf_counter()
    if recipe.method == "sft":
        raise UserError(f"{recipe.source_path}: method is sft; run python -m train sft (or set method: dpo|reward|grpo)")
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    launch = detect_launch()
    check_launch(recipe, launch)
    if recipe.parent and Path(recipe.parent, REWARD_MODEL_DIR).exists():
        raise UserError(f"parent {recipe.parent} is a reward stage; a policy continues from an SFT/DPO/GRPO stage")
    adapter_chain(recipe.parent)
    tokenizer = load_tokenizer(recipe.model)
    train_ds, eval_ds, manifest = build_preference_data(recipe, tokenizer, processed_dir(recipe))
    trainer = _trainer(recipe, tokenizer, train_ds, eval_ds, out, [MetricsLogCallback(out / "metrics.jsonl")])
    result = trainer.train()
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    adapter_dir = out / ADAPTER_DIR
    if trainer.is_world_process_zero():
        shutil.rmtree(adapter_dir, ignore_errors=True)  # never leave an earlier run's adapter in place
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(adapter_dir))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(adapter_dir))
        if recipe.method == "reward":  # a plain classifier GRPO (or anyone) can load by path
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(out / REWARD_MODEL_DIR, safe_serialization=True)
            tokenizer.save_pretrained(out / REWARD_MODEL_DIR)
    history = trainer.state.log_history
    curve = losses(history)
    metrics = {"train_loss": result.training_loss, "train_loss_first": curve[0][1] if curve else None,
               "train_loss_last": curve[-1][1] if curve else None, "global_steps": trainer.state.global_step,
               "seconds": round(time.perf_counter() - started, 2), "world_size": launch.world_size,
               "strategy": launch.strategy, "eval": {k: v for k, v in eval_metrics.items() if isinstance(v, float)},
               "train_tokens": None, "padding_efficiency": None, "eval_loss": eval_metrics.get("eval_loss")}
    for key in ("rewards/margins", "rewards/accuracies", "reward", "rewards/format_reward/mean",
                "rewards/exact_answer_reward/mean"):
        values = [rec[key] for rec in history if key in rec]
        if values:
            metrics[f"{key}_first"], metrics[f"{key}_last"] = values[0], values[-1]
    manifest = {**manifest, "fingerprint": None}
    record = write_stage_outputs(recipe, out, manifest, metrics, history)
    log.info("%s stage %s done in %.1fs -> %s", recipe.method, recipe.stage, metrics["seconds"], out)
    return record
