"""TRL's SFTTrainer and SFTConfig, built from a recipe, plus the one thing TRL does not report:
how many token slots a step spent versus how many held real tokens (padding efficiency)."""

from __future__ import annotations

import dataclasses
import difflib

import torch
from trl import SFTConfig, SFTTrainer

from train.config import Recipe
from train.errors import UserError

# Settings that would put a secret into saved training args; they come from the environment.
SECRET_ARGS = {"hub_token", "push_to_hub_token"}


class StageSFTTrainer(SFTTrainer):
    """SFTTrainer that counts real tokens and token slots of every micro-batch it trains on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.real_tokens = 0
        self.token_slots = 0

    def training_step(self, model, inputs, num_items_in_batch=None):
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        # Padding-free batches carry no attention_mask: every slot holds a real token.
        self.real_tokens += int(mask.sum()) if mask is not None else input_ids.numel()
        self.token_slots += input_ids.numel()
        return super().training_step(model, inputs, num_items_in_batch)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Under FSDP, gather the LoRA weights alone and save them from rank 0.

        Trainer.save_model writes nothing under FSDP with SHARDED_STATE_DICT, and FULL_STATE_DICT would
        gather the whole frozen base (65 GB for 32B) to save a few hundred MB of adapter.
        """
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        adapter_state = {}
        for name, tensor in self.model.state_dict().items():
            if "lora_" in name:  # every rank joins each gather
                full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                adapter_state[name] = full.detach().cpu()
        if self.accelerator.is_main_process:
            self.accelerator.unwrap_model(self.model).save_pretrained(
                output_dir, state_dict=adapter_state, safe_serialization=True)
        self.accelerator.wait_for_everyone()

    def token_totals(self) -> tuple[int, int]:
        """(real tokens, token slots) summed over all processes."""
        totals = torch.tensor([self.real_tokens, self.token_slots], dtype=torch.long, device=self.accelerator.device)
        totals = self.accelerator.reduce(totals, reduction="sum")
        return int(totals[0]), int(totals[1])


def _check_sft_args(extra: dict, origin: str) -> None:
    valid = {f.name for f in dataclasses.fields(SFTConfig)}
    for key in extra:
        if key in SECRET_ARGS:
            raise UserError(f"{origin}: training.sft_args.{key}: tokens are read from the environment (HF_TOKEN), "
                            "never from a recipe")
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{origin}: unknown key 'training.sft_args.{key}' (not a trl.SFTConfig field){hint}")


def build_sft_config(recipe: Recipe, output_dir: str, has_eval: bool) -> SFTConfig:
    from train.launch import detect_launch, gradient_accumulation

    t, m = recipe.training, recipe.model
    _check_sft_args(t.sft_args, recipe.source_path or "<recipe>")
    eval_kwargs = {}
    if has_eval and t.eval_steps:
        eval_kwargs = {"eval_strategy": "steps", "eval_steps": t.eval_steps}
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
        **t.sft_args,
    )
