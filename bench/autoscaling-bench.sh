#!/usr/bin/env bash
# The autoscaling cost benchmark (tests/autoscaling_bench.rs) on the local testbed: a
# day of bursty traffic, time-compressed (1 h = SDFLEET_BENCH_HOUR_SECONDS, default 10 s),
# against fixed replicas, autoscaling min 1 and min 0, side by side in one run. Writes
# bench/autoscaling.md. Brings the testbed up if it is down (and takes it down after).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sdfleet/target}
owner=0
if ! tests/testbed/testbed status >/dev/null 2>&1; then
  owner=1
  trap 'tests/testbed/testbed down' EXIT
  tests/testbed/testbed up
fi
# A debug build: what is measured is scheduling (Karpenter, the controller, the
# gateway's queue), not CPU-bound work.
cargo build --locked --bin sdfleet
out=$(mktemp)
cargo test --locked --test autoscaling_bench -- --ignored --nocapture 2>&1 | tee "$out"
{
  echo "# Autoscaling: a day of bursty traffic"
  echo
  echo "\`bench/autoscaling-bench.sh\`, $(date -u +%Y-%m-%d), $(nproc) cores, debug build, the testbed"
  echo "(kube-apiserver, Karpenter's kwok provider, fake ComfyUI pods). One hour of the day is"
  echo "${SDFLEET_BENCH_HOUR_SECONDS:-10} s; each job runs 1 s. The same arrivals went to the three fleets side by side."
  echo
  grep -E '^[0-9]+ jobs over' "$out"
  echo
  grep -E '^\|' "$out"
  echo
  cat bench/autoscaling-notes.md
} >bench/autoscaling.md
echo "wrote bench/autoscaling.md"
