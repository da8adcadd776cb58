"""TRL's trainers with the guards every stage method shares, and SFTConfig built from a recipe.

`StageTrainerMixin` goes in front of TRL's SFTTrainer, RewardTrainer, DPOTrainer and GRPOTrainer:
- atomic checkpoints: written into tmp-checkpoint-N, listed, then renamed to checkpoint-N;
- the non-finite guard's hooks: a non-finite loss is flagged by `training_step`, and the optimizer's
  step becomes a no-op while the guard marks the step as skipped;
- under FSDP, `save_model` gathers only the trainable (LoRA and modules_to_save) weights, or under full
  fine-tuning the whole model, for the final save only.
The SFT trainer also counts real tokens against token slots (padding efficiency), which TRL does
not report.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from pathlib import Path

import torch
from trl import DPOTrainer, GRPOTrainer, RewardTrainer, SFTConfig, SFTTrainer

from train.core.config import Recipe
from train.core.errors import UserError
from train.methods.reliability import STAGE_STATE, EvaluationPreempted, commit_checkpoint, guard_optimizer_step

# Settings that would put a secret into saved training args; they come from the environment.
SECRET_ARGS = {"hub_token", "push_to_hub_token"}


class StageTrainerMixin:
    """Guards shared by every stage method; put it before the TRL trainer class."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_loss_nonfinite = False  # set by training_step, read by NonFiniteGuard
        self.skip_optimizer_step = False  # set by NonFiniteGuard, honoured by the guarded optimizer
        self.run_identity: dict | None = None  # set by the stage runner; stamped into every checkpoint

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        guard_optimizer_step(self, optimizer)
        return optimizer

    def _save_checkpoint(self, model, trial):
        """Write into tmp-checkpoint-N, list the files, then rename to checkpoint-N (atomic on one filesystem)."""
        import transformers.trainer as hf_trainer
        from transformers.trainer_utils import rotate_checkpoints

        step = self.state.global_step
        extra = {**self.extra_state(), "run": self.run_identity}
        run_dir = Path(self._get_output_dir(trial=trial))
        staging, final = run_dir / f"tmp-checkpoint-{step}", run_dir / f"checkpoint-{step}"
        prefix = hf_trainer.PREFIX_CHECKPOINT_DIR
        hf_trainer.PREFIX_CHECKPOINT_DIR = "tmp-checkpoint"  # the Trainer names the folder from this global
        try:
            super()._save_checkpoint(model, trial)
        finally:
            hf_trainer.PREFIX_CHECKPOINT_DIR = prefix
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint) == staging:
                self.state.best_model_checkpoint = str(final)
                self.state.save_to_json(str(staging / "trainer_state.json"))
            (staging / STAGE_STATE).write_text(json.dumps(extra) + "\n")
            commit_checkpoint(staging, final, step)
            # The Trainer rotated before the rename, not counting this one: rotate again.
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
            )
        self.accelerator.wait_for_everyone()

    def _evaluate(self, trial, ignore_keys_for_eval, skip_scheduler=False):
        """A preemption during an evaluation drops it: save the step's checkpoint and stop instead."""
        try:
            return super()._evaluate(trial, ignore_keys_for_eval, skip_scheduler)
        except EvaluationPreempted:
            self.control.should_evaluate = False  # on_evaluate, which resets it, never ran
            self.control.should_save = True
            self.control.should_training_stop = True
            self.evaluation_dropped = True
            return {}

    def _determine_best_metric(self, metrics, trial):
        if getattr(self, "evaluation_dropped", False):  # no metrics: not a new best
            return False
        return super()._determine_best_metric(metrics, trial)

    def count_tokens(self, inputs) -> None:
        """Hook for trainers that report padding efficiency."""

    def extra_state(self) -> dict:
        """State of ours a checkpoint must carry (every rank calls this: it may reduce across ranks)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` saved, when resuming."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.count_tokens(inputs)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            self.step_loss_nonfinite = True
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Under FSDP, gather the trainable weights alone and save them from rank 0.

        Trainer.save_model writes nothing under FSDP with SHARDED_STATE_DICT, and FULL_STATE_DICT would
        gather the whole frozen base (65 GB for 32B) to save a few hundred MB of adapter.
        """
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        from peft import PeftModel

        if not isinstance(self.accelerator.unwrap_model(self.model), PeftModel):  # full fine-tuning (lora: none)
            return self._save_full_fsdp_model(output_dir, _internal_call)
        adapter_state = {}
        for name, tensor in self.model.state_dict().items():
            if "lora_" in name or "modules_to_save" in name:  # every rank joins each gather
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                adapter_state[name] = full.detach().cpu()
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(self.model).save_pretrained(
                output_dir, state_dict=adapter_state, safe_serialization=True
            )
        self.accelerator.wait_for_everyone()

    def _save_full_fsdp_model(self, output_dir: str, checkpoint: bool) -> None:
        """Full fine-tuning under FSDP: the final model gathered whole (every rank joins) and written by rank 0.
        A checkpoint keeps only the Trainer's sharded state (what resuming reads): gathering a 32B model
        at every save_steps would cost minutes and twice the disk."""
        if checkpoint:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # The full state dict gathered onto rank 0's CPU (the others get an empty one): one copy in host memory.
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(self.model, options=options)
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(self.model).save_pretrained(
                output_dir, state_dict=state, safe_serialization=True
            )
        self.accelerator.wait_for_everyone()


class StageSFTTrainer(StageTrainerMixin, SFTTrainer):
    """SFTTrainer with the stage guards, counting real tokens and token slots of every micro-batch.

    `sequence_parallel=N`: each group of N ranks trains on the same batches, every rank on 1/N of each
    sequence (train/models/sequence_parallel.py; the model's attention is made parallel before this)."""

    def __init__(self, *args, sequence_parallel: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_tokens = 0
        self.token_slots = 0
        self.widest = 0  # the longest micro-batch this rank saw, in tokens (1/N of it with sequence parallelism)
        self.sequence_parallel = sequence_parallel
        if sequence_parallel > 1:
            self.data_collator.return_position_ids = True  # global positions survive the split (RoPE)

    def get_train_dataloader(self):
        if self.sequence_parallel == 1:
            return super().get_train_dataloader()
        from train.models import sequence_parallel as sp

        whole = self.data_collator
        self.data_collator = sp.ShardCollator(whole, self.sequence_parallel, sp.group_rank())
        try:
            loader = super().get_train_dataloader()
        finally:
            self.data_collator = whole
        sp.shard_dataloader(loader, self.sequence_parallel)
        return loader

    def count_tokens(self, inputs) -> None:
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        # Padding-free batches carry no attention_mask: every slot holds a real token.
        self.real_tokens += int(mask.sum()) if mask is not None else input_ids.numel()
        self.token_slots += input_ids.numel()
        self.widest = max(self.widest, input_ids.shape[1])

    def extra_state(self) -> dict:
        real, slots = self.token_totals()  # over all ranks: a resume may run on another number of them
        return {"real_tokens": real, "token_slots": slots}

    def load_extra_state(self, state: dict) -> None:
        first = self.accelerator.is_main_process  # one rank carries the earlier totals; the reduce adds them up
        self.real_tokens = int(state.get("real_tokens", 0)) if first else 0
        self.token_slots = int(state.get("token_slots", 0)) if first else 0

    def token_totals(self) -> tuple[int, int]:
        """(real tokens, token slots) summed over all processes."""
        totals = torch.tensor([self.real_tokens, self.token_slots], dtype=torch.long, device=self.accelerator.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        return int(totals[0]), int(totals[1])


class StageRewardTrainer(StageTrainerMixin, RewardTrainer):
    """TRL's RewardTrainer with the stage guards."""


class StageDPOTrainer(StageTrainerMixin, DPOTrainer):
    """TRL's DPOTrainer with the stage guards."""


class StageGRPOTrainer(StageTrainerMixin, GRPOTrainer):
    """TRL's GRPOTrainer with the stage guards."""


def _check_sft_args(extra: dict, origin: str) -> None:
    valid = {f.name for f in dataclasses.fields(SFTConfig)}
    for key in extra:
        if key in SECRET_ARGS:
            raise UserError(
                f"{origin}: training.sft_args.{key}: tokens are read from the environment (HF_TOKEN), "
                "never from a recipe"
            )
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{origin}: unknown key 'training.sft_args.{key}' (not a trl.SFTConfig field){hint}")


def build_sft_config(recipe: Recipe, output_dir: str, has_eval: bool) -> SFTConfig:
    from train.methods.launch import detect_launch, gradient_accumulation

    t, m = recipe.training, recipe.model
    _check_sft_args(t.sft_args, recipe.source_path or "<recipe>")
    eval_kwargs = {}
    if has_eval and t.eval_steps:
        # Tracking the best eval loss lets checkpoint rotation keep the best beside the last K.
        eval_kwargs = {
            "eval_strategy": "steps",
            "eval_steps": t.eval_steps,
            "metric_for_best_model": "eval_loss",
            "greater_is_better": False,
        }
    extra = dict(t.sft_args)
    if t.sequence_parallel > 1:  # every batch splits into N equal chunks
        extra["pad_to_multiple_of"] = math.lcm(t.sequence_parallel, extra.get("pad_to_multiple_of") or 1)
    return SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=gradient_accumulation(recipe, detect_launch()),
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=t.optim,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        report_to=t.report_to,
        dataloader_num_workers=t.dataloader_num_workers,
        bf16=m.dtype == "bfloat16",
        fp16=m.dtype == "float16",
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=m.gradient_checkpointing,
        use_liger_kernel=m.use_liger,
        max_length=recipe.data.max_length,
        packing=t.packing,
        packing_strategy="bfd",
        completion_only_loss=True,
        **eval_kwargs,
        **extra,
    )
