"""Knowledge distillation: a smaller student (this recipe's model) learns from a trained teacher stage.

    python -m train distill recipes/tiny/distill.yaml
    accelerate launch --config_file accelerate_configs/zero3.yaml --num_processes 8 \\
        -m train distill recipes/distill_32b_to_7b.yaml

`distill.mode: logit` trains the student's next-token distribution towards the teacher's on every
completion token of the stage's processed data (top-k + tail divergence, train/methods/distill_loss.py),
with the teacher live beside the student or its log-probs cached to disk first
(`distill.teacher_logits: cached`), optionally on the student's own answers (`distill.on_policy`).
`distill.mode: sequence` has the teacher write `<think>` answers for the stage's prompts
(train/methods/distill_sequence.py; resumable, verified against references when asked) and SFTs the
student on them. Either way the shared stage runner gives checkpoints, resume, preemption and
lineage; stage.json records the teacher, its chain and the settings, and the finished stage is
compared with its teacher on held-out prompts (KL, answer agreement: distill_report.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from data_prep.build import load_processed
from train.core.config import Recipe
from train.core.errors import UserError
from train.core.log import get_logger
from train.methods.launch import Launch
from train.methods.runner import Method, StageData, run_stage
from train.methods.sft import trainer_inputs
from train.methods.trainers import StageSFTTrainer
from train.models.lineage import adapter_chain, stage_lineage
from train.models.teacher import check_same_tokenizer, is_stage, load_teacher, teacher_identity

log = get_logger("distill")

CACHE_DIR = "teacher_cache"


def teacher_record(recipe: Recipe) -> dict:
    """What stage.json says of the teacher: where, its lineage, an identity that changes with its weights."""
    teacher = recipe.distill.teacher
    chain = [str(p) for p in stage_lineage(teacher)] if is_stage(teacher) else []
    settings = dataclasses.asdict(recipe.distill)
    return {"teacher": teacher, "teacher_chain": chain, "teacher_identity": teacher_identity(teacher), **settings}


class Distill(Method):
    name = "distill"

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.report: dict | None = None

    def check(self, recipe: Recipe) -> None:
        teacher = recipe.distill.teacher
        if Path(teacher).resolve() == Path(recipe.output_dir).resolve():
            raise UserError(f"{recipe.source_path}: distill.teacher is this stage's own output_dir")
        if Path(teacher).exists() and not is_stage(teacher) and not (Path(teacher) / "config.json").is_file():
            raise UserError(
                f"{recipe.source_path}: distill.teacher {teacher} is neither a trained stage (stage.json) nor a "
                "model folder (config.json); train the teacher stage first or point at its merged/ folder"
            )
        if is_stage(teacher):
            adapter_chain(teacher)  # the teacher's own lineage is complete

    def data(self, recipe: Recipe, tokenizer, launch: Launch) -> StageData:
        d = recipe.distill
        if d.mode == "sequence":
            from train.methods.distill_sequence import sequence_data

            self.stage_data = sequence_data(recipe, tokenizer, launch)
            return self.stage_data
        check_same_tokenizer(tokenizer, d.teacher)
        train, held, manifest = load_processed(recipe, tokenizer, allow_build=launch.world_size == 1)
        if d.teacher_logits == "cached":
            self._ensure_cache(recipe, tokenizer, [x for x in (train, held) if x is not None], launch)
        self.stage_data = StageData(train, held, manifest)  # the rows as processed (the trainer packs its own)
        return self.stage_data

    def _cache_meta(self, recipe: Recipe, tokenizer) -> dict:
        d = recipe.distill
        return {
            "teacher": teacher_identity(d.teacher),
            "top_k": d.top_k,
            "temperature": d.temperature,
            "vocab": len(tokenizer),
            "teacher_quantization": d.teacher_quantization,
        }

    def _ensure_cache(self, recipe: Recipe, tokenizer, datasets: list, launch: Launch) -> None:
        import json

        from train.methods.distill_loss import CACHE_INDEX, build_teacher_cache, row_key

        folder, meta = Path(recipe.output_dir) / CACHE_DIR, self._cache_meta(recipe, tokenizer)
        index = folder / CACHE_INDEX
        if index.is_file():
            saved = json.loads(index.read_text())
            if saved["meta"] == meta and all(row_key(r["input_ids"]) in saved["rows"] for d in datasets for r in d):
                return
        if launch.world_size > 1:
            raise UserError(
                f"the teacher cache {folder} is missing or stale; build it once on one process before the launch: "
                f"{recipe.command('train distill', '--prepare-only')}"
            )
        teacher = load_teacher(
            recipe.distill.teacher, recipe.distill.teacher_quantization, Path(recipe.output_dir), "sdpa"
        )
        build_teacher_cache(teacher, datasets, folder, meta, batch_size=recipe.distill.generation_batch_size)
        del teacher

    def trainer(self, recipe: Recipe, tokenizer, data: StageData, out: Path, callbacks: list):
        from train.methods.distill_loss import StageDistillTrainer, TeacherCache

        d = recipe.distill
        inputs = trainer_inputs(recipe, tokenizer, data, out, callbacks)  # the student, as SFT builds it
        if d.mode == "sequence":
            return StageSFTTrainer(**inputs)
        teacher = cache = None
        if d.teacher_logits == "live":
            teacher = load_teacher(d.teacher, d.teacher_quantization, out, recipe.model.attn_implementation)
        else:
            cache = TeacherCache(out / CACHE_DIR)
        return StageDistillTrainer(**inputs, teacher=teacher, cache=cache, settings=d, vocab=len(tokenizer))

    def metrics(self, trainer, history: list[dict]) -> dict:
        real, slots = trainer.token_totals()
        divergence = [h["teacher_divergence"] for h in history if "teacher_divergence" in h]
        return {
            "train_tokens": real,
            "token_slots": slots,
            "padding_efficiency": round(real / slots, 4) if slots else None,
            "teacher_divergence_first": divergence[0] if divergence else None,
            "teacher_divergence_last": divergence[-1] if divergence else None,
            "distill": teacher_record(self.recipe),
            "teacher_agreement": self.report,
        }

    def save_extra(self, trainer, out: Path, tokenizer) -> None:
        """One process: the finished student beside its teacher on held-out prompts (distill_report.py)."""
        from train.methods.distill_report import agreement_in_stage

        if self.recipe.distill.mode == "sequence":
            try:
                check_same_tokenizer(tokenizer, self.recipe.distill.teacher)
            except UserError:
                log.info("the teacher tokenizes differently: no token-level comparison with the student")
                return
        if self.recipe.distill.report_prompts and trainer.accelerator.num_processes == 1:
            self.report = agreement_in_stage(self.recipe, trainer, tokenizer, self.stage_data)
        elif self.recipe.distill.report_prompts:
            log.info("compare the student with its teacher after the launch: python -m train distill-report %s", out)


def run_distill(recipe: Recipe, overwrite: bool = False) -> dict:
    """Train one distill stage; return its stage record (what stage.json holds)."""
    return run_stage(recipe, Distill(recipe), overwrite=overwrite)


def prepare_distill(recipe: Recipe) -> StageData:
    """`--prepare-only`: the processed data and the teacher's answers (sequence) or log-prob cache (cached),
    on one process, so that a distributed launch finds them ready instead of building them on every rank."""
    from train.methods import outdir
    from train.methods.launch import detect_launch
    from train.models.loading import load_tokenizer

    launch = detect_launch()
    if launch.world_size > 1:
        raise UserError("--prepare-only runs on one process, before the launch: python -m train distill ...")
    method, out = Distill(recipe), Path(recipe.output_dir)
    method.check(recipe)
    out.mkdir(parents=True, exist_ok=True)
    outdir.acquire(out)
    try:
        return method.data(recipe, load_tokenizer(recipe.model), launch)
    finally:
        outdir.release(out)
