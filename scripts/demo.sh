#!/usr/bin/env bash
# The demo: on the local testbed, start the controller with --cloud kwok (which installs
# the CRDs: `tests/testbed/testbed start-controller`), apply examples/sdxl.yaml, wait until the fleet is Ready on simulated GPU
# nodes, and show what was built. `tests/testbed/testbed down` stops everything.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sdfleet/target}
t0=$SECONDS

tests/testbed/testbed up
. .testbed/env
k() { "$SDFLEET_TESTBED_KUBECTL" "$@"; }

cargo build --locked --bin sdfleet
# One controller for the demo: a second run of the demo reuses it.
running=$(ls .testbed/pids/sdfleet-controller-* 2>/dev/null | grep -v '\.exe$' | head -1 || true)
if [ -z "$running" ] || ! kill -0 "$(cat "$running")" 2>/dev/null; then
  tests/testbed/testbed start-controller
fi

k apply --server-side -f examples/sdxl.yaml
echo "waiting for the fleet to be Ready on simulated GPU nodes..."
k -n studio wait --for=condition=Ready --timeout=300s cud/sdxl
echo
k -n studio get comfyuideployments
echo
k get nodepools
echo
k get nodes -L node.kubernetes.io/instance-type,karpenter.sh/capacity-type,karpenter.sh/nodepool
echo
k -n studio get pods -o wide
echo
echo "demo ready in $((SECONDS - t0)) s; try: sdfleet render -f examples/fleetclass.yaml -f examples/sdxl.yaml --cloud aws"
