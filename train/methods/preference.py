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
The shared stage runner (train/methods/runner.py) gives them SFT's checks, guards and resume.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.build import processed_dir
from data_prep.preference import build_preference_data
from train.core.config import Recipe
from train.core.errors import UserError
from train.core.io import link_or_copy_tree
from train.methods.launch import Launch
from train.methods.rewards import exact_answer_reward, format_reward
from train.methods.runner import Method, StageData, run_stage
from train.methods.trainers import (
    StageDPOTrainer,
    StageGRPOTrainer,
    StageRewardTrainer,
    build_sft_config,
)
from train.models.lineage import MODEL_DIR
from train.models.loading import (
    load_model_for_training,
    master_dtype,
    parent_chain,
    peft_lora_config,
    pin_4bit_cpu_path,
    quantization_config,
    start_source,
    torch_dtype,
)

REWARD_MODEL_DIR = "reward_model"
# The SFT arguments (batch, schedule, precision, logging, saving) carry over; each method adds its own.
SHARED_ARGS = {
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "num_train_epochs",
    "max_steps",
    "seed",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "report_to",
    "bf16",
    "fp16",
    "use_cpu",
    "gradient_checkpointing",
    "eval_strategy",
    "eval_steps",
    "dataloader_num_workers",
}
LOGGED = (
    "rewards/margins",
    "rewards/accuracies",
    "reward",
    "rewards/format_reward/mean",
    "rewards/exact_answer_reward/mean",
)


def _reward_funcs(recipe: Recipe) -> list:
    funcs: list = []
    for name in recipe.preference.rewards:
        if name == "format":
            funcs.append(format_reward)
        elif name == "exact_answer":
            funcs.append(exact_answer_reward)
        else:
            path = Path(recipe.preference.reward_model) / REWARD_MODEL_DIR
            if not (path / "config.json").is_file():
                raise UserError(
                    f"preference.reward_model: {path} is missing; train the reward stage first "
                    "(python -m train reward ...)"
                )
            funcs.append(str(path))  # TRL loads it as a sequence classifier with one output
    return funcs


def _reward_model(recipe: Recipe, tokenizer):
    """A one-output sequence classifier on the parent chain's merged weights."""
    from transformers import AutoModelForSequenceClassification

    source = start_source(recipe, parent_chain(recipe))
    model = AutoModelForSequenceClassification.from_pretrained(
        source,
        num_labels=1,
        dtype=torch_dtype(master_dtype(recipe)),
        quantization_config=quantization_config(recipe.model),
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    pin_4bit_cpu_path(model)
    return model


class Preference(Method):
    """reward, dpo or grpo (the recipe's `method`)."""

    def __init__(self, name: str):
        self.name = name
        self.full = False  # lora: none (set by check)

    def check(self, recipe: Recipe) -> None:
        self.full = recipe.full_finetune
        if recipe.parent and Path(recipe.parent, REWARD_MODEL_DIR).exists():
            raise UserError(f"parent {recipe.parent} is a reward stage; a policy continues from an SFT/DPO/GRPO stage")
        if recipe.method == "grpo":
            _reward_funcs(recipe)  # a missing reward model fails now, not after loading

    def data(self, recipe: Recipe, tokenizer, launch: Launch) -> StageData:
        train, held, manifest = build_preference_data(recipe, tokenizer, processed_dir(recipe))
        return StageData(train, held, {**manifest, "fingerprint": None})

    def trainer(self, recipe: Recipe, tokenizer, data: StageData, out: Path, callbacks: list):
        from transformers import set_seed
        from trl import DPOConfig, GRPOConfig, RewardConfig

        base = build_sft_config(recipe, str(out), has_eval=data.eval is not None).to_dict()
        keep = {k: v for k, v in base.items() if k in SHARED_ARGS}
        keep.update(output_dir=str(out), remove_unused_columns=False)
        pref = recipe.preference
        lora = None if recipe.full_finetune else peft_lora_config(recipe.lora)
        common = {
            "train_dataset": data.train,
            "processing_class": tokenizer,
            "peft_config": lora,
            "callbacks": callbacks,
        }
        if recipe.method == "reward":
            if lora is not None:
                lora.task_type = "SEQ_CLS"
            set_seed(recipe.training.seed)  # the new score head's init, then the LoRA's, independent of earlier steps
            model = _reward_model(recipe, tokenizer)
            set_seed(recipe.training.seed)
            return StageRewardTrainer(
                model=model,
                args=RewardConfig(**keep, max_length=recipe.data.max_length),
                eval_dataset=data.eval,
                **common,
            )
        model = load_model_for_training(recipe)
        set_seed(recipe.training.seed)
        if lora is None:  # TRL loads the frozen reference from the policy's folder: in model.dtype, at its revision
            chain = parent_chain(recipe)
            keep["model_init_kwargs"] = {
                "dtype": recipe.model.dtype,
                **({"revision": chain.revision} if chain.revision and not chain.adapters else {}),
            }
        if recipe.method == "dpo":
            try:
                args = DPOConfig(**keep, beta=pref.beta, loss_type=pref.loss_type, max_length=recipe.data.max_length)
            except ValueError as err:
                raise UserError(f"preference.loss_type '{pref.loss_type}': {err}") from None
            # ref_model=None: with a PEFT model the reference is the same weights with the adapter disabled; under
            # full fine-tuning TRL makes a frozen copy of the starting weights.
            return StageDPOTrainer(model=model, ref_model=None, args=args, eval_dataset=data.eval, **common)
        keep.pop("eval_strategy", None)
        keep.pop("eval_steps", None)
        args = GRPOConfig(
            **keep,
            beta=pref.beta,
            num_generations=pref.num_generations,
            max_completion_length=pref.max_completion_length,
            temperature=pref.temperature,
            use_vllm=pref.use_vllm,
        )  # TRL sizes generation batches from batch x processes
        return StageGRPOTrainer(model=model, reward_funcs=_reward_funcs(recipe), args=args, **common)

    def metrics(self, trainer, history: list[dict]) -> dict:
        out = {}
        for key in LOGGED:
            values = [rec[key] for rec in history if key in rec]
            if values:
                out[f"{key}_first"], out[f"{key}_last"] = values[0], values[-1]
        return out

    def save_extra(self, trainer, out: Path, tokenizer) -> None:
        if self.name == "reward":  # a plain classifier GRPO (or anyone) can load by path
            if self.full:  # model/ is already the whole classifier, gathered from every rank: link it
                link_or_copy_tree(out / MODEL_DIR, out / REWARD_MODEL_DIR)
                return
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(out / REWARD_MODEL_DIR, safe_serialization=True)
            tokenizer.save_pretrained(out / REWARD_MODEL_DIR)


def run_preference(recipe: Recipe) -> dict:
    """Train one reward / dpo / grpo stage; return its stage record."""
    if recipe.method == "sft":
        raise UserError(
            f"{recipe.source_path}: method is sft; run python -m train sft (or set method: dpo|reward|grpo)"
        )
    return run_stage(recipe, Preference(recipe.method))
