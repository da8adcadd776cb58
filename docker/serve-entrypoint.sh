#!/usr/bin/env bash
# Entry point of the serving image (docker/serve.Dockerfile): two processes in one container.
#   1. python -m train serve "$MODEL" --host 0.0.0.0 --port $SERVE_PORT   (OpenAI-compatible, llama-cpp-python)
#   2. python -m train chat --server http://127.0.0.1:$SERVE_PORT --host 0.0.0.0 --port $CHAT_PORT   (Streamlit)
# The chat page starts once the server answers /v1/models. When either process ends, the other is stopped
# and the container exits with the first one's status; SIGTERM/SIGINT (docker stop) reach both.
#
# Environment: MODEL (default /models/model.gguf), SERVE_PORT (8000), CHAT_PORT (8501),
#   SERVE_ARGS / CHAT_ARGS: extra arguments for each command (word-split), e.g. SERVE_ARGS="--n-ctx 4096".
#   SERVE_ONLY=1: the API server alone, no chat page.
# Any arguments replace all of this: `docker run IMAGE python -m train serve --help`.
set -euo pipefail

if [ "$#" -gt 0 ]; then
  exec "$@"
fi

MODEL="${MODEL:-/models/model.gguf}"
SERVE_PORT="${SERVE_PORT:-8000}"
CHAT_PORT="${CHAT_PORT:-8501}"
read -r -a serve_args <<< "${SERVE_ARGS:-}"
read -r -a chat_args <<< "${CHAT_ARGS:-}"

if [ ! -f "$MODEL" ]; then
  echo "serve-entrypoint: no model file at MODEL=$MODEL" >&2
  echo "  mount the folder with your GGUF files: -v /path/to/gguf:/models:ro" >&2
  echo "  and name the file: -e MODEL=/models/<name>.gguf (default /models/model.gguf)" >&2
  if [ -d "$(dirname "$MODEL")" ]; then
    echo "  found there: $(find "$(dirname "$MODEL")" -maxdepth 1 -name '*.gguf' -printf '%f ' 2>/dev/null)" >&2
  fi
  exit 2
fi

pids=()
stopping=0
stop_all() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap 'stopping=1; stop_all' TERM INT

echo "serve-entrypoint: serving $MODEL on :$SERVE_PORT" >&2
python -m train serve "$MODEL" --host 0.0.0.0 --port "$SERVE_PORT" "${serve_args[@]}" &
serve_pid=$!
pids+=("$serve_pid")

if [ "${SERVE_ONLY:-0}" != 1 ]; then
  # The page can start before the model is loaded, but then its first request fails: wait for the API
  # (at most STARTUP_TIMEOUT seconds, default 300), and give up if the server process died meanwhile.
  deadline=$(( SECONDS + ${STARTUP_TIMEOUT:-300} ))
  until python -c "import os, urllib.request as u; u.urlopen(u.Request('http://127.0.0.1:$SERVE_PORT/v1/models', headers={'Authorization': 'Bearer ' + os.environ.get('SERVE_API_KEY', '')}), timeout=2)" 2>/dev/null; do
    if ! kill -0 "$serve_pid" 2>/dev/null; then
      wait "$serve_pid" || status=$?
      echo "serve-entrypoint: the server exited (status ${status:-0}) before answering /v1/models" >&2
      exit "${status:-1}"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "serve-entrypoint: the server did not answer /v1/models within ${STARTUP_TIMEOUT:-300}s" >&2
      stop_all
      exit 1
    fi
    sleep 1
  done
  echo "serve-entrypoint: chat page on :$CHAT_PORT (API http://127.0.0.1:$SERVE_PORT)" >&2
  python -m train chat --server "http://127.0.0.1:$SERVE_PORT" --host 0.0.0.0 --port "$CHAT_PORT" "${chat_args[@]}" &
  pids+=("$!")
fi

# The first process to end (or a signal) ends the container: stop the other, wait for both.
# A requested stop (docker stop: SIGTERM, Ctrl-C: SIGINT) exits 0; a process that died exits with its status.
status=0
wait -n "${pids[@]}" || status=$?
stop_all
for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
if [ "$stopping" = 1 ]; then
  echo "serve-entrypoint: stopped" >&2
  exit 0
fi
echo "serve-entrypoint: a process exited (status $status): stopping the container" >&2
exit "$status"
