#!/usr/bin/env bash
# Gateway benchmarks (tests/gateway_bench.rs): added latency against ComfyUI directly,
# checkpoint-affinity against random placement, memory with 10,000 stored jobs. Release
# build (its own target dir, beside the debug one), on the testbed (brought up if down),
# fake ComfyUI pods on loopback. Writes bench/gateway.md.
#
#   bench/gateway-bench.sh [--peer REV]
#
# --peer REV: also measure the gateway of git revision REV (e.g. main) in the same run,
# side by side: its release binary is built from a clone of REV in the same target dir
# (the dependencies compile once) and copied aside before this build's.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${SDFLEET_RELEASE_TARGET_DIR:-$HOME/.cache/sdfleet/target-release}
peer=
if [ "${1:-}" = --peer ]; then peer=${2:?--peer needs a git revision}; fi
if [ -n "$peer" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  git clone -q "$ROOT" "$work/src"
  git -C "$work/src" checkout -q "$peer"
  # Cargo names a workspace's own crate by its path inside the checkout, so the clone and
  # this tree share one fingerprint: without the cleans, one build of them is taken for
  # the other's, and both rows measure the same binary.
  (cd "$work/src" && cargo clean --release -p sdfleet && cargo build --locked --release --bin sdfleet)
  cp "$CARGO_TARGET_DIR/release/sdfleet" "$work/sdfleet-peer"
  cargo clean --release -p sdfleet
  export SDFLEET_BENCH_PEER_BIN=$work/sdfleet-peer
  export SDFLEET_BENCH_PEER_NAME="$peer ($(git -C "$work/src" rev-parse --short HEAD))"
fi
# This build's binary (the peer's clone wrote the same path).
cargo build --locked --release --bin sdfleet
tests/testbed/testbed up >/dev/null
# SDFLEET_BENCH_ONLY=SECTION (latency, placement, memory, fairness) runs one section and
# writes bench/gateway-SECTION.md instead.
export SDFLEET_BENCH_OUT="$ROOT/bench/gateway${SDFLEET_BENCH_ONLY:+-$SDFLEET_BENCH_ONLY}.md"
cargo test --locked --release --test gateway_bench -- --ignored --nocapture --test-threads=1
echo "written: $SDFLEET_BENCH_OUT"
