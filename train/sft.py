"""Supervised fine-tuning of one stage: parse, validate, build, train, save.

    python -m train sft recipes/tiny/stage1_medical.yaml [training.max_steps=20 ...]
    accelerate launch --config_file accelerate_configs/ddp.yaml --num_processes 8 \\
        -m train sft recipes/stage1_medical.yaml

Writes to the recipe's output_dir: adapter/ (LoRA safetensors + tokenizer), checkpoint-*/
(adapter-only Trainer checkpoints), stage.json (lineage and metrics), metrics.jsonl,
loss_curve.png and the resolved recipe.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

from data_prep.build import load_processed
from train.config import Recipe
from train.errors import UserError
from train.launch import check_launch, check_sharding, detect_launch, sharding_in_effect
from train.logging_utils import get_logger
from train.model import (
    ADAPTER_DIR,
    adapter_chain,
    load_model_and_lora,
    load_model_config,
    load_tokenizer,
)
from train.reliability import (
    NonFiniteGuard,
    PreemptionCallback,
    check_free_disk,
    checkpoint_problem,
    lora_parameter_estimate,
    newest_complete_checkpoint,
)
from train.stage import MetricsLogCallback, losses, write_stage_outputs
from train.trainer import StageSFTTrainer, build_sft_config

log = get_logger("sft")


def _check_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_probe.{os.getpid()}"  # one per process: ranks share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise UserError(f"output_dir {out} is not writable ({err.strerror})") from None


def _check_disk(recipe: Recipe, out: Path) -> None:
    check_free_disk(out, lora_parameter_estimate(load_model_config(recipe.model), recipe.lora))


def _resume_point(recipe: Recipe, out: Path) -> str | None:
    wanted = recipe.training.resume_from_checkpoint
    if wanted is None:
        return None
    if wanted != "auto":
        problem = checkpoint_problem(Path(wanted)) if Path(wanted).is_dir() else "not a folder"
        if problem:
            raise UserError(f"training.resume_from_checkpoint: {wanted} cannot be resumed from: {problem}")
        return wanted
    last = newest_complete_checkpoint(out) if out.is_dir() else None
    log.info("resume: %s", f"from {last}" if last else "no complete checkpoint in output_dir, starting fresh")
    return str(last) if last else None


def _trim_metrics_log(path: Path, resume: str | None) -> None:
    """Keep the log of the steps the checkpoint holds; drop steps that will be trained again."""
    if resume is None:
        path.unlink(missing_ok=True)
        return
    if not path.is_file():
        return
    step = json.loads((Path(resume) / "trainer_state.json").read_text())["global_step"]
    kept = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


class _StopAtStep(TrainerCallback):
    def __init__(self, step: int | None):
        self.step, self.stopped_at = step, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.step is not None and state.global_step >= self.step:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


def run_sft(recipe: Recipe) -> dict:
    """Train one stage; return its stage record (what stage.json holds)."""
    from transformers import set_seed

    started = time.perf_counter()
    out = Path(recipe.output_dir)
    _check_output_dir(out)
    launch = detect_launch()
    check_launch(recipe, launch)
    resume = _resume_point(recipe, out)
    set_seed(recipe.training.seed)
    world_size = launch.world_size

    adapter_chain(recipe.parent)  # parent stages present, before any heavy work
    tokenizer = load_tokenizer(recipe.model)
    _check_disk(recipe, out)
    train_ds, eval_ds, manifest = load_processed(recipe, tokenizer, allow_build=world_size == 1)
    # The config first: under ZeRO-3 it makes from_pretrained shard the weights as they load.
    args = build_sft_config(recipe, str(out), has_eval=eval_ds is not None)
    model, peft_config = load_model_and_lora(recipe)  # backend: transformers (TRL adds the LoRA) or unsloth
    if int(os.environ.get("RANK", "0")) == 0:
        _trim_metrics_log(out / "metrics.jsonl", resume)
    preemption, stop = PreemptionCallback(), _StopAtStep(recipe.training.stop_at_step)
    # Seed again right before the LoRA is created: its init must not depend on how much randomness
    # earlier steps used (building the tiny model, distributed set-up), or runs stop being comparable.
    set_seed(recipe.training.seed)
    trainer = StageSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[MetricsLogCallback(out / "metrics.jsonl"), preemption, stop],
    )
    guard = NonFiniteGuard(trainer, recipe.training.nonfinite, recipe.training.max_consecutive_nonfinite)
    trainer.add_callback(guard)
    sharding = sharding_in_effect(trainer)
    check_sharding(launch, sharding)
    log.info("stage %s: %d train rows, %d eval rows, parent=%s, %d process(es), sharding=%s", recipe.stage,
             len(train_ds), len(eval_ds) if eval_ds is not None else 0, recipe.parent, world_size, sharding)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        preemption.restore()
    resume_cmd = f"python -m train sft {recipe.source_path} training.resume_from_checkpoint=auto"
    if guard.aborted_at is not None:
        raise UserError(
            f"non-finite loss or gradient at step {guard.aborted_at} (training.nonfinite={recipe.training.nonfinite}, "
            f"{guard.skipped} bad steps); the last good state is saved in {out}/checkpoint-{trainer.state.global_step}; "
            f"lower the learning rate or check the data, then resume: {resume_cmd}"
        )
    interrupted = preemption.preempted_at or stop.stopped_at
    if interrupted is not None:
        why = "preempted" if preemption.preempted_at is not None else "stopped (training.stop_at_step)"
        message = f"{why} at step {interrupted}; checkpoint saved in {out}; resume with: {resume_cmd}"
        log.warning(message)
        if trainer.is_world_process_zero():
            sys.stderr.write(message + "\n")
        return {"stage": recipe.stage, "status": "interrupted", "step": interrupted, "output_dir": str(out),
                "resume": resume_cmd}
    eval_metrics = trainer.evaluate() if eval_ds is not None else {}
    adapter_dir = out / ADAPTER_DIR
    if trainer.is_world_process_zero():
        shutil.rmtree(adapter_dir, ignore_errors=True)  # never leave an earlier run's adapter in place
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(adapter_dir))  # PEFT model: adapter weights only, safetensors
    if trainer.is_world_process_zero():
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            raise RuntimeError(f"training finished but no adapter was written to {adapter_dir}")
        tokenizer.save_pretrained(str(adapter_dir))

    real, slots = trainer.token_totals()
    curve = losses(trainer.state.log_history)
    metrics = {
        "train_loss": result.training_loss,
        "train_loss_first": curve[0][1] if curve else None,
        "train_loss_last": curve[-1][1] if curve else None,
        "eval_loss": eval_metrics.get("eval_loss"),
        "global_steps": trainer.state.global_step,
        "train_tokens": real,
        "token_slots": slots,
        "padding_efficiency": round(real / slots, 4) if slots else None,
        "seconds": round(time.perf_counter() - started, 2),
        "world_size": world_size,
        "strategy": launch.strategy,
        "sharding": sharding,
        "resumed_from": resume,
        "nonfinite_skipped_steps": guard.skipped,
    }
    record = write_stage_outputs(recipe, out, manifest, metrics, trainer.state.log_history)
    log.info("stage %s done: loss %.3f -> %.3f, %d tokens, padding efficiency %.3f, %.1fs -> %s",
             recipe.stage, metrics["train_loss_first"] or float("nan"), metrics["train_loss_last"] or float("nan"),
             real, metrics["padding_efficiency"] or 0.0, metrics["seconds"], out)
    return record
