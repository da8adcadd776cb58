"""Command line of the trainer: `python -m train COMMAND ...`, one table of commands.

    python -m train sft RECIPE [section.key=value ...]     train one stage
    python -m train reward|dpo|grpo RECIPE                 preference and RL stages after SFT (TRL trainers)
    python -m train distill RECIPE                         a smaller student learns from a trained teacher stage
    python -m train distill-report STAGE [--baseline S]    the student beside its teacher: KL, agreement, task metric
    python -m train classify RECIPE                        sequence classification (single/multi-label encoders)
    python -m train generate TARGET --prompt TEXT          generate from a stage, a merged model or a GGUF file
    python -m train eval RECIPE_OR_TARGET... --data F      decode, clean, score (EM/F1/accuracy), vote, pick checkpoints
    python -m train lm-eval TARGET --tasks T1,T2           standard benchmarks (lm-evaluation-harness: KorMedMCQA, KMMLU...)
    python -m train predict-labels MODEL_DIR --input F     labels with the saved per-label thresholds
    python -m train merge STAGE_DIR [--out DIR]            LoRA chain -> merged 16-bit safetensors, parity-checked
    python -m train export MERGED_DIR --gguf f16,q4_k_m    GGUF via llama.cpp, parity-checked
    python -m train export-onnx MODEL_DIR                  classifier -> ONNX, checked with onnxruntime
    python -m train serve TARGET [--host H --port P]       OpenAI-compatible server: GGUF (llama.cpp) or merged (vLLM)
    python -m train chat [--server URL]                    the team's browser chat page in front of that server
    python -m train demo [--fast]                          the whole pipeline on the embedded tiny model
    python -m train build-tiny                             build (or find) the embedded tiny model
    python -m train pick-strategy RECIPE --gpus N          STRATEGY=auto: which accelerate config to use
    python -m train check-launch RECIPE --strategy S --processes N   start-up checks once, before a launch
    python -m train recipe-help [SECTION]                  every recipe field: type, default, help

Each module here registers its commands (a `Command`: name, help, arguments, run function).
"""

from __future__ import annotations

import os
import sys

from train.cli import export, inference, serve, tools, training
from train.core.cli import dispatch
from train.core.errors import cli_guard

COMMANDS = [*training.COMMANDS, *inference.COMMANDS, *export.COMMANDS, *serve.COMMANDS, *tools.COMMANDS]


@cli_guard
def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    dispatch("python -m train", __doc__ or "", COMMANDS, sys.argv[1:] if argv is None else argv)
