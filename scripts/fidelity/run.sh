#!/usr/bin/env bash
# The double (examples/fake_comfyui.rs) against a real ComfyUI on CPU: starts the double
# on 127.0.0.1:$DOUBLE_PORT with empty models and a fresh output directory, starts the
# real one (scripts/fidelity/setup-real-comfyui.sh, after its `install`) unless it already
# answers on $PORT, runs diff.py, and stops what it started.
#
#   scripts/fidelity/run.sh [--double-bin PATH] [--out FILE]
#
# Without --double-bin it builds the double from this checkout (`cargo build --example
# fake_comfyui`, in $CARGO_TARGET_DIR, default ~/.cache/sdfleet/target).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
FIDELITY_HOME=${FIDELITY_HOME:-$HOME/.cache/sdfleet-fidelity}
export FIDELITY_HOME
PORT=${PORT:-8188}
export PORT
DOUBLE_PORT=${DOUBLE_PORT:-8190}
PY=$FIDELITY_HOME/venv/bin/python
bin= out=
while [ $# -gt 0 ]; do
  case "$1" in
    --double-bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--double-bin PATH] [--out FILE]" >&2; exit 2 ;;
  esac
done
[ -x "$PY" ] || { echo "no $PY: run $HERE/setup-real-comfyui.sh install first" >&2; exit 1; }
if [ -z "$bin" ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sdfleet/target}
  (cd "$ROOT" && cargo build --example fake_comfyui)
  bin=$CARGO_TARGET_DIR/debug/examples/fake_comfyui
fi

work=$(mktemp -d /tmp/fidelity-double.XXXXXX)
mkdir -p "$work/models" "$work/output" "$work/input"
double_pid= started_real=
cleanup() {
  [ -n "$double_pid" ] && kill "$double_pid" 2>/dev/null || true
  [ -n "$started_real" ] && "$HERE/setup-real-comfyui.sh" stop || true
  rm -rf "$work"
}
trap cleanup EXIT

"$bin" --listen 127.0.0.1 --port "$DOUBLE_PORT" --models "$work/models" \
  --output-directory "$work/output" --input-directory "$work/input" --temp-directory "$work" \
  --name fidelity-double >"$work/double.log" 2>&1 &
double_pid=$!

up() {
  "$PY" - "$1" <<'EOF'
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1] + "/system_stats", timeout=2).read()
except Exception:
    sys.exit(1)
EOF
}
if ! up "http://127.0.0.1:$PORT"; then
  "$HERE/setup-real-comfyui.sh" start >&2
  started_real=1
fi
for _ in $(seq 1 60); do up "http://127.0.0.1:$DOUBLE_PORT" && break; sleep 0.5; done
up "http://127.0.0.1:$DOUBLE_PORT" || { cat "$work/double.log"; echo "the double did not answer" >&2; exit 1; }

if [ -n "$out" ]; then
  "$PY" "$HERE/diff.py" --a "http://127.0.0.1:$DOUBLE_PORT" --b "http://127.0.0.1:$PORT" | tee "$out"
else
  "$PY" "$HERE/diff.py" --a "http://127.0.0.1:$DOUBLE_PORT" --b "http://127.0.0.1:$PORT"
fi
