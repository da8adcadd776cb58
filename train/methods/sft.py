"""Supervised fine-tuning of one stage: the recipe's processed data, TRL's SFTTrainer, a LoRA.

    python -m train sft recipes/tiny/stage1_medical.yaml [training.max_steps=20 ...]
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 8 \\
        -m train sft recipes/stage1_medical.yaml

The shared stage runner (train/methods/runner.py) does the checks, guards and finishing; this file
says how SFT gets its data (the processed dataset from data_prep, built here when a single process
finds it missing), its model (transformers or Unsloth) and its trainer (completion-only loss,
padding-free packing).

Writes to the recipe's output_dir: adapter/ (LoRA safetensors + tokenizer; with `lora: none`, model/:
the whole fine-tuned model), checkpoint-*/ (Trainer checkpoints: adapter-only, or the model under
`lora: none`), stage.json (lineage and metrics), metrics.jsonl, loss_curve.png and the resolved recipe.yaml.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.build import load_processed
from train.core.config import Recipe
from train.methods.launch import Launch
from train.methods.runner import Method, StageData, run_stage
from train.methods.trainers import StageSFTTrainer, build_sft_config
from train.models.lineage import check_parent_base
from train.models.loading import load_model_for_training, parent_chain, peft_lora_config, start_source


def load_model_and_lora(recipe: Recipe):
    """(model, peft_config for the trainer): the main path leaves the LoRA to TRL, Unsloth wraps it itself;
    full fine-tuning (lora: none) has no peft_config, so every weight trains."""
    from transformers import set_seed

    if recipe.backend == "unsloth":
        from train.models.unsloth import load_unsloth_model

        chain = parent_chain(recipe)
        check_parent_base(recipe)
        source = start_source(recipe, chain) if recipe.parent else None
        set_seed(recipe.training.seed)  # LoRA init independent of what ran before, as on the main path
        return load_unsloth_model(recipe, source), None
    return load_model_for_training(recipe), None if recipe.full_finetune else peft_lora_config(recipe.lora)


def trainer_inputs(recipe: Recipe, tokenizer, data: StageData, out: Path, callbacks: list) -> dict:
    """The keyword arguments of an SFT-shaped trainer (StageSFTTrainer and the distill trainer built on it)."""
    from transformers import set_seed

    # The config first: under ZeRO-3 it makes from_pretrained shard the weights as they load.
    args = build_sft_config(recipe, str(out), has_eval=data.eval is not None)
    model, peft_config = load_model_and_lora(recipe)
    if recipe.training.sequence_parallel > 1:
        from train.models import sequence_parallel

        sequence_parallel.enable(model, recipe.training.sequence_parallel)
    # Seed again right before the LoRA is created: its init must not depend on how much randomness
    # earlier steps used (building the tiny model, distributed set-up), or runs stop being comparable.
    set_seed(recipe.training.seed)
    return dict(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        sequence_parallel=recipe.training.sequence_parallel,
    )


class SFT(Method):
    name = "sft"

    def data(self, recipe: Recipe, tokenizer, launch: Launch) -> StageData:
        # A distributed launch never builds: the data is prepared once, before launch, not on every rank.
        train, held, manifest = load_processed(recipe, tokenizer, allow_build=launch.world_size == 1)
        return StageData(train, held, manifest)

    def trainer(self, recipe: Recipe, tokenizer, data: StageData, out: Path, callbacks: list):
        return StageSFTTrainer(**trainer_inputs(recipe, tokenizer, data, out, callbacks))

    def metrics(self, trainer, history: list[dict]) -> dict:
        real, slots = trainer.token_totals()
        return {
            "train_tokens": real,
            "token_slots": slots,
            "padding_efficiency": round(real / slots, 4) if slots else None,
            "sequence_parallel": trainer.sequence_parallel,
            "widest_rank_batch_tokens": trainer.widest,
        }


def run_sft(recipe: Recipe, overwrite: bool = False) -> dict:
    """Train one SFT stage; return its stage record (what stage.json holds)."""
    return run_stage(recipe, SFT(), overwrite=overwrite)
