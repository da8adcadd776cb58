"""The teacher of a distill stage: a trained stage (its adapter chain merged into its base) or a model folder.

    teacher = load_teacher("outputs/demo/stage1", attn_implementation="sdpa_packed")

A stage folder is merged in memory (16-bit, as `train merge` would write it), or streamed to
`<work_dir>/teacher_merged/` and loaded in 4-bit when `quantization="nf4"`. A folder with a config.json
or a Hub id loads as it is. `check_same_tokenizer` refuses a teacher whose vocabulary differs from the
student's: token-level distillation compares distributions over the same token ids.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import fields
from pathlib import Path

from train.core.config import ModelConfig
from train.core.errors import UserError
from train.core.log import get_logger
from train.models.lineage import Chain, read_stage, resolve_chain, stage_weights
from train.models.loading import (
    chain_identity,
    folder_identity,
    load_merged_16bit,
    pin_4bit_cpu_path,
    quantization_config,
    resolve_model_path,
    torch_dtype,
)

log = get_logger("teacher")


def is_stage(path: str) -> bool:
    return (Path(path) / "stage.json").is_file()


def teacher_model_config(teacher: str) -> ModelConfig:
    """The base model settings the teacher stage was trained with (a folder or Hub id: defaults)."""
    if not is_stage(teacher):
        return ModelConfig(name_or_path=teacher)
    saved = read_stage(teacher).get("recipe", {}).get("model", {})
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in saved.items() if k in known})


def teacher_chain(teacher: str) -> Chain:
    """A stage teacher's lineage: its base (or newest full fine-tuning stage) and the adapters on it."""
    model_cfg = teacher_model_config(teacher)
    return resolve_chain(teacher, model_cfg.name_or_path, model_cfg.revision)


def teacher_tokenizer_source(teacher: str) -> str:
    """Where the teacher's tokenizer lives: a stage's adapter/ (or model/) holds the one it trained with."""
    if is_stage(teacher):
        weights = stage_weights(teacher)
        return (
            str(weights)
            if (weights / "tokenizer_config.json").is_file()
            else resolve_model_path(teacher_model_config(teacher).name_or_path)
        )
    return resolve_model_path(teacher)


def teacher_identity(teacher: str) -> str:
    """Changes when the teacher changes (its stage trained again, another folder): keys the logit cache."""
    where = str(Path(teacher).resolve() if Path(teacher).exists() else teacher)
    if is_stage(teacher):
        return chain_identity(teacher_chain(teacher), where)
    return hashlib.sha256(f"{where}:{folder_identity(resolve_model_path(teacher))}".encode()).hexdigest()[:16]


def check_same_tokenizer(student_tokenizer, teacher: str) -> None:
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(teacher_tokenizer_source(teacher))
    ours_vocab, their_vocab = student_tokenizer.get_vocab(), theirs.get_vocab()
    if ours_vocab != their_vocab:
        differ = len(set(ours_vocab.items()) ^ set(their_vocab.items()))
        raise UserError(
            f"distill.teacher {teacher} tokenizes differently from the student ({len(their_vocab)} vs "
            f"{len(ours_vocab)} tokens, {differ} entries differ); logit distillation compares the two models' "
            "distributions token id by token id. Use a student of the teacher's family (same tokenizer), or "
            "distill.mode: sequence (the student learns from the teacher's written answers, any tokenizer)"
        )


def load_teacher(teacher: str, quantization: str = "none", work_dir: Path | None = None, attn_implementation=None):
    """The teacher in eval mode with gradients off."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import is_deepspeed_zero3_enabled

    model_cfg = teacher_model_config(teacher)
    stage = is_stage(teacher)
    if stage and quantization == "none" and not is_deepspeed_zero3_enabled():
        model = load_merged_16bit(teacher_chain(teacher), model_cfg, attn_implementation)
    else:
        source = resolve_model_path(teacher)
        if stage:  # 4-bit or ZeRO-3-sharded: the chain merged in 16-bit once, on one process, then loaded
            source = str(merged_teacher_dir(teacher, model_cfg, work_dir))
        quant = quantization_config(ModelConfig(quantization=quantization, dtype=model_cfg.dtype))
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source,
                dtype=torch_dtype(model_cfg.dtype),
                quantization_config=quant,
                attn_implementation=attn_implementation,
                low_cpu_mem_usage=True,
            )
        except OSError as err:
            raise UserError(f"cannot load distill.teacher '{teacher}': {str(err).splitlines()[0]}") from None
        if quant is not None:
            pin_4bit_cpu_path(model)
    model.eval()
    model.requires_grad_(False)
    log.info("teacher %s loaded (%s, %s)", teacher, "stage" if stage else "model", quantization)
    return model


def merged_teacher_dir(teacher: str, model_cfg: ModelConfig, work_dir: Path | None) -> Path:
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from train.core.io import replace_output
    from train.models.merging import stream_merge

    chain = teacher_chain(teacher)
    if not chain.adapters:  # a full fine-tuning stage: its model/ is already a whole model, with its tokenizer
        return Path(resolve_model_path(chain.base))
    if work_dir is None:
        raise UserError("a 4-bit or sharded stage teacher needs a work folder for its merged 16-bit weights")
    target, identity = work_dir / "teacher_merged", teacher_identity(teacher)
    marker = target / "teacher.json"
    state = PartialState()
    with state.main_process_first():  # the others wait, then find it written
        current = json.loads(marker.read_text()).get("identity") if marker.is_file() else None
        if state.is_main_process and current != identity:
            tmp = work_dir / "teacher_merged.tmp"
            shutil.rmtree(tmp, ignore_errors=True)  # ours: a merge of this folder that did not finish
            # Tensor by tensor (bounded memory), and no from_pretrained: under ZeRO-3 that is a collective.
            stream_merge(resolve_model_path(chain.base), chain.adapters, tmp, model_cfg.dtype, revision=chain.revision)
            AutoTokenizer.from_pretrained(teacher_tokenizer_source(teacher)).save_pretrained(tmp)  # for vLLM
            (tmp / "teacher.json").write_text(json.dumps({"teacher": teacher, "identity": identity}) + "\n")
            replace_output(tmp, target)
    return target
