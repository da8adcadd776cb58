"""Ulysses sequence parallelism: N ranks share each training sequence, every rank holding 1/N of its tokens.

    training.sequence_parallel: 2     (launched with accelerate on a multiple of 2 processes)

Each group of N consecutive ranks receives the same micro-batch; the collator wrapper shifts the labels
over the whole sequence, then keeps this rank's 1/N chunk of every token-aligned tensor (position ids
included, so RoPE sees global positions). Attention is DeepSpeed's Ulysses core (`UlyssesSPAttentionHF`,
the attention half of its ALST): an all-to-all turns [batch, heads, seq/N, dim] into [batch, heads/N,
seq, dim] (KV heads replicated when N exceeds them), the inner kernel (sdpa_packed, or flash attention on
a GPU) attends over the whole sequence with TRL's unsharded packing boundaries (`cu_seq_lens_q`), and a
second all-to-all turns the result back. The loss needs nothing new: TRL's token sum over the global
token count (`average_tokens_across_devices`) already averages over the real completion tokens of the
whole sequence, and DDP/ZeRO/FSDP average gradients over all ranks.

What is ours and why: the rest of DeepSpeed's ALST, as accelerate's ParallelismConfig wires it, runs only
under a DeepSpeed launch, drops the attention mask for SDPA (packed documents then attend to each other),
refuses any kernel but sdpa/flash (so not sdpa_packed), and its dataloader adapter fails on TRL's
padding-free batches (1-D `cu_seq_lens_q`); on CPU it also needs deepspeed.comm started by hand (accelerate
skips it without CUDA) and every batch padded to one width (gloo's all_gather). So the batch sharing, the
shift-then-split collator and the kernel registration are here, and work under DDP, ZeRO and FSDP2, with
and without packing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface

from train.models.attention import NAME as PACKED
from train.models.attention import packed_sdpa_forward

_state: dict = {"size": 1, "group": None, "rank": 0}


def _inner_kernel(name: str):
    if name == PACKED:
        return packed_sdpa_forward
    return AttentionInterface._global_mapping[name]  # flash_attention_2/3: varlen over cu_seq_lens on a GPU


def enable(model, size: int) -> None:
    """Make every rank's attention sequence-parallel in groups of `size` consecutive ranks (all ranks call it)."""
    if size == 1:
        return
    import deepspeed
    import deepspeed.comm as ds_comm
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    if not ds_comm.is_initialized():  # accelerate starts it only for a DeepSpeed launch on GPUs: reuse torch's group
        deepspeed.init_distributed(dist_backend=dist.get_backend())
    world, rank = dist.get_world_size(), dist.get_rank()
    for start in range(0, world, size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            _state.update(size=size, group=group, rank=rank - start)
    config, inner_name = model.config, model.config._attn_implementation
    inner = _inner_kernel(inner_name)
    cores: dict[int, UlyssesSPAttentionHF] = {}

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        batch = query.shape[0]
        if batch not in cores:  # DeepSpeed's core is built for one micro-batch size; an epoch's last may be smaller
            cores[batch] = UlyssesSPAttentionHF(
                attn=inner,
                batch_size=batch,
                attn_head_count=config.num_attention_heads,
                attn_head_size=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                kv_head_count=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                num_hidden_layers=config.num_hidden_layers,
                process_group=_state["group"],
                seq_length_is_variable=True,
                disable_in_eval=True,  # evaluation and generation see whole sequences
            )
        return cores[batch](module, query, key, value, attention_mask, *args, **kwargs)

    name = f"ulysses_{inner_name}"
    AttentionInterface.register(name, attention)
    model.set_attn_implementation(name)


class ShardCollator:
    """The trainer's collator, then labels shifted over the whole sequence and this rank's chunk kept."""

    def __init__(self, inner, size: int, rank: int):
        self.inner, self.size, self.rank = inner, size, rank

    def __call__(self, examples):
        batch = self.inner(examples)
        length = batch["input_ids"].shape[1]
        if length % self.size:
            raise ValueError(
                f"a batch of {length} tokens does not split over training.sequence_parallel={self.size}; "
                "pad_to_multiple_of must be a multiple of it (build_sft_config sets it)"
            )
        # Shift before splitting: the last token of one chunk predicts the first token of the next.
        batch["shift_labels"] = F.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
        if "position_ids" not in batch:
            batch["position_ids"] = torch.arange(length).expand_as(batch["input_ids"]).clone()
        chunk = length // self.size
        part = slice(self.rank * chunk, (self.rank + 1) * chunk)
        return {
            k: v[:, part] if torch.is_tensor(v) and v.dim() == 2 and v.shape[1] == length else v
            for k, v in batch.items()
        }


def shard_dataloader(loader, size: int) -> None:
    """Give every rank of a group the same batches: accelerate's shard then counts groups, not ranks."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sampler = loader.batch_sampler
    sampler.num_processes, sampler.process_index = world // size, rank // size


def group_rank() -> int:
    return _state["rank"]
