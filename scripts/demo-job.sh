#!/usr/bin/env bash
# The installed shape serving one job, after scripts/demo.sh (or on its own): the Helm
# chart with the images scripts/image.sh builds, its pods on the testbed's real node (the
# controller, the node agent syncing a ModelSet from moto, the ComfyUI double, the
# gateway), one job submitted through the gateway's Service, and the output's presigned
# URL printed. It is tests/installed.rs, run with its output shown; it cleans up after
# itself (the demo's simulated fleet stays). Kept apart from the demo, which stays quick.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sdfleet/target}
tests/testbed/testbed up >/dev/null
# The demo's controller would reconcile the test's fleet beside the chart's own.
tests/testbed/testbed stop-controllers
cargo test --locked --test installed -- --nocapture 2>&1 | grep -E '^job |^test result|panicked|timed out'
