# Training image (CUDA): the project with its pinned dependencies (constraints.txt), torch==2.13.0's CUDA
# build, flash-attn + Liger (extra `gpu`) and DeepSpeed (extra `deepspeed`), launched by accelerate.
#
# Build from the repository root (BuildKit reads docker/train.Dockerfile.dockerignore):
#   docker build -f docker/train.Dockerfile -t stage-trainer-train:0.1.0 .
# Run (secrets from the environment only: `-e HF_TOKEN` passes the host's value, nothing is baked in):
#   docker run --rm --gpus all --ipc=host -e HF_TOKEN -v "$PWD/outputs:/workspace/outputs" \
#     -v hf-cache:/cache stage-trainer-train:0.1.0 make train-stage1 GPUS=8
#   docker run ... stage-trainer-train:0.1.0 \
#     accelerate launch --config_file accelerate_configs/ddp.yaml -m train sft recipes/stage1_medical.yaml
#
# CUDA: the default torch==2.13.0 wheel on PyPI is built for CUDA 13.0 (cuda-toolkit 13.0.3, cuDNN 9.20), so
# the base is CUDA 13.0 (devel: nvcc for flash-attn where no prebuilt wheel matches, and for DeepSpeed's
# JIT-built ops). Another CUDA: --build-arg CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-cudnn-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

# Extras of pyproject.toml to install (`gpu` = liger + flash-attn; `liger,deepspeed` skips flash-attn's
# compile, which can take an hour where no prebuilt wheel matches torch/CUDA).
ARG EXTRAS=gpu,deepspeed
# Empty: torch from PyPI (CUDA 13.0 build). Or a PyTorch index such as https://download.pytorch.org/whl/cu128
# (torch from there, its dependencies from PyPI, all pinned by constraints.txt).
ARG TORCH_INDEX_URL=
# Parallel compile jobs for flash-attn (each can take several GB of RAM).
ARG MAX_JOBS=4

LABEL org.opencontainers.image.title="stage-trainer-train" \
      org.opencontainers.image.description="Multi-stage LLM fine-tuning (Transformers + PEFT + TRL, accelerate/DeepSpeed) on CUDA" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11 (the version constraints.txt was resolved on) from the deadsnakes PPA: Ubuntu 22.04 ships 3.10.
# make: `make train-stage1`; libaio-dev: DeepSpeed's async I/O op (NVMe offload); bubblewrap: the CodeI/O
# sandbox of data_prep. Package versions follow the base image's Ubuntu release (exact apt pins would break
# whenever the archive moves on).
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3.11 python3.11-dev python3.11-venv make libaio-dev bubblewrap ca-certificates \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0

WORKDIR /workspace

# 1. torch (its CUDA build) and the build tools that flash-attn and DeepSpeed compile with: those two are
#    built against the installed torch (--no-build-isolation), so it comes first.
COPY constraints.txt ./
RUN python3.11 -m venv "$VIRTUAL_ENV" \
 && pip install -c constraints.txt \
      ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple} torch==2.13.0 \
 && pip install -c constraints.txt setuptools==84.2.1 wheel==0.48.0 packaging ninja psutil

# 2. The dependencies of pyproject.toml (+ EXTRAS), pinned by constraints.txt, in a layer of their own (a code
#    change does not reinstall them). DS_BUILD_OPS=0: DeepSpeed builds its ops on first use (nvcc is here).
COPY pyproject.toml README.md ./
COPY docker/pyproject-deps.py /tmp/pyproject-deps.py
RUN python /tmp/pyproject-deps.py pyproject.toml --extras "$EXTRAS" > /tmp/requirements.txt \
 && MAX_JOBS="$MAX_JOBS" pip install --no-build-isolation -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt /tmp/pyproject-deps.py \
 && python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# 3. The project (editable, as `make install` does) and what the launches read: Makefile, recipes,
#    accelerate/DeepSpeed configs.
COPY Makefile ./
COPY accelerate_configs/ accelerate_configs/
COPY ds_configs/ ds_configs/
COPY recipes/ recipes/
COPY data_prep/ data_prep/
COPY train/ train/
# .venv -> /opt/venv and its stamps: the Makefile's targets (make train-stage1 ...) find the environment
# installed and do not reinstall it.
RUN pip install --no-deps --no-build-isolation -e . \
 && pip check \
 && ln -s /opt/venv .venv \
 && touch /opt/venv/.installed /opt/venv/.installed-gpu \
 && python -m train --help > /dev/null

# Non-root user (uid 1000). To write into a host folder owned by another uid: docker run --user "$(id -u):$(id -g)";
# HOME and the caches are writable by any uid. HF_TOKEN / WANDB_API_KEY: pass with -e at run time only.
RUN groupadd --gid 1000 trainer \
 && useradd --uid 1000 --gid trainer --create-home --home-dir /home/trainer --shell /bin/bash trainer \
 && mkdir -p /workspace/outputs /cache \
 && chown trainer:trainer /workspace/outputs /cache \
 && chmod 1777 /home/trainer /cache /workspace/outputs
ENV HOME=/home/trainer \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions
USER 1000:1000

CMD ["bash"]
