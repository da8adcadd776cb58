# Serving image (CPU): an OpenAI-compatible server on llama-cpp-python (`python -m train serve`, port 8000)
# and the Streamlit chat page (`python -m train chat`, port 8501), both started by docker/serve-entrypoint.sh.
# No torch/transformers: the project goes in with --no-deps, beside the pinned serve packages only.
#
# Build from the repository root (docker/build-serve-image.sh does this and picks docker, podman or buildah):
#   docker build -f docker/serve.Dockerfile -t stage-trainer-serve:0.1.0 .
# The llama-cpp-python wheel must exist first: `make install-export` builds it once into .cache/wheels
# (portable x86_64: GGML_NATIVE=OFF), so the image never compiles llama.cpp.
# Run:
#   docker run --rm -p 8000:8000 -p 8501:8501 -v "$PWD/outputs/demo/merged/gguf:/models:ro" \
#     -e MODEL=/models/stage2_korean-q4_k_m.gguf stage-trainer-serve:0.1.0
#
# BASE_IMAGE: any Debian bookworm image with apt (its python3 is 3.11). Where Docker Hub cannot be reached,
# build a local one with debootstrap (see docker/README.md) and pass --build-arg BASE_IMAGE=localhost/debian-base:bookworm.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG LLAMA_WHEEL=llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl

LABEL org.opencontainers.image.title="stage-trainer-serve" \
      org.opencontainers.image.description="llama.cpp OpenAI-compatible server + Streamlit chat page for GGUF models exported by stage-trainer" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# python3 (3.11 on bookworm) and its venv module; libgomp1: llama.cpp's CPU backend uses OpenMP.
# Debian package versions are left to the pinned release (bookworm): the archive drops superseded versions
# at each point release, so exact apt pins would break the build within weeks.
# hadolint ignore=DL3008
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv libgomp1 ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first (their own layer, reused while only the code changes): every version pinned in
# serve-requirements.txt, installed without the resolver (--no-deps), then checked for consistency.
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret (used by pip, never stored in a layer):
#   --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt   (build-serve-image.sh: CA_BUNDLE=...)
COPY docker/serve-requirements.txt /tmp/build/serve-requirements.txt
COPY .cache/wheels/${LLAMA_WHEEL} /tmp/build/${LLAMA_WHEEL}
RUN --mount=type=secret,id=ca_bundle \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && python3 -m venv "$VIRTUAL_ENV" \
 && pip install --no-deps -r /tmp/build/serve-requirements.txt "/tmp/build/${LLAMA_WHEEL}" \
 && pip check \
 && rm -rf /tmp/build

# The project itself, without its training dependencies (torch, transformers, ...): the serve and chat
# commands never import them (so no `pip check` here: it would list them as missing; the layer above checked
# the serve packages). setuptools is the pinned build backend, removed again after the install.
COPY pyproject.toml README.md /tmp/src/
COPY train/ /tmp/src/train/
COPY data_prep/ /tmp/src/data_prep/
RUN --mount=type=secret,id=ca_bundle \
    if [ -f /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
 && pip install --no-deps setuptools==84.2.1 \
 && pip install --no-deps --no-build-isolation /tmp/src \
 && pip uninstall -y setuptools \
 && rm -rf /tmp/src \
 && python -c "import sys, train.cli; assert 'torch' not in sys.modules, 'the serving path imported torch'"

COPY --chmod=0755 docker/serve-entrypoint.sh /usr/local/bin/serve-entrypoint.sh

# Non-root at run time. /models is mounted read-only by the user; nothing in the image is writable by app
# except its home (Streamlit keeps its state in ~/.streamlit).
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
 && mkdir -p /models
USER 10001:10001
WORKDIR /home/app

# MODEL: the GGUF file to serve (a file in the /models volume). HF_TOKEN or any other secret: never here,
# pass it with `docker run -e` if ever needed (serving a local file needs none).
ENV MODEL=/models/model.gguf \
    SERVE_PORT=8000 \
    CHAT_PORT=8501 \
    STREAMLIT_BROWSER_GATHER_USAGE_STATS=false \
    STREAMLIT_SERVER_HEADLESS=true
VOLUME ["/models"]
EXPOSE 8000 8501

# Loading a large GGUF takes a while: start-period covers it. Python's urllib: no curl in the image. The key
# (SERVE_API_KEY, when set) is sent: the server refuses /v1/models without it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:%s/v1/models' % os.environ.get('SERVE_PORT', '8000'), headers={'Authorization': 'Bearer ' + os.environ.get('SERVE_API_KEY', '')}), timeout=4)"]

ENTRYPOINT ["/usr/local/bin/serve-entrypoint.sh"]
