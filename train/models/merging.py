"""Merge a chain of LoRA adapters into a base model tensor by tensor, in bounded memory.

    stream_merge(base_dir, [stage1/adapter, stage2/adapter], out_dir, "bfloat16")

`train merge` and a QLoRA child's `parent_merged/` used to load the whole base in the merge dtype
(~65 GB of RAM for a 32B model in bf16). A merge is W + scale * (B @ A) per targeted tensor, so here
each tensor is read from the base's safetensors shards (memory-mapped), the adapters that target it
are applied in chain order, and it is written straight into its place in the output shard, whose
header was planned from the base's shapes before any data moved. Peak memory is about the largest
tensor (plus its float32 copy while a delta is added), whatever the model size.

The arithmetic is PEFT's merge_and_unload, step for step, so the result is bit-identical to loading
the base in `dtype`, `PeftModel.from_pretrained(...).merge_and_unload()` per adapter (tested on the
tiny model and on a QLoRA chain): PEFT keeps adapter weights in float32 on a 16-bit base
(autocast_adapter_dtype), computes the delta as (B @ A) * scaling in float32 (transposed for
fan_in_fan_out) and adds it in place, which rounds float32(W) + delta to W's dtype.

Written by hand where no library streams: PEFT and transformers merge in memory, and safetensors'
writer takes a whole dict of tensors; the format (8-byte header length, JSON header, raw bytes) is
written here directly so one tensor at a time reaches the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from train.core.errors import UserError
from train.core.log import get_logger

log = get_logger("merging")

SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INDEX = "model.safetensors.index.json"
MERGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoraPair:
    a: str  # key of lora_A in the adapter file
    b: str
    scaling: float
    fan_in_fan_out: bool


@dataclass
class Adapter:
    path: Path
    targets: dict[str, LoraPair]  # base tensor name -> its A/B keys


def read_adapter(folder: Path) -> Adapter:
    """The adapter's LoRA pairs keyed by the base tensor they change; features a tensor merge cannot
    express (DoRA, trained biases, modules_to_save, per-module ranks) are refused with the reason."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    unsupported = [
        name
        for name, present in (
            ("use_dora", config.get("use_dora")),
            ("lora_bias", config.get("lora_bias")),
            ("bias", config.get("bias", "none") != "none"),
            ("modules_to_save", config.get("modules_to_save")),
            ("rank_pattern", config.get("rank_pattern")),
            ("alpha_pattern", config.get("alpha_pattern")),
        )
        if present
    ]
    if unsupported:
        raise UserError(f"{folder}: the streaming merge does not handle {', '.join(unsupported)}; use --in-memory")
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    targets: dict[str, LoraPair] = {}
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    for key in sorted(keys):
        if not key.endswith(".lora_A.weight"):
            continue
        stem = key.removesuffix(".lora_A.weight")
        b = f"{stem}.lora_B.weight"
        if b not in keys:
            raise UserError(f"{folder}: {key} has no matching lora_B")
        base = stem.removeprefix("base_model.model.") + ".weight"
        targets[base] = LoraPair(key, b, scaling, bool(config.get("fan_in_fan_out")))
    if not targets:
        raise UserError(f"{folder}: no LoRA weights in adapter_model.safetensors")
    return Adapter(folder, targets)


def base_files(base: str | Path, revision: str | None = None) -> Path:
    """The folder holding the base's safetensors and config (a local folder, or a Hub snapshot)."""
    path = Path(base)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(
            snapshot_download(str(base), revision=revision, allow_patterns=["*.safetensors", "*.json", "*.txt"])
        )
    if not (path / INDEX).is_file() and not (path / "model.safetensors").is_file():
        raise UserError(f"{path}: no model.safetensors or {INDEX}; the streaming merge reads safetensors only")
    return path


def _shards(base: Path) -> dict[str, Path]:
    """Tensor name -> the shard file holding it."""
    if (base / INDEX).is_file():
        weight_map = json.loads((base / INDEX).read_text(encoding="utf-8"))["weight_map"]
        return {name: base / file for name, file in weight_map.items()}
    with safe_open(base / "model.safetensors", "pt") as f:
        return {name: base / "model.safetensors" for name in f.keys()}


def _open_all(stack: contextlib.ExitStack, files) -> dict[Path, object]:
    """One memory-mapped handle per safetensors file, closed with `stack`."""
    return {file: stack.enter_context(safe_open(file, "pt")) for file in sorted(set(files))}


def _plan(base: Path, names: list[str], dtype: torch.dtype, max_shard_bytes: int) -> list[list[tuple[str, str, list]]]:
    """Output shards: lists of (name, safetensors dtype, shape), in base order, each under max_shard_bytes."""
    shards: list[list[tuple[str, str, list]]] = [[]]
    size = 0
    by_file = _shards(base)
    with contextlib.ExitStack() as stack:
        handles = _open_all(stack, by_file.values())
        slices = {name: handles[by_file[name]].get_slice(name) for name in names}
        meta = {name: (sl.get_shape(), FROM_SAFETENSORS[sl.get_dtype()]) for name, sl in slices.items()}
    for name in names:
        shape, stored = meta[name]
        out_dtype = dtype if stored.is_floating_point else stored
        nbytes = math.prod(shape) * torch.empty((), dtype=out_dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, SAFETENSORS_DTYPES[out_dtype], shape))
        size += nbytes
    return shards


def _merged_tensors(base: Path, names: list[str], adapters: list[Adapter], dtype: torch.dtype) -> Iterator:
    """(name, tensor in its output dtype), one at a time."""
    by_file = _shards(base)
    with contextlib.ExitStack() as stack:
        handles = _open_all(stack, by_file.values())
        loras = [stack.enter_context(safe_open(a.path / "adapter_model.safetensors", "pt")) for a in adapters]
        for name in names:
            yield name, _merged(handles[by_file[name]].get_tensor(name), name, adapters, loras, dtype)


def _merged(tensor: torch.Tensor, name: str, adapters: list[Adapter], loras: list, dtype: torch.dtype) -> torch.Tensor:
    """One tensor in its output dtype with each adapter of the chain that targets it merged, in order."""
    if tensor.is_floating_point():
        tensor = tensor.to(dtype)
    for adapter, lora in zip(adapters, loras, strict=True):
        pair = adapter.targets.get(name)
        if pair is None:
            continue
        a, b = lora.get_tensor(pair.a).float(), lora.get_tensor(pair.b).float()
        delta = b @ a
        if pair.fan_in_fan_out:
            delta = delta.T
        delta = delta * pair.scaling
        tensor = (tensor.float() + delta).to(dtype)  # PEFT: weight.data += delta (a float32 delta)
    return tensor


def _write_shard(path: Path, entries: list[tuple[str, str, list]], tensors: Iterator) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dt, shape in entries:
        nbytes = math.prod(shape) * torch.empty((), dtype=FROM_SAFETENSORS[dt]).element_size()
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, _, _ in entries:
            got, tensor = next(tensors)
            assert got == name, (got, name)
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def stream_merge(
    base: str | Path,
    adapters: list[Path],
    out: Path,
    dtype: str,
    max_shard_bytes: int = 5 * 10**9,
    revision: str | None = None,
) -> dict:
    """Write base + adapters (merged in order) as safetensors shards, an index and the config to `out`.

    Returns {"tensors": n, "merged_tensors": n, "shards": n, "bytes": n}. Every adapter tensor must find
    its base tensor (a mismatch is refused, not skipped).
    """
    from transformers import AutoConfig, GenerationConfig

    target = MERGE_DTYPES[dtype]
    folder = base_files(base, revision)
    chain = [read_adapter(Path(a)) for a in adapters]
    names = list(_shards(folder))
    for adapter in chain:
        missing = sorted(set(adapter.targets) - set(names))
        if missing:
            raise UserError(f"{adapter.path}: {len(missing)} LoRA target(s) not in the base, e.g. {missing[0]}")
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(folder, names, target, max_shard_bytes)
    tensors = _merged_tensors(folder, [n for shard in plan for n, _, _ in shard], chain, target)
    weight_map, total = {}, 0
    for i, entries in enumerate(plan, start=1):
        file = "model.safetensors" if len(plan) == 1 else f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        _write_shard(out / file, entries, tensors)
        for name, dt, shape in entries:
            weight_map[name] = file
            total += math.prod(shape) * torch.empty((), dtype=FROM_SAFETENSORS[dt]).element_size()
        log.info("merge: wrote %s (%d of %d shards, %d tensors)", file, i, len(plan), len(entries))
    if len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    config = AutoConfig.from_pretrained(folder)
    config.dtype = target
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(out)
    if (folder / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(folder).save_pretrained(out)
    merged = sum(len(a.targets) for a in chain)
    return {"tensors": len(names), "merged_tensors": merged, "shards": len(plan), "bytes": total}


def check_sample(base: str | Path, adapters: list[Path], merged: Path, dtype: str, count: int = 8) -> tuple[dict, dict]:
    """(parity, effect) over a sample of targeted tensors, for a model too large to run twice: each
    merged tensor recomputed in float64 from the base and every adapter, against what was written.
    parity: the written tensor vs that reference; effect: the base tensor vs the written one."""
    folder = base_files(base)
    chain = [read_adapter(Path(a)) for a in adapters]
    targets = sorted({name for adapter in chain for name in adapter.targets})
    sample = [targets[i * len(targets) // min(count, len(targets))] for i in range(min(count, len(targets)))]
    by_base, by_merged = _shards(folder), _shards(merged)
    worst = effect = scale = 0.0
    with contextlib.ExitStack() as stack:
        base_files_open = _open_all(stack, by_base.values())
        merged_open = _open_all(stack, by_merged.values())
        loras = [stack.enter_context(safe_open(a.path / "adapter_model.safetensors", "pt")) for a in chain]
        for name in sample:
            start = base_files_open[by_base[name]].get_tensor(name).to(MERGE_DTYPES[dtype]).double()
            expected = start.clone()
            for adapter, lora in zip(chain, loras, strict=True):
                if (pair := adapter.targets.get(name)) is not None:
                    delta = lora.get_tensor(pair.b).double() @ lora.get_tensor(pair.a).double()
                    expected += (delta.T if pair.fan_in_fan_out else delta) * pair.scaling
            written = merged_open[by_merged[name]].get_tensor(name).double()
            worst = max(worst, float((written - expected).abs().max()))
            effect = max(effect, float((written - start).abs().max()))
            scale = max(scale, float(expected.abs().max()))
    parity = {
        "checked": len(sample),
        "max_abs_diff": round(worst, 8),
        "max_abs_weight": round(scale, 6),
        "relative_diff": round(worst / max(scale, 1e-12), 8),
    }
    return parity, {"checked": len(sample), "max_abs_diff": round(effect, 8)}
