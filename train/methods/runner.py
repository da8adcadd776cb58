"""The stage runner: one path for every training method (sft, reward, dpo, grpo, distill).

    record = run_stage(recipe, SFT)      # what `python -m train sft RECIPE` runs

Every method gets the same start-up checks (output dir writable, launch, report_to backends, resume
point, parent chain, disk), the same guards (preemption, non-finite policy, atomic checkpoints,
`training.stop_at_step`) and the same finishing (adapter, or the model under `lora: none`, written and
verified, stage.json,
metrics.jsonl, loss curve). A `Method` says only how it gets its data, which trainer it builds, what
it adds to the metrics, and what else it saves.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from train.core.config import Recipe
from train.core.errors import UserError
from train.core.io import replace_output
from train.core.log import get_logger, is_main_process
from train.methods import outdir
from train.methods.launch import (
    Launch,
    check_launch,
    check_report_to,
    check_sharding,
    detect_launch,
    sharding_in_effect,
    stage_command,
)
from train.methods.outdir import check_writable, finished_stage, resume_point
from train.methods.record import MetricsLogCallback, losses, mean_logged_loss, trim_metrics_log, write_stage_outputs
from train.methods.reliability import (
    STAGE_STATE,
    EvaluationPreempted,
    NonFiniteGuard,
    PreemptionCallback,
    check_free_disk,
    stage_disk_estimate,
)
from train.methods.supervise import write_marker
from train.models.lineage import ADAPTER_DIR, MODEL_DIR, adapter_chain
from train.models.loading import load_model_config, load_tokenizer

log = get_logger("runner")


@dataclass
class StageData:
    train: Any  # datasets.Dataset
    eval: Any | None
    manifest: dict


class Method:
    """What differs between methods. Subclasses set `name` and implement `data` and `trainer`."""

    name = ""

    def check(self, recipe: Recipe) -> None:
        """Method-specific refusals, before any heavy work."""

    def data(self, recipe: Recipe, tokenizer, launch: Launch) -> StageData:
        raise NotImplementedError

    def trainer(self, recipe: Recipe, tokenizer, data: StageData, out: Path, callbacks: list):
        """A trainer built on train.methods.trainers.StageTrainerMixin (the guards need its hooks)."""
        raise NotImplementedError

    def metrics(self, trainer, history: list[dict]) -> dict:
        """Method-specific figures for stage.json."""
        return {}

    def save_extra(self, trainer, out: Path, tokenizer) -> None:
        """Anything besides the adapter (main process only)."""


class StopAtStep(TrainerCallback):
    """`training.stop_at_step`: save and stop after this optimizer step (a time-boxed job)."""

    def __init__(self, step: int | None):
        self.step, self.stopped_at = step, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.step is not None and state.global_step >= self.step:
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


def save_weights(trainer, out: Path, tokenizer, full: bool) -> Path:
    """The stage's weights from this run only, checked to exist: adapter/ (LoRA), or model/ (lora: none, the whole
    model, gathered from every rank under ZeRO-3 or FSDP). Written into <name>.tmp/ first and swapped in only
    when complete (core/io.replace_output): a full disk mid-save leaves the earlier folder in place."""
    name = MODEL_DIR if full else ADAPTER_DIR
    final, staging = out / name, out / f"{name}.tmp"
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)  # ours: a save of this folder that did not finish
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # PEFT model: adapter weights only; otherwise the model; safetensors
    if trainer.is_world_process_zero():
        wrote = (
            (staging / "config.json").is_file() and any(staging.glob("*.safetensors"))
            if full
            else (staging / "adapter_model.safetensors").is_file()
        )
        if not wrote:
            raise RuntimeError(f"training finished but no {'model' if full else 'adapter'} was written to {staging}")
        tokenizer.save_pretrained(str(staging))
        replace_output(staging, final)
    trainer.accelerator.wait_for_everyone()
    return final


def _resume_command(recipe: Recipe, method: Method) -> str:
    """The command as it was run, overrides included; a time box (stop_at_step) would stop the resumed run again."""
    return stage_command(recipe, method.name, "training.resume_from_checkpoint=auto", drop=("training.stop_at_step",))


def _stopped(recipe: Recipe, method: Method, out: Path, trainer, guard, preemption, stop) -> dict | None:
    """None when training ran to its end; an 'interrupted' record, or a UserError for an abort."""
    resume_cmd = _resume_command(recipe, method)
    if guard.aborted_at is not None:
        raise UserError(
            f"non-finite loss or gradient at step {guard.aborted_at} (training.nonfinite={recipe.training.nonfinite}, "
            f"{guard.skipped} bad steps); the last good state is saved in {out}/checkpoint-{trainer.state.global_step}; "
            f"lower the learning rate or check the data, then resume: {resume_cmd}"
        )
    interrupted = preemption.preempted_at if preemption.preempted_at is not None else stop.stopped_at
    if interrupted is None:
        return None
    why = "preempted" if preemption.preempted_at is not None else "stopped (training.stop_at_step)"
    latency = ""
    if preemption.signalled_at is not None:
        latency = f" {time.monotonic() - preemption.signalled_at:.2f}s after the signal"
    message = f"{why} at step {interrupted}; checkpoint saved in {out}{latency}; resume with: {resume_cmd}"
    log.warning(message)
    if trainer.is_world_process_zero():
        sys.stderr.write(message + "\n")
    if preemption.preempted_at is not None and trainer.is_local_process_zero():  # one per node: its supervisor
        write_marker(interrupted, str(out))  # exits 0 even if the launcher did not
    return {
        "stage": recipe.stage,
        "method": method.name,
        "status": "interrupted",
        "step": interrupted,
        "output_dir": str(out),
        "resume": resume_cmd,
    }


def _claim(recipe: Recipe, out: Path, resume: str | None, overwrite: bool) -> None:
    """The folder check on the main process (it may move an earlier run aside); every rank raises its refusal."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    problem = [None]
    if state.is_main_process:
        try:
            outdir.claim(recipe, out, resume, overwrite)
        except UserError as err:
            problem = [str(err)]
    if state.num_processes > 1:
        broadcast_object_list(problem, from_process=0)
    if problem[0] is not None:
        raise UserError(problem[0])


def preflight(recipe: Recipe, launch: Launch, launched_precision: str | None = None, overwrite: bool = False) -> None:
    """The start-up checks of `run_stage`, run once before a distributed launch (`make train-*`, which then
    launches the recipe's own method).

    Inside a launch every rank would refuse the same recipe, and the launcher would add its own
    failure report; here the refusal is one line from one process, before any rank starts.
    """
    from data_prep.build import require_fresh

    check_launch(recipe, launch, launched_precision)
    check_report_to(recipe.training.report_to)
    out = Path(recipe.output_dir)
    check_writable(out)
    outdir.refuse_if_locked(out)
    resume = resume_point(recipe, out)
    if finished_stage(recipe, out) is None:
        outdir.claim(recipe, out, resume, overwrite, move=False)  # --overwrite moves files aside inside the launch
    adapter_chain(recipe.parent)
    if recipe.method in ("sft", "distill") and launch.world_size > 1:
        require_fresh(recipe, load_tokenizer(recipe.model))


def _metrics(
    trainer, method: Method, result, eval_metrics: dict, launch: Launch, sharding: str, resume, guard, started: float
) -> dict:
    """What stage.json records of a finished run: the shared figures, then the method's own."""
    history = trainer.state.log_history
    curve = losses(history)
    return {
        # A resumed process averages only its own steps; the log (restored from the checkpoint) holds all of them.
        "train_loss": mean_logged_loss(history) if resume else result.training_loss,
        "train_loss_first": curve[0][1] if curve else None,
        "train_loss_last": curve[-1][1] if curve else None,
        "eval_loss": eval_metrics.get("eval_loss"),
        "eval": {k: v for k, v in eval_metrics.items() if isinstance(v, float)},
        "global_steps": trainer.state.global_step,
        "train_tokens": None,
        "padding_efficiency": None,
        "seconds": round(time.perf_counter() - started, 2),
        "world_size": launch.world_size,
        "strategy": launch.strategy,
        "sharding": sharding,
        "resumed_from": resume,
        "nonfinite_skipped_steps": guard.skipped,
        "gradient_accumulation_steps": trainer.args.gradient_accumulation_steps,
        **method.metrics(trainer, history),
    }


def run_stage(recipe: Recipe, method: Method, overwrite: bool = False) -> dict:
    """Train one stage with `method`; return its stage record (what stage.json holds).

    `overwrite`: a fresh run in a folder holding an earlier run moves that run aside (deletes nothing)."""
    out = Path(recipe.output_dir)
    check_writable(out)
    held = is_main_process()  # the main process of a launch holds the folder for all ranks
    if held:
        outdir.acquire(out)
    try:
        return _run_stage(recipe, method, overwrite)
    finally:
        if held:
            outdir.release(out)


def _run_stage(recipe: Recipe, method: Method, overwrite: bool) -> dict:

    started = time.perf_counter()
    if recipe.method != method.name:
        raise UserError(
            f"{recipe.source_path} has method: {recipe.method}; run python -m train {recipe.method} "
            f"(or pass method={method.name})"
        )
    out = Path(recipe.output_dir)
    launch = detect_launch()
    check_launch(recipe, launch)
    check_report_to(recipe.training.report_to)
    resume = resume_point(recipe, out)
    finished = finished_stage(recipe, out)
    if finished is not None:
        return finished
    _claim(recipe, out, resume, overwrite)
    preemption = PreemptionCallback()  # from here on a signal is a request to stop cleanly
    try:
        return _train(recipe, method, out, launch, resume, preemption, started)
    finally:
        preemption.restore()


def _train(recipe: Recipe, method: Method, out: Path, launch, resume, preemption, started: float) -> dict:
    from transformers import set_seed

    method.check(recipe)
    set_seed(recipe.training.seed)
    adapter_chain(recipe.parent)  # parent stages present, before any heavy work
    tokenizer = load_tokenizer(recipe.model)
    check_free_disk(out, stage_disk_estimate(load_model_config(recipe.model), recipe))
    data = method.data(recipe, tokenizer, launch)
    if is_main_process():
        trim_metrics_log(out / "metrics.jsonl", resume)
    stop = StopAtStep(recipe.training.stop_at_step)
    trainer = method.trainer(
        recipe, tokenizer, data, out, [MetricsLogCallback(out / "metrics.jsonl"), preemption, stop]
    )
    trainer.run_identity = outdir.run_identity(recipe, data.manifest.get("fingerprint"))
    outdir.check_resume_data(resume, trainer.run_identity)
    guard = NonFiniteGuard(trainer, recipe.training.nonfinite, recipe.training.max_consecutive_nonfinite)
    trainer.add_callback(guard)
    if resume and (Path(resume) / STAGE_STATE).is_file():  # tokens seen before the interruption, and so on
        trainer.load_extra_state(json.loads((Path(resume) / STAGE_STATE).read_text()))
    sharding = sharding_in_effect(trainer)
    check_sharding(launch, sharding)
    log.info(
        "%s stage %s: %d train rows, %d eval rows, parent=%s, %d process(es), sharding=%s",
        method.name,
        recipe.stage,
        len(data.train),
        len(data.eval) if data.eval is not None else 0,
        recipe.parent,
        launch.world_size,
        sharding,
    )
    if preemption.requested:  # signalled while loading: nothing trained, nothing to save
        again = _resume_command(recipe, method)
        message = f"preempted before training began; nothing to save; run again with: {again}"
        log.warning(message)
        if trainer.is_world_process_zero():
            sys.stderr.write(message + "\n")
        return {"stage": recipe.stage, "method": method.name, "status": "interrupted", "step": 0, "resume": again}
    result = trainer.train(resume_from_checkpoint=resume)
    interrupted = _stopped(recipe, method, out, trainer, guard, preemption, stop)
    if interrupted is not None:
        return interrupted
    try:
        eval_metrics = trainer.evaluate() if data.eval is not None else {}
    except EvaluationPreempted:  # the last checkpoint holds every step; a resume only evaluates and saves
        return _stopped(recipe, method, out, trainer, guard, preemption, stop)
    save_weights(trainer, out, tokenizer, recipe.full_finetune)
    if trainer.is_world_process_zero():
        method.save_extra(trainer, out, tokenizer)
    history = trainer.state.log_history
    metrics = _metrics(trainer, method, result, eval_metrics, launch, sharding, resume, guard, started)
    # With training.global_batch_size the accumulation was derived: record the value the run used.
    used = dataclasses.replace(recipe.training, gradient_accumulation_steps=trainer.args.gradient_accumulation_steps)
    record = write_stage_outputs(dataclasses.replace(recipe, training=used), out, data.manifest, metrics, history)
    first, last, mean = metrics["train_loss_first"], metrics["train_loss_last"], metrics["train_loss"]
    if first is not None:
        loss = f"loss {first:.3f} -> {last:.3f}"
    else:  # fewer steps than training.logging_steps: no step was logged
        loss = f"mean loss {mean:.3f} (no step logged: logging_steps={recipe.training.logging_steps})" if mean else "-"
    log.info("%s stage %s done: %s, %.1fs -> %s", method.name, recipe.stage, loss, metrics["seconds"], out)
    return record
