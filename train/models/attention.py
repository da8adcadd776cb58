"""`sdpa_packed`: PyTorch SDPA run on each packed sequence separately.

Padding-free packing flattens a micro-batch into one row; stock SDPA then attends over the whole row
with a block-diagonal mask, so with ~9 sequences per 2k-token row about 8/9 of the attention work is
masked away. flash-attn's varlen kernel avoids that on GPU; without it (CPU, or a GPU with no
flash-attn) this runs causal SDPA per sequence using the boundaries TRL's collator already passes
(`cu_seq_lens_q`). Anything else (padded batches, generation with a KV cache) goes to stock SDPA.
No library provides this for SDPA, hence the few lines here.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_packed"

# Every layer receives the same boundaries tensor; reading it to the host syncs a GPU, so read it once per
# forward (the first layer) instead of once per layer and again in checkpoint recomputation.
_boundaries_read: tuple[torch.Tensor | None, list[int]] = (None, [])


def _cuts(boundaries: torch.Tensor) -> list[int]:
    global _boundaries_read
    if _boundaries_read[0] is not boundaries:
        _boundaries_read = (boundaries, boundaries.tolist())
    return _boundaries_read[1]


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    boundaries = kwargs.get("cu_seq_lens_q")
    if boundaries is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cuts = _cuts(boundaries)
    gqa = query.shape[1] != key.shape[1]
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            is_causal=True,
            scale=scaling,
            dropout_p=dropout if module.training else 0.0,
            enable_gqa=gqa,
        )
        for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        if b > a
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)
