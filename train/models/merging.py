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
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

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
    magnitude: str | None = None  # DoRA: key of the layer's lora_magnitude_vector


@dataclass
class Adapter:
    path: Path
    targets: dict[str, LoraPair]  # base tensor name -> its A/B keys


def read_adapter(folder: Path) -> Adapter:
    """The adapter's LoRA pairs keyed by the base tensor they change (DoRA's magnitude vectors too); features a
    tensor merge cannot express (trained biases, modules_to_save, per-module ranks) are refused with the reason."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    unsupported = [
        name
        for name, present in (
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
        magnitude = f"{stem}.lora_magnitude_vector" if config.get("use_dora") else None
        if magnitude is not None and magnitude not in keys:
            raise UserError(f"{folder}: a DoRA adapter without {magnitude}")
        targets[base] = LoraPair(key, b, scaling, bool(config.get("fan_in_fan_out")), magnitude)
    if not targets:
        raise UserError(f"{folder}: no LoRA weights in adapter_model.safetensors")
    return Adapter(folder, targets)


def conv1d_weights(folder: Path) -> set[str]:
    """Names of the base's Conv1D weights (GPT-2's attention and MLP), from a weightless skeleton of its config.

    Conv1D stores (in, out), the transpose of a Linear, so a LoRA delta goes in transposed. The layer decides, as
    in PEFT (which sets fan_in_fan_out for a Conv1D whatever the adapter says), not the adapter's flag: an adapter
    trained on the 4-bit model, where bitsandbytes made those layers Linear4bit, says false."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_utils import set_zero3_state
    from transformers.pytorch_utils import Conv1D

    try:
        # set_zero3_state: no deepspeed.zero.Init for this skeleton. Under ZeRO-3 it is a collective, and only rank 0
        # merges a child's parents (parent_merged): the other ranks would never join it (a hang, seen in the tests).
        with set_zero3_state(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    except (ValueError, OSError, ImportError):  # no causal-LM class for it here: no Conv1D known either
        return set()
    return {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)}


def orient_to_base(adapters: list[Adapter], conv1d: set[str]) -> None:
    for adapter in adapters:
        for name, pair in adapter.targets.items():
            pair.fan_in_fan_out = name in conv1d


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


class ShardReader:
    """Tensors of one safetensors file read with plain reads into memory this process owns.

    Not memory-mapped: pages of a mapped file count as this process's resident memory until it is
    closed, so mapping a 60 GB base would look (and, under pressure, act) like holding all of it.
    """

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            self.header = json.loads(f.read(length))
        self.header.pop("__metadata__", None)
        self.start = 8 + length

    def meta(self, name: str) -> tuple[list, torch.dtype]:
        entry = self.header[name]
        return entry["shape"], FROM_SAFETENSORS[entry["dtype"]]

    def get(self, name: str) -> torch.Tensor:
        shape, dtype = self.meta(name)
        begin, end = self.header[name]["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as f:
            f.seek(self.start + begin)
            f.readinto(buffer)
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _shards(base: Path) -> dict[str, Path]:
    """Tensor name -> the shard file holding it."""
    if (base / INDEX).is_file():
        weight_map = json.loads((base / INDEX).read_text(encoding="utf-8"))["weight_map"]
        return {name: base / file for name, file in weight_map.items()}
    return dict.fromkeys(ShardReader(base / "model.safetensors").header, base / "model.safetensors")


def _plan(base: Path, names: list[str], dtype: torch.dtype, max_shard_bytes: int) -> list[list[tuple[str, str, list]]]:
    """Output shards: lists of (name, safetensors dtype, shape), in base order, each under max_shard_bytes."""
    shards: list[list[tuple[str, str, list]]] = [[]]
    size = 0
    by_file = _shards(base)
    readers = {file: ShardReader(file) for file in set(by_file.values())}
    meta = {name: readers[by_file[name]].meta(name) for name in names}
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


def _merged_tensors(base: Path, names: list[str], adapters: list[Adapter], dtype: torch.dtype, bar=None) -> Iterator:
    """(name, tensor in its output dtype), one at a time."""
    by_file = _shards(base)
    readers = {file: ShardReader(file) for file in set(by_file.values())}
    with contextlib.ExitStack() as stack:  # adapters are small: memory-mapped
        loras = [stack.enter_context(safe_open(a.path / "adapter_model.safetensors", "pt")) for a in adapters]
        for name in names:
            yield name, _merged(readers[by_file[name]].get(name), name, adapters, loras, dtype)
            if bar is not None:
                bar.update()


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
        if pair.magnitude is None:
            tensor = (tensor.float() + delta).to(dtype)  # PEFT: weight.data += delta (a float32 delta)
            continue
        # DoRA, as PEFT's DoraLinearVariant.merge_safe: the weight with its delta, each output row rescaled to
        # the learned magnitude (row norms taken on the (out, in) view; a Conv1D stores (in, out)).
        weight = tensor.float() + delta
        rows = weight.T if pair.fan_in_fan_out else weight
        factor = lora.get_tensor(pair.magnitude).float() / torch.linalg.norm(rows, dim=1)
        rows = factor.view(-1, 1) * rows
        tensor = (rows.T if pair.fan_in_fan_out else rows).to(dtype)
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
            if tensor.numel():
                f.write(tensor.contiguous().view(torch.uint8).numpy())  # the buffer itself, no copy


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
    orient_to_base(chain, conv1d_weights(folder))
    names = list(_shards(folder))
    for adapter in chain:
        missing = sorted(set(adapter.targets) - set(names))
        if missing:
            raise UserError(f"{adapter.path}: {len(missing)} LoRA target(s) not in the base, e.g. {missing[0]}")
    out.mkdir(parents=True, exist_ok=True)
    plan = _plan(folder, names, target, max_shard_bytes)
    ordered = [n for shard in plan for n, _, _ in shard]
    # A bar on a terminal; in logs (not a TTY) one line per shard below.
    bar = tqdm(total=len(ordered), desc="merge", unit="tensor", disable=not sys.stderr.isatty())
    tensors = _merged_tensors(folder, ordered, chain, target, bar)
    weight_map, total = {}, 0
    for i, entries in enumerate(plan, start=1):
        file = "model.safetensors" if len(plan) == 1 else f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        _write_shard(out / file, entries, tensors)
        for name, dt, shape in entries:
            weight_map[name] = file
            total += math.prod(shape) * torch.empty((), dtype=FROM_SAFETENSORS[dt]).element_size()
        log.info("merge: wrote %s (%d of %d shards, %d tensors)", file, i, len(plan), len(entries))
    bar.close()
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
    orient_to_base(chain, conv1d_weights(folder))
    targets = sorted({name for adapter in chain for name in adapter.targets})
    sample = [targets[i * len(targets) // min(count, len(targets))] for i in range(min(count, len(targets)))]
    by_base, by_merged = _shards(folder), _shards(merged)
    worst = effect = scale = 0.0
    with contextlib.ExitStack() as stack:
        loras = [stack.enter_context(safe_open(a.path / "adapter_model.safetensors", "pt")) for a in chain]
        for name in sample:
            start = ShardReader(by_base[name]).get(name).to(MERGE_DTYPES[dtype]).double()
            expected = start.clone()
            for adapter, lora in zip(chain, loras, strict=True):
                if (pair := adapter.targets.get(name)) is not None:
                    delta = lora.get_tensor(pair.b).double() @ lora.get_tensor(pair.a).double()
                    expected += (delta.T if pair.fan_in_fan_out else delta) * pair.scaling
            written = ShardReader(by_merged[name]).get(name).double()
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


def check_copy(source: str | Path, written: Path, dtype: str) -> dict:
    """Every tensor of `written` against the same tensor of `source` cast to `dtype`, one at a time (bounded
    memory): a full fine-tuning stage's model copied by `stream_merge` with no adapters must match exactly."""
    by_source, by_written = _shards(Path(source)), _shards(written)
    if set(by_source) != set(by_written):
        missing = sorted(set(by_source) ^ set(by_written))
        raise UserError(f"{written}: tensors differ from {source} ({len(missing)} names, e.g. {missing[0]})")
    worst = scale = 0.0
    for name, file in by_source.items():
        expected = ShardReader(file).get(name)
        if expected.is_floating_point():  # as stream_merge casts: integer buffers keep their dtype
            expected = expected.to(MERGE_DTYPES[dtype])
        expected = expected.double()
        got = ShardReader(by_written[name]).get(name).double()
        if got.shape != expected.shape:
            raise UserError(f"{written}: {name} has shape {list(got.shape)}, {source} has {list(expected.shape)}")
        if got.numel():
            worst = max(worst, float((got - expected).abs().max()))
            scale = max(scale, float(expected.abs().max()))
    return {
        "checked": len(by_source),
        "max_abs_diff": worst,
        "max_abs_weight": round(scale, 6),
        "relative_diff": worst / max(scale, 1e-12),
    }
