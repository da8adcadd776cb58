"""Streaming merge vs the in-memory merge: peak memory, time, identical output.

    python -m bench.merge_bench [--layers 28] [--rank 16]

A random Qwen2-architecture base shaped like Qwen2-1.5B (hidden 1536, 28 layers, vocab 151936; ~1.5B
parameters) in bf16 and a random LoRA (r=16 on every projection of every layer) are written to a
temporary folder; then each merge runs in its own process: the in-memory one (load the base in bf16,
PeftModel.from_pretrained, merge_and_unload, save_pretrained: what `train merge` did before) and the
streaming one (train/models/merging.py). Each process reports its peak RSS; every output tensor is
compared. llama.cpp's converter (f16) then runs on the streamed folder, its peak RSS measured the same
way. The last line of standard output is the JSON result; it is also written to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_results
from train.core.paths import REPO_ROOT

SECTION = "merge: streaming vs in-memory (random Qwen2-1.5B-shaped bf16 base, LoRA on every projection)"
NOTES = (
    "Each merge in its own process (peak RSS: the process's VmHWM). in-memory: transformers + PEFT "
    "merge_and_unload + save_pretrained (5 GB shards); streaming: train/models/merging.py (tensor by "
    "tensor, 5 GB shards written as planned). identical: every output tensor bit-equal. The GGUF "
    "converter (llama.cpp convert_hf_to_gguf.py, f16) ran on the streamed folder."
)
CHILD = {
    "in_memory": """
import sys, time
from bench.common import peak_rss_mb
from train.core.config import ModelConfig
from pathlib import Path
from train.models.lineage import Chain
from train.models.loading import load_merged_16bit
t = time.perf_counter()
model = load_merged_16bit(Chain(sys.argv[1], [Path(sys.argv[2])]), ModelConfig(name_or_path=sys.argv[1], dtype="bfloat16"))
model.save_pretrained(sys.argv[3], safe_serialization=True, max_shard_size="5GB")
print(time.perf_counter() - t, peak_rss_mb())
""",
    "streaming": """
import sys, time
from bench.common import peak_rss_mb
from pathlib import Path
from train.models.merging import stream_merge
t = time.perf_counter()
stream_merge(sys.argv[1], [Path(sys.argv[2])], Path(sys.argv[3]), "bfloat16")
print(time.perf_counter() - t, peak_rss_mb())
""",
}


def make_base_and_adapter(root: Path, layers: int, rank: int) -> tuple[Path, Path]:
    """A random bf16 Qwen2-1.5B-shaped base (safetensors shards + config + the tiny tokenizer) and a LoRA."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from train.models.tiny import ensure_tiny_model

    config = Qwen2Config(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=layers,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        dtype="bfloat16",
        architectures=["Qwen2ForCausalLM"],
    )
    with torch.device("meta"):
        skeleton = Qwen2ForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    state = {
        name: (torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16)
        for name, p in skeleton.state_dict().items()
        if name != "lm_head.weight"  # tied to the embeddings, as Qwen2-1.5B ships
    }
    base = root / "base"
    base.mkdir()
    save_torch_state_dict(state, base, max_shard_size="2GB")
    config.save_pretrained(base)
    AutoTokenizer.from_pretrained(ensure_tiny_model()).save_pretrained(base)  # the converter needs a vocabulary
    del state

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = root / "adapter"
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM").save_pretrained(adapter)
    lora = {}
    for name, module in skeleton.named_modules():
        if name.rsplit(".", 1)[-1] in targets:
            out_f, in_f = module.weight.shape
            key = f"base_model.model.{name}"
            lora[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=generator) * 0.01
            lora[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=generator) * 0.01
    save_file(lora, adapter / "adapter_model.safetensors")
    return base, adapter


def run_child(kind: str, base: Path, adapter: Path, out: Path) -> tuple[float, float]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(
        [sys.executable, "-c", CHILD[kind], str(base), str(adapter), str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds, mb = proc.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(mb)


def identical(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        found = {}
        for file in folder.glob("*.safetensors"):
            with safe_open(file, "pt") as f:
                found.update(dict.fromkeys(f.keys(), file))
        return found

    left, right = index(a), index(b)
    if left.keys() != right.keys():
        return False
    for name in left:  # one tensor at a time
        with safe_open(left[name], "pt") as f, safe_open(right[name], "pt") as g:
            if not torch.equal(f.get_tensor(name), g.get_tensor(name)):
                return False
    return True


def converter_peak(merged: Path, out: Path) -> dict:
    from train.export.gguf import find_llama_cpp

    try:
        llama = find_llama_cpp(None)
    except Exception as err:  # noqa: BLE001 - the export extra is optional here: say why it was not measured
        return {"gguf_converter_peak_rss_mb": None, "gguf_note": str(err)}
    # The converter's own peak (a process started from this small one: its ru_maxrss is its own).
    code = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(r.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.stderr.write(r.stderr[-1500:])"
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):  # `train merge` saves the stage's tokenizer there
        shutil.copy2(merged.parent / "base" / name, merged / name)
    cmd = [sys.executable, "-m", "train.export.gguf_convert", str(llama), str(merged), "--outtype", "f16",
           "--outfile", str(out)]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, *cmd], cwd=REPO_ROOT, capture_output=True, text=True)
    rc, seconds, kib = proc.stdout.strip().splitlines()[-1].split()
    if rc != "0":
        return {"gguf_converter_peak_rss_mb": None, "gguf_note": proc.stderr.strip().splitlines()[-1]}
    return {"gguf_converter_peak_rss_mb": round(int(kib) / 1024), "gguf_converter_seconds": round(float(seconds), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip-gguf", action="store_true")
    parser.add_argument("--tmp", help="where the base and outputs are written (default: the system temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="merge-bench-", dir=args.tmp) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        # In a child: this process stays small, so the children below start small too.
        subprocess.run(
            [sys.executable, "-c", "import sys; from pathlib import Path; from bench.merge_bench import "
             "make_base_and_adapter as m; m(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))",
             str(root), str(args.layers), str(args.rank)],
            cwd=REPO_ROOT, check=True, capture_output=True,
        )  # fmt: skip
        base, adapter = root / "base", root / "adapter"
        base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        made = time.perf_counter() - started
        mem_s, mem_mb = run_child("in_memory", base, adapter, root / "in_memory")
        stream_s, stream_mb = run_child("streaming", base, adapter, root / "streaming")
        result = {
            "base_params_b": round(base_bytes / 2 / 1e9, 3),
            "base_bytes_gb": round(base_bytes / 1e9, 2),
            "lora_rank": args.rank,
            "in_memory_peak_rss_mb": round(mem_mb),
            "streaming_peak_rss_mb": round(stream_mb),
            "rss_ratio": round(stream_mb / mem_mb, 3),
            "in_memory_seconds": round(mem_s, 1),
            "streaming_seconds": round(stream_s, 1),
            "time_ratio": round(stream_s / mem_s, 3),
            "identical": identical(root / "in_memory", root / "streaming"),
            "setup_seconds": round(made, 1),
        }
        if not args.skip_gguf:
            result |= converter_peak(root / "streaming", root / "model-f16.gguf")
    write_results(SECTION, [result], NOTES)
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
