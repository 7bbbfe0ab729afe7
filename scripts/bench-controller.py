#!/usr/bin/env python3
"""Controller benchmark on the local testbed (not a test: it asserts nothing).

Starts the release-built controller, applies N ComfyUIDeployments (replicas 0, so every
child exists but no GPU node is needed), waits until all are Ready, then reports:
reconcile latency p50/p99 (from the controller's histogram), writes per steady-state
reconcile over a quiet window, and the controller's RSS.

    scripts/bench-controller.py [--fleets 100] [--quiet-seconds 60]
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Release builds get a target dir of their own so they never block the tests' debug builds.
TARGET = os.path.expanduser("~/.cache/sdfleet/target-release")


def sh(*args, **kw):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw).stdout


def env_file():
    with open(os.path.join(ROOT, ".testbed/env.json")) as f:
        return json.load(f)


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def metric_sum(text, family):
    total = 0.0
    for line in text.splitlines():
        if line.startswith(family) and line[len(family)] in "{ ":
            total += float(line.rsplit(" ", 1)[1])
    return total


def quantiles(text, qs):
    buckets = []
    for line in text.splitlines():
        m = re.match(r'sdfleet_reconcile_duration_seconds_bucket\{le="([^"]+)",controller="comfyuideployment"\} (\S+)', line)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            buckets.append((le, float(m.group(2))))
    buckets.sort()
    total = buckets[-1][1]
    out = []
    for q in qs:
        want = q * total
        out.append(next(le for le, c in buckets if c >= want))
    return out, int(total)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fleets", type=int, default=100)
    ap.add_argument("--quiet-seconds", type=int, default=60)
    args = ap.parse_args()

    subprocess.run([os.path.join(ROOT, "tests/testbed/testbed"), "up"], check=True)
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "sdfleet"], check=True, cwd=ROOT,
                   env={**os.environ, "CARGO_TARGET_DIR": TARGET})
    env = env_file()
    kubectl = [env["SDFLEET_TESTBED_KUBECTL"], "--kubeconfig", env["KUBECONFIG"]]
    ns = f"bench-{int(time.time())}"
    # The testbed's one way to start a controller (it installs the CRDs first).
    started = sh(os.path.join(ROOT, "tests/testbed/testbed"), "start-controller", "--namespace", ns,
                 env={**os.environ, "SDFLEET_BIN": os.path.join(TARGET, "release/sdfleet")})
    info = dict(line.split("=", 1) for line in started.split())
    port = int(info["metrics"].rsplit(":", 1)[1])
    pid = int(info["pid"])
    sh(*kubectl, "create", "namespace", ns)
    try:
        docs = []
        for i in range(args.fleets):
            docs.append({
                "apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
                "metadata": {"name": f"f{i}", "namespace": ns},
                "spec": {"image": "comfyui:bench", "replicas": 0,
                         "storage": {"outputs": {"bucket": "bench-outputs", "prefix": f"f{i}/"}}},
            })
        t0 = time.time()
        subprocess.run([*kubectl, "apply", "--server-side", "-f", "-"], check=True, text=True,
                       input="\n---\n".join(json.dumps(d) for d in docs), capture_output=True)
        deadline = time.time() + 600
        while time.time() < deadline:
            out = json.loads(sh(*kubectl, "-n", ns, "get", "cud", "-o", "json"))
            ready = sum(1 for o in out["items"] for c in o.get("status", {}).get("conditions", [])
                        if c["type"] == "Ready" and c["status"] == "True")
            if ready == args.fleets:
                break
            time.sleep(1)
        converge = time.time() - t0
        time.sleep(10)
        text = metrics(port)
        (p50, p99), count = quantiles(text, [0.5, 0.99])
        w0, r0 = metric_sum(text, "sdfleet_kube_writes_total"), metric_sum(text, "sdfleet_reconciles_total")
        time.sleep(args.quiet_seconds)
        text = metrics(port)
        w1, r1 = metric_sum(text, "sdfleet_kube_writes_total"), metric_sum(text, "sdfleet_reconciles_total")
        rss_kib = int(re.search(r"VmRSS:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))
        print(f"machine: {os.cpu_count()} cores; fleets: {args.fleets}; all Ready after {converge:.1f} s")
        print(f"reconcile latency over {count} reconciles: p50 <= {p50*1000:.0f} ms, p99 <= {p99*1000:.0f} ms (histogram bucket bounds)")
        print(f"steady state, {args.quiet_seconds} s: {int(r1 - r0)} reconciles, {int(w1 - w0)} writes"
              f" ({(w1 - w0) / max(r1 - r0, 1):.2f} per reconcile)")
        print(f"controller RSS with {args.fleets} fleets: {rss_kib / 1024:.1f} MiB")
    finally:
        # Delete while the controller runs, so its finalizer removes the cluster-scoped children.
        subprocess.run([*kubectl, "-n", ns, "delete", "cud", "--all", "--timeout=300s"], capture_output=True)
        os.kill(pid, signal.SIGTERM)
        for _ in range(300):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        subprocess.run([*kubectl, "delete", "namespace", ns, "--wait=false"], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
