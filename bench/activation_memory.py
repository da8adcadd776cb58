"""Activation bytes per token per decoder layer of LoRA training, measured on small Qwen2 shapes, then fitted.

    python -m bench.activation_memory            (writes bench/results/<date>-<machine>.json/.md)

What a layer keeps for its backward is what autograd saves: every tensor that reaches
`torch.autograd.graph.saved_tensors_hooks` inside a decoder layer during one forward pass, counted once
per storage, weights (frozen base and LoRA) left out. A random Qwen2 in bf16 with LoRA r=16 on every
linear layer, SDPA attention, one sequence. The count is exact (no allocator noise) and linear in the
sequence length (checked at two lengths). The four shapes are fitted to
bytes/token/layer = b*hidden + c*intermediate + e*kv_dim + d (LoRA's rank-16 outputs and the like), and
checked on a sixth shape the fit did not see; train/methods/memory.py uses the fit to predict
the longest trainable sequence of the 32B (copy the coefficients there when this benchmark is rerun).
"""

from __future__ import annotations

import json
import sys

import numpy as np

# (layers, hidden, intermediate, heads, kv heads); head_dim 64; vocab 4096. One layer: what the whole forward
# shares (RoPE's cos/sin) is counted in it, slightly over-counting a deep model's layer.
SHAPES = [
    (1, 256, 768, 4, 2),
    (1, 512, 1536, 8, 2),
    (1, 512, 3072, 8, 4),
    (1, 1024, 2816, 16, 2),
    (1, 768, 2048, 12, 4),
]
CHECK = (1, 640, 1792, 10, 2)  # not fitted: the fit must predict it
LENGTHS = (256, 1024)
LORA_R = 16


def saved_bytes_per_token_per_layer(layers: int, hidden: int, inter: int, heads: int, kv: int, length: int) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=4096,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=length,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    lora = LoraConfig(r=LORA_R, lora_alpha=LORA_R, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    state = {"inside": False, "seen": set(), "bytes": 0}
    for layer in model.base_model.model.model.layers:
        layer.register_forward_pre_hook(lambda *_: state.update(inside=True))
        layer.register_forward_hook(lambda *_: state.update(inside=False))

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if state["inside"] and ptr not in weights and ptr not in state["seen"]:
            state["seen"].add(ptr)
            state["bytes"] += storage.nbytes()
        return t

    ids = torch.randint(0, 4096, (1, length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return state["bytes"] / layers / length


def main() -> None:
    import torch

    from bench.common import write_results

    torch.set_num_threads(1)
    rows = []
    for layers, hidden, inter, heads, kv in [*SHAPES, CHECK]:
        per_length = [saved_bytes_per_token_per_layer(layers, hidden, inter, heads, kv, n) for n in LENGTHS]
        rows.append(
            {
                "hidden": hidden,
                "intermediate": inter,
                "kv_dim": kv * hidden // heads,
                "fitted_on": (layers, hidden, inter, heads, kv) != CHECK,
                **{f"bytes_per_token_layer_at_{n}": round(b, 1) for n, b in zip(LENGTHS, per_length, strict=True)},
            }
        )
        if abs(per_length[0] - per_length[1]) > 1:
            raise SystemExit(f"not linear in the sequence length: {rows[-1]}")
    design = np.array([[r["hidden"], r["intermediate"], r["kv_dim"], 1] for r in rows], dtype=float)
    measured = np.array([r[f"bytes_per_token_layer_at_{LENGTHS[-1]}"] for r in rows])
    fitted_on = np.array([r["fitted_on"] for r in rows])
    coef, *_ = np.linalg.lstsq(design[fitted_on], measured[fitted_on], rcond=None)
    for r, fitted in zip(rows, design @ coef, strict=True):
        r["fitted"] = round(float(fitted), 1)
        r["error"] = round(float(fitted / r[f"bytes_per_token_layer_at_{LENGTHS[-1]}"] - 1), 4)
    fit = {
        "per_hidden": round(float(coef[0]), 3),
        "per_intermediate": round(float(coef[1]), 3),
        "per_kv_dim": round(float(coef[2]), 3),
        "constant": round(float(coef[3]), 1),
    }
    path = write_results(
        "activation bytes per token per layer (bf16, LoRA r=16)",
        rows,
        "Bytes autograd saves for backward inside one decoder layer, per token (saved_tensors_hooks, one count per "
        "storage, weights excluded): bf16 random Qwen2, LoRA r=16 on every linear layer, SDPA, one sequence, at "
        f"{LENGTHS[0]} and {LENGTHS[1]} tokens (equal: linear). Fit bytes/token/layer = "
        f"{fit['per_hidden']}*hidden + {fit['per_intermediate']}*intermediate + {fit['per_kv_dim']}*kv_dim + "
        f"{fit['constant']} on the first five shapes; the sixth (fitted_on false) checks it (train/methods/memory.py).",
    )
    sys.stdout.write(json.dumps(fit) + f"\nwritten to {path}\n")


if __name__ == "__main__":
    main()
