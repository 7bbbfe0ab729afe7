#!/usr/bin/env bash
# Gateway benchmarks (tests/gateway_bench.rs): added latency against ComfyUI directly,
# checkpoint-affinity against random placement, memory with 10,000 stored jobs. Release
# build (its own target dir, beside the debug one), on the testbed (brought up if down),
# fake ComfyUI pods on loopback. Writes bench/gateway.md.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${SDFLEET_RELEASE_TARGET_DIR:-$HOME/.cache/sdfleet/target-release}
tests/testbed/testbed up >/dev/null
export SDFLEET_BENCH_OUT="$ROOT/bench/gateway.md"
cargo test --locked --release --test gateway_bench -- --ignored --nocapture --test-threads=1
echo "written: bench/gateway.md"
