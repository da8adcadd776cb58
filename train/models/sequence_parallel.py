"""Ulysses sequence parallelism: N ranks share each training sequence, every rank holding 1/N of its tokens.

    training.sequence_parallel: 2     (launched with accelerate on a multiple of 2 processes)

Each group of N consecutive ranks receives the same micro-batch; the collator wrapper shifts the labels
over the whole sequence, then keeps this rank's 1/N chunk of every token-aligned tensor (position ids
included, so RoPE sees global positions). In each attention layer an all-to-all turns
[batch, heads, seq/N, dim] into [batch, heads/N, seq, dim], the inner kernel (sdpa_packed, or flash
attention on a GPU) attends over the whole sequence with TRL's unsharded packing boundaries
(`cu_seq_lens_q`), and a second all-to-all turns the result back. The loss needs nothing new: TRL's
token-sum over the global token count (`average_tokens_across_devices`) already averages over the real
completion tokens of the whole sequence, and DDP/ZeRO/FSDP average gradients over all ranks.

Why by hand: the library path (accelerate's ParallelismConfig with DeepSpeed's ALST Ulysses) runs only
under DeepSpeed, drops the attention mask with SDPA (packed documents then attend to each other), and
its dataloader adapter fails on TRL's padding-free batches (1-D `cu_seq_lens_q`); on CPU it also needs
DeepSpeed's comm started by hand and every batch padded to one width (gloo all_gather). The pieces here
work under DDP, ZeRO and FSDP2, with and without packing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface

from train.models.attention import NAME as PACKED
from train.models.attention import packed_sdpa_forward

_state: dict = {"size": 1, "group": None, "rank": 0}


class _AllToAll(torch.autograd.Function):
    """Split x along `scatter_dim` over the group and concatenate what arrives along `gather_dim`."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int):
        ctx.dims = (scatter_dim, gather_dim)
        send = [c.contiguous() for c in x.chunk(_state["size"], dim=scatter_dim)]
        received = [torch.empty_like(send[0]) for _ in send]
        dist.all_to_all(received, send, group=_state["group"])
        return torch.cat(received, dim=gather_dim)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _AllToAll.apply(grad, gather_dim, scatter_dim), None, None


def _ulysses(inner):
    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        if _state["size"] == 1 or not module.training:  # evaluation and generation see whole sequences
            return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        q, k, v = (_AllToAll.apply(t, 1, 2) for t in (query, key, value))  # [b, h, s/N, d] -> [b, h/N, s, d]
        out, _ = inner(module, q, k, v, None, dropout=dropout, scaling=scaling, **kwargs)  # [b, s, h/N, d]
        return _AllToAll.apply(out, 1, 2), None  # -> [b, s/N, h, d]

    return forward


def _inner_kernel(name: str):
    if name == PACKED:
        return packed_sdpa_forward
    return AttentionInterface._global_mapping[name]  # flash_attention_2/3: varlen over cu_seq_lens on a GPU


def enable(model, size: int) -> None:
    """Make every rank's attention sequence-parallel in groups of `size` consecutive ranks (all ranks call it)."""
    if size == 1:
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    for start in range(0, world, size):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            _state.update(size=size, group=group, rank=rank - start)
    inner = model.config._attn_implementation
    name = f"ulysses_{inner}"
    AttentionInterface.register(name, _ulysses(_inner_kernel(inner)))
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
