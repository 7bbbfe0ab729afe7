#!/usr/bin/env bash
# A real ComfyUI on CPU, outside the repository, for scripts/fidelity/diff.py to compare
# the test double with. Not run by CI and nothing of it is committed: it downloads
# ComfyUI's source and its Python packages (torch included) once.
#
#   scripts/fidelity/setup-real-comfyui.sh install   # source + venv + packages (once)
#   scripts/fidelity/setup-real-comfyui.sh start     # nice'd, on 127.0.0.1:$PORT, waits until it answers
#   scripts/fidelity/setup-real-comfyui.sh stop
#   scripts/fidelity/setup-real-comfyui.sh version   # the ComfyUI commit/version and torch version
#
# Environment:
#   FIDELITY_HOME  where it all goes (default ~/.cache/sdfleet-fidelity)
#   COMFYUI_SRC    an existing ComfyUI source tree to copy instead of fetching one
#   COMFYUI_GIT    the git URL to fetch ComfyUI from (default: ComfyUI's public repository,
#                  comfyanonymous/ComfyUI on GitHub)
#   COMFYUI_REF    the commit to fetch (default: the one the recorded diffs were made with)
#   PORT           where `start` listens (default 8188)
#   pip's own variables: the default index's torch wheel carries the CUDA libraries (a few
#   GB; it runs on CPU all the same). For the CPU-only wheels, point PIP_INDEX_URL (or
#   PIP_EXTRA_INDEX_URL) at PyTorch's CPU wheel index before `install`.
set -euo pipefail

FIDELITY_HOME=${FIDELITY_HOME:-$HOME/.cache/sdfleet-fidelity}
COMFYUI_GIT=${COMFYUI_GIT:-https://github.com/comfyanonymous/ComfyUI.git}
# v0.3.64 (2025-10-12), "Improve AMD performance. (#10302)".
COMFYUI_REF=${COMFYUI_REF:-a125cd84b054a57729b5eecab930ca9408719832}
PORT=${PORT:-8188}
SRC=$FIDELITY_HOME/ComfyUI
VENV=$FIDELITY_HOME/venv
RUN=$FIDELITY_HOME/run            # ComfyUI's --base-directory: models, input, output, temp, user
PIDFILE=$FIDELITY_HOME/comfyui.pid
LOG=$FIDELITY_HOME/comfyui.log

install() {
  mkdir -p "$FIDELITY_HOME"
  if [ ! -f "$SRC/main.py" ]; then
    if [ -n "${COMFYUI_SRC:-}" ]; then
      cp -a "$COMFYUI_SRC/." "$SRC/"
    else
      mkdir -p "$SRC"
      git init -q "$SRC"
      git -C "$SRC" fetch --depth 1 "$COMFYUI_GIT" "$COMFYUI_REF"
      git -C "$SRC" checkout -q FETCH_HEAD
    fi
  fi
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/pip" install torch torchvision torchaudio
  # The rest of ComfyUI's requirements; one that fails alone (an optional one) is skipped.
  if ! "$VENV/bin/pip" install -r "$SRC/requirements.txt"; then
    grep -Ev '^\s*(#|$)' "$SRC/requirements.txt" | while read -r req; do
      "$VENV/bin/pip" install "$req" || echo "setup-real-comfyui: skipped $req" >&2
    done
  fi
  # requests: ComfyUI imports it (app/frontend_management.py) but its requirements.txt
  # leaves it to come with other packages, which newer versions no longer pull in.
  "$VENV/bin/pip" install requests websocket-client
  version
}

version() {
  if [ -d "$SRC/.git" ]; then
    echo "ComfyUI commit $(git -C "$SRC" rev-parse HEAD)"
  fi
  sed -n 's/^__version__ = "\(.*\)"/ComfyUI version \1/p' "$SRC/comfyui_version.py"
  "$VENV/bin/python" -c 'import torch, sys; print("torch", torch.__version__, "python", sys.version.split()[0])'
}

answers() {
  "$VENV/bin/python" - "$PORT" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/system_stats", timeout=2).read()
except Exception:
    sys.exit(1)
EOF
}

start() {
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "already running: pid $(cat "$PIDFILE")"; return 0
  fi
  mkdir -p "$RUN"
  # --cpu: no accelerator; the base directory keeps its models/ (empty), input/, output/,
  # temp/ and user/ out of the source tree; an in-memory database; no custom or API nodes.
  (cd "$SRC" && exec nice -n 15 "$VENV/bin/python" main.py --cpu --listen 127.0.0.1 --port "$PORT" \
      --base-directory "$RUN" --database-url sqlite:///:memory: \
      --disable-all-custom-nodes --disable-api-nodes --disable-auto-launch) >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 180); do
    if answers; then echo "ComfyUI on http://127.0.0.1:$PORT (pid $(cat "$PIDFILE"), log $LOG)"; return 0; fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$LOG"; echo "ComfyUI exited" >&2; return 1; }
    sleep 1
  done
  echo "ComfyUI did not answer within 180 s; log $LOG" >&2
  return 1
}

stop() {
  [ -f "$PIDFILE" ] || return 0
  local pid; pid=$(cat "$PIDFILE")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$PIDFILE"
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  version) version ;;
  *) echo "usage: $0 install|start|stop|version" >&2; exit 2 ;;
esac
