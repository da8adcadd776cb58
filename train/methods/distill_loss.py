"""Logit distillation: the teacher's top-k next-token log-probs, live or cached on disk, and the loss.

Both paths give the teacher's distribution over the same support, its top-k tokens plus one tail bucket
for the rest of the vocabulary, so the cached path (computed once before training, the teacher then
freed) and the live path (the teacher beside the student) train the same loss. The divergence is TRL's
generalized JSD over that sparse support (beta 0 = forward KL, as its server distillation computes it).

Cache layout (<output_dir>/teacher_cache/): shard-NNNNN.safetensors with `indices` (tokens x k, int32)
and `logprobs` (tokens x k, float32), and index.json mapping each row, by a hash of its token ids, to
(shard, offset, count). Rows are found by content, so packing, shuffling and the number of processes
do not matter. Written shard by shard: an interrupted build resumes at the next shard.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from pathlib import Path

import torch
from trl.experimental.gkd.gkd_trainer import GKDTrainer

# TRL's sparse top-k divergence (its server distillation's): the tail bucket makes the k kept log-probs a
# distribution, and the JSD is computed over that support. Private to that module in the pinned TRL.
from trl.experimental.server_distillation.server_distillation_trainer import _add_tail_bucket, _jsd_divergence

from train.core.errors import UserError
from train.core.io import write_json
from train.core.log import get_logger
from train.methods.trainers import StageSFTTrainer

log = get_logger("distill")

CACHE_INDEX = "index.json"


def row_key(ids) -> str:
    return hashlib.sha1(torch.as_tensor(ids, dtype=torch.int32).numpy().tobytes()).hexdigest()


def prompt_and_reference(row: dict) -> dict:
    """A processed row split at its first trained token: {"prompt": ids, "reference": completion ids}."""
    mask = row["completion_mask"]
    start = mask.index(1) if 1 in mask else len(mask)
    return {"prompt": row["input_ids"][:start], "reference": row["input_ids"][start:]}


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (B, T-1): positions whose logits predict a trained (label != -100) token."""
    return labels[:, 1:] != -100


def segments(inputs: dict) -> list[torch.Tensor]:
    """The token ids of each example in a batch, in order: packed rows split at position 0, padded rows trimmed."""
    ids = inputs["input_ids"]
    if "attention_mask" in inputs and "position_ids" not in inputs:
        return [row[mask.bool()] for row, mask in zip(ids, inputs["attention_mask"], strict=True)]
    out = []
    for row, pos in zip(ids, inputs["position_ids"], strict=True):
        starts = (pos == 0).nonzero().flatten().tolist()
        bounds = starts + [row.numel()]
        out += [row[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if "attention_mask" in inputs:  # padded rows with position ids: trailing pad segments carry no target
        out = [s for s in out if s.numel()]
    return out


def teacher_topk(logits: torch.Tensor, k: int, temperature: float, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, log-probs) of the k likeliest tokens of (N, V) logits, over the tokenizer's real vocabulary."""
    logprobs = torch.log_softmax(logits[..., :vocab].float() / temperature, dim=-1)
    values, indices = logprobs.topk(k, dim=-1)
    return indices.to(torch.int32), values


def sparse_divergence(student_logits, indices, teacher_logprobs, beta: float, temperature: float, vocab: int):
    """Per-token generalized JSD between the teacher's top-k (+ tail) and the student on the same support."""
    student = torch.log_softmax(student_logits[..., :vocab].float() / temperature, dim=-1)
    student_k = student.gather(-1, indices.long())
    valid = torch.ones_like(student_k, dtype=torch.bool)
    student_s, support = _add_tail_bucket(student_k, valid)
    teacher_s, _ = _add_tail_bucket(teacher_logprobs.to(student_k.dtype), valid)
    return _jsd_divergence(student_s, teacher_s, beta=beta, support_mask=support).sum(-1)


class TeacherCache:
    """Read side of the cache: the teacher's top-k rows for the examples of a batch, by content."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = json.loads((folder / CACHE_INDEX).read_text())
        self.rows: dict[str, list[int]] = index["rows"]
        self.meta = index["meta"]
        self._open: dict[int, object] = {}

    def _shard(self, n: int):
        from safetensors import safe_open

        if n not in self._open:
            self._open[n] = safe_open(str(self.folder / f"shard-{n:05d}.safetensors"), framework="pt")
        return self._open[n]

    def lookup(self, seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        indices, logprobs = [], []
        for seq in seqs:
            key = row_key(seq.cpu())
            if key not in self.rows:
                raise UserError(
                    f"a training row is not in the teacher cache {self.folder} (the processed data changed "
                    "after the cache was built); delete that folder and run the stage again"
                )
            shard, offset, count = self.rows[key]
            f = self._shard(shard)
            indices.append(f.get_slice("indices")[offset : offset + count])
            logprobs.append(f.get_slice("logprobs")[offset : offset + count])
        return torch.cat(indices), torch.cat(logprobs)


def build_teacher_cache(teacher, datasets: list, folder: Path, meta: dict, batch_size: int = 8, shard_rows=512):
    """Top-k log-probs of the teacher at every trained position of every row (resumable, shard by shard)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    index_path = folder / CACHE_INDEX
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    if index is not None and index["meta"] != meta:
        log.info("teacher cache in %s was built for another teacher or settings: building it again", folder)
        for old in folder.glob("shard-*.safetensors"):
            old.unlink()
        index = None
    index = index or {"meta": meta, "rows": {}, "shards": 0}
    device = next(teacher.parameters()).device
    rows = (row for data in datasets for row in data if row_key(row["input_ids"]) not in index["rows"])
    done = 0
    while chunk := list(itertools.islice(rows, shard_rows)):  # one shard's rows in memory at a time
        shard, all_idx, all_lp, offset = index["shards"], [], [], 0
        for b in range(0, len(chunk), batch_size):
            batch = chunk[b : b + batch_size]
            width = max(len(r["input_ids"]) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for i, r in enumerate(batch):
                n = len(r["input_ids"])
                ids[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), 1
                labels[i, :n] = torch.where(torch.tensor(r["completion_mask"]).bool(), ids[i, :n], -100)
            with torch.no_grad():
                logits = teacher(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1]
            targets = target_positions(labels)
            for i, r in enumerate(batch):
                idx, lp = teacher_topk(
                    logits[i][targets[i].to(device)], meta["top_k"], meta["temperature"], meta["vocab"]
                )
                all_idx.append(idx.cpu())
                all_lp.append(lp.cpu())
                index["rows"][row_key(r["input_ids"])] = [shard, offset, int(idx.shape[0])]
                offset += int(idx.shape[0])
        save_file(
            {"indices": torch.cat(all_idx).contiguous(), "logprobs": torch.cat(all_lp).contiguous()},
            str(folder / f"shard-{shard:05d}.safetensors"),
        )
        index["shards"] = shard + 1
        write_json(index_path, index)  # the shard is complete: a rerun starts after it
        done += len(chunk)
        log.info("teacher cache: %d rows in %d shard(s)", done, index["shards"])
    return folder


class StageDistillTrainer(StageSFTTrainer):
    """SFTTrainer whose loss is the divergence from the teacher on the completion tokens (stage guards kept).

    `teacher` (live) or `cache` (a TeacherCache) gives the teacher's top-k; `on_policy` is the share of
    micro-batches whose completions the student generates first (TRL GKD's generation step)."""

    def __init__(self, *args, teacher=None, cache=None, settings=None, vocab: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.cache, self.settings, self.vocab = teacher, cache, settings, vocab
        if teacher is not None and self.is_deepspeed_enabled:  # as TRL's GKD: ZeRO-3 shards the teacher too
            from trl.models import prepare_deepspeed

            self.teacher = prepare_deepspeed(teacher, self.accelerator)
        elif teacher is not None:
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _teacher_topk(self, inputs, targets):
        s = self.settings
        if self.cache is not None:
            indices, logprobs = self.cache.lookup(segments(inputs))
            return indices.to(targets.device), logprobs.to(targets.device)
        model_inputs = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
        with torch.no_grad():
            logits = self.teacher(**model_inputs, use_cache=False).logits[:, :-1][targets]
        return teacher_topk(logits, s.top_k, s.temperature, self.vocab)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        s = self.settings
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        outputs = model(**model_inputs, use_cache=False)
        targets = target_positions(inputs["labels"])
        indices, teacher_lp = self._teacher_topk(inputs, targets)
        student_logits = outputs.logits[:, :-1][targets]
        if indices.shape[0] != student_logits.shape[0]:
            raise UserError(
                f"the teacher cache holds {indices.shape[0]} positions for a batch with {student_logits.shape[0]} "
                "trained tokens (the data or data.max_length changed); delete the teacher_cache folder and rerun"
            )
        per_token = sparse_divergence(student_logits, indices, teacher_lp, s.beta, s.temperature, self.vocab)
        tokens = targets.sum()
        denominator = num_items_in_batch if num_items_in_batch is not None else tokens.clamp(min=1)
        loss = per_token.sum() / torch.as_tensor(denominator, device=per_token.device)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; the denominator is global
        mode = "train" if model.training else "eval"
        total = self.accelerator.gather_for_metrics(per_token.detach().sum().reshape(1)).sum()
        count = self.accelerator.gather_for_metrics(tokens.reshape(1)).sum()
        self._metrics[mode]["teacher_divergence"].append((total / count.clamp(min=1)).item())
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        own = self.settings.on_policy > 0 and random.random() < self.settings.on_policy
        if own:
            inputs = self._on_policy_inputs(model, inputs)
            num_items_in_batch = None  # the student's answers have their own length: a per-batch mean
        if self.settings.on_policy > 0:
            self._metrics["train"]["on_policy"].append(float(own))
        return super().training_step(model, inputs, num_items_in_batch)

    def _on_policy_inputs(self, model, inputs):
        """The student answers each row's prompt; the teacher then scores those tokens (GKD)."""
        from transformers import GenerationConfig
        from trl.models.utils import unwrap_model_for_generation

        ids, labels = inputs["input_ids"], inputs["labels"]
        starts = [int((row != -100).nonzero()[0]) if (row != -100).any() else row.numel() for row in labels]
        width = max(starts)
        pad = self.processing_class.pad_token_id
        prompts = torch.full((ids.shape[0], width), pad, dtype=ids.dtype, device=ids.device)
        prompt_mask = torch.zeros_like(prompts)
        for i, n in enumerate(starts):  # left-padded, as generate() wants
            prompts[i, width - n :], prompt_mask[i, width - n :] = ids[i, :n], 1
        config = GenerationConfig(
            max_new_tokens=self.settings.max_new_tokens,
            do_sample=True,
            temperature=self.settings.temperature,
            top_k=0,
            top_p=1.0,
            pad_token_id=pad,
            eos_token_id=self.processing_class.eos_token_id,
        )
        with unwrap_model_for_generation(model, self.accelerator) as student:
            new_ids, new_mask, new_labels = GKDTrainer.generate_on_policy_outputs(
                student, {"prompts": prompts, "prompt_attention_mask": prompt_mask}, config
            )
        return {"input_ids": new_ids, "attention_mask": new_mask, "labels": new_labels}
