#!/usr/bin/env python3
"""Fleet-scale benchmark on the local testbed (a measurement, not a test: it asserts nothing).

For each tree it measures (this checkout's HEAD, and a baseline commit side by side in the
same run), it builds that tree's release `sdfleet` and its simulated agents
(`sim_agents.rs`, copied into the tree's `src/bin/`), installs that tree's CRDs and chart
(RBAC and admission policies), and runs:

1. From one apply: F fleets (replicas 0, one shared ModelSet) and F x K kwok GPU nodes
   labelled as the fleets' NodePools' nodes, with the startup taint. One simulated agent
   per node syncs the bucket (moto) and reports, acting as the chart's agent
   ServiceAccount with a token naming its node. Time until every fleet is Ready and
   ModelsReady; reconcile and queue-to-done latency (raw samples where the tree serves
   them on /debug/latency, else the histogram's bucket bounds and its exact mean), for
   this phase and, apart, for each of the next two.
2. A steady state of S seconds: apiserver requests per minute by client (controller,
   agents) and verb, from the audit log (watches counted as they start).
3. One new model in the bucket: time until every node reports the new revision, the
   requests it took, the largest object the reports live in.
4. The controller's RSS and CPU seconds in each phase.

    bench/fleet-scale/bench.py [--fleets 200] [--nodes-per-fleet 5] [--steady-seconds 600]
                               [--baseline REV] [--only new|baseline]

Results: bench/fleet-scale/results.json and a Markdown table on stdout.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TARGET = os.path.expanduser("~/.cache/sdfleet/target-release")
TESTBED = os.path.join(ROOT, "tests/testbed/testbed")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sh(*args, check=True, **kw):
    return subprocess.run(args, check=check, text=True, capture_output=True, **kw).stdout


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def env_file():
    with open(os.path.join(ROOT, ".testbed/env.json")) as f:
        return json.load(f)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_usage(pid):
    """(RSS MiB, CPU seconds) of a live process."""
    with open(f"/proc/{pid}/status") as f:
        rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) / 1024
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return rss, (int(fields[11]) + int(fields[12])) / CLK_TCK


def quantile(sorted_values, q):
    if not sorted_values:
        return None
    i = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 1)))) - 1
    return sorted_values[i]


class Tree:
    """One version of sdfleet, checked out and built apart from this working copy."""

    def __init__(self, label, rev):
        self.label, self.rev = label, rev
        self.dir = f"/tmp/sdfleet-bench-{label}"
        self.commit = sh("git", "-C", ROOT, "rev-parse", rev).strip()

    def build(self):
        checked_out = os.path.exists(self.dir) and subprocess.run(
            ["git", "-C", self.dir, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() == self.commit
        # An existing checkout of the same commit is kept: new file times would rebuild it.
        if not checked_out:
            if os.path.exists(self.dir):
                subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", self.dir], capture_output=True)
            sh("git", "-C", ROOT, "worktree", "add", "--detach", self.dir, self.commit)
        os.makedirs(f"{self.dir}/src/bin", exist_ok=True)
        source, copy = os.path.join(HERE, "sim_agents.rs"), f"{self.dir}/src/bin/sdfleet-sim-agents.rs"
        if not os.path.exists(copy) or open(copy).read() != open(source).read():
            shutil.copy(source, copy)
        log(f"[{self.label}] building {self.commit[:10]} (release)")
        subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "sdfleet", "--bin", "sdfleet-sim-agents"],
                       check=True, cwd=self.dir, env={**os.environ, "CARGO_TARGET_DIR": TARGET},
                       stdout=subprocess.DEVNULL)
        # The two trees share one target dir: keep each tree's binaries apart.
        for b in ("sdfleet", "sdfleet-sim-agents"):
            shutil.copy(f"{TARGET}/release/{b}", f"{self.dir}/{b}")

    def remove(self):
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", self.dir], capture_output=True)


class Cluster:
    def __init__(self, env):
        self.env = env
        self.kubectl = [env["SDFLEET_TESTBED_KUBECTL"], "--kubeconfig", env["KUBECONFIG"]]
        self.audit = env["SDFLEET_TESTBED_AUDIT_LOG"]
        self.s3 = env["AWS_ENDPOINT_URL"]

    def k(self, *args, input=None, check=True):
        return subprocess.run([*self.kubectl, *args], input=input, text=True, capture_output=True,
                              check=check).stdout

    def apply(self, docs):
        for i in range(0, len(docs), 200):
            self.k("apply", "--server-side", "--force-conflicts", "-f", "-",
                   input="\n---\n".join(json.dumps(d) for d in docs[i:i + 200]))

    def get_json(self, *args):
        return json.loads(self.k("get", "-o", "json", *args))

    def put_object(self, bucket, key, body):
        req = urllib.request.Request(f"{self.s3}/{bucket}/{key}", data=body, method="PUT")
        urllib.request.urlopen(req, timeout=30).read()

    def create_bucket(self, bucket):
        req = urllib.request.Request(f"{self.s3}/{bucket}", method="PUT")
        urllib.request.urlopen(req, timeout=30).read()

    def audit_offset(self):
        """Where the audit log ends now: its inode and size (the apiserver rotates it)."""
        st = os.stat(self.audit)
        return st.st_ino, st.st_size

    def audit_lines(self, offset):
        """The audit log's lines after `offset`, across a rotation: the rest of the file
        that was current then (now a backup beside it), and the whole current one."""
        inode, size = offset
        folder = os.path.dirname(self.audit)
        paths = []
        if os.stat(self.audit).st_ino != inode:
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if name.startswith("audit") and os.stat(path).st_ino == inode:
                    paths.append((path, size))
            paths.append((self.audit, 0))
        else:
            paths.append((self.audit, size))
        for path, start in paths:
            with open(path, "rb") as f:
                f.seek(start)
                yield from f

    def requests_since(self, offset, users, detail=None):
        """Requests by (client, verb) in the audit log after `offset`; `users` maps an
        (impersonated) username to a client name. Watches count when they start. With
        `detail` (a dict), also fills detail["controller"] with the controller's requests
        by verb and resource, and detail["latency"] with each client's request latencies
        (received to completed, watches left out) as p50/p99/max seconds."""
        counts = {}
        by_resource = {}
        latencies = {}
        queued = {}
        for line in self.audit_lines(offset):
            try:
                e = json.loads(line)
            except ValueError:
                continue
            verb = e.get("verb")
            stage = e.get("stage")
            if verb == "watch" and stage != "ResponseStarted":
                continue
            if verb != "watch" and stage != "ResponseComplete":
                continue
            user = (e.get("impersonatedUser") or e.get("user") or {}).get("username", "")
            client = users.get(user)
            if client:
                counts[(client, verb)] = counts.get((client, verb), 0) + 1
                if detail is None:
                    continue
                ref = e.get("objectRef") or {}
                resource = ref.get("resource", "?") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
                if client == "controller":
                    code = (e.get("responseStatus") or {}).get("code", 0)
                    # Refused requests apart: a 409 is a status computed from a stale copy.
                    key = f"{verb} {resource}" + (f" ({code})" if code >= 300 else "")
                    by_resource[key] = by_resource.get(key, 0) + 1
                if verb != "watch":
                    took = _seconds(e.get("stageTimestamp")) - _seconds(e.get("requestReceivedTimestamp"))
                    latencies.setdefault(client, []).append(took)
                    # The apiserver annotates a request slower than 500 ms with where the
                    # time went; this part is the wait in its priority-and-fairness queue.
                    wait = (e.get("annotations") or {}).get("apiserver.latency.k8s.io/apf-queue-wait")
                    if wait is not None:
                        queued.setdefault(client, []).append(_go_duration(wait))
        if detail is not None:
            detail["controller"] = dict(sorted(by_resource.items(), key=lambda kv: -kv[1]))
            detail["latency"] = {c: _summary(sorted(v)) for c, v in sorted(latencies.items())}
            detail["apf_queue_wait"] = {c: _summary(sorted(v)) for c, v in sorted(queued.items())}
        return counts


def _seconds(stamp):
    """An audit timestamp (RFC 3339, microseconds) as epoch seconds."""
    if not stamp:
        return 0.0
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _go_duration(text):
    """A Go duration string ("1.5s", "2.009ms", "1m2s", "350µs") in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ns": 1e-9}
    return sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)(h|ms|m|s|us|µs|μs|ns)", text))


def _summary(v):
    return {"count": len(v), "p50": round(quantile(v, 0.5), 4), "p99": round(quantile(v, 0.99), 4),
            "max": round(v[-1], 4)} if v else {}


def testbed_cpu():
    """CPU seconds so far of each testbed component (the processes in its pid files)."""
    out = {}
    pids = os.path.join(ROOT, ".testbed/pids")
    for name in sorted(os.listdir(pids)) if os.path.isdir(pids) else []:
        if name.endswith(".exe"):
            continue
        try:
            pid = int(open(os.path.join(pids, name)).read().strip())
            out[name] = proc_usage(pid)[1]
        except (OSError, ValueError):
            continue
    return out


def cpu_between(before, after):
    return {k: round(after[k] - before.get(k, 0.0), 1) for k in after}


def kubeconfig_as(env, path, user, groups):
    text = open(env["KUBECONFIG"]).read()
    out = []
    for line in text.splitlines():
        out.append(line)
        if line.strip().startswith("client-key-data:"):
            out.append(f"    as: {user}")
            out.append(f"    as-groups: {json.dumps(groups)}")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
    return path


def wait_for(what, limit, check, every=2.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(every)
    log(f"timed out after {limit} s waiting for {what}")
    return None


def fleet_state(cluster, ns):
    items = cluster.get_json("-n", ns, "comfyuideployments")["items"]
    def cond(o, t):
        return any(c["type"] == t and c["status"] == "True" for c in o.get("status", {}).get("conditions", []))
    return (sum(1 for o in items if cond(o, "Ready")), sum(1 for o in items if cond(o, "ModelsReady")), len(items))


def reports_at(cluster, ns, revision):
    """How many nodes report Synced at `revision`, wherever this tree keeps reports."""
    try:
        syncs = cluster.get_json("-n", ns, "modelsyncs.sdfleet.io")["items"]
    except subprocess.CalledProcessError:
        syncs = None
    if syncs is not None:
        return sum(1 for s in syncs if s["spec"].get("state") == "Synced" and s["spec"].get("revision") == revision)
    ms = cluster.get_json("-n", ns, "modelset", "models")
    return sum(1 for n in ms.get("status", {}).get("nodes", []) if n["state"] == "Synced" and n["revision"] == revision)


def largest_report_object(cluster, ns):
    sizes = {"ModelSet": len(cluster.k("get", "-n", ns, "modelset", "models", "-o", "json"))}
    try:
        syncs = cluster.get_json("-n", ns, "modelsyncs.sdfleet.io")["items"]
        if syncs:
            sizes["ModelSync"] = max(len(json.dumps(s)) for s in syncs)
    except subprocess.CalledProcessError:
        pass
    return sizes


def latency_snapshot(port):
    """The controller's reconcile figures so far: raw samples where the tree serves them on
    /debug/latency, else its histogram (bucket counts, sum, count)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/latency", timeout=10) as r:
            raw = json.loads(r.read())
        return {"raw": {f"{name}.{key}": raw.get(name, {}).get(field, [])
                        for name in ("comfyuideployment", "modelset")
                        for key, field in (("reconcile", "reconcileSeconds"), ("queueToDone", "queueToDoneSeconds"),
                                               ("reconcileOwn", "reconcileOwnSeconds"))}}
    except urllib.error.HTTPError:
        pass
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    hist = {}
    for name in ("comfyuideployment", "modelset"):
        h = hist.setdefault(f"{name}.reconcile", {"buckets": {}, "sum": 0.0, "count": 0.0})
        for line in text.splitlines():
            m = re.match(r'sdfleet_reconcile_duration_seconds_bucket\{le="([^"]+)",controller="%s"\} (\S+)' % name, line)
            if m:
                h["buckets"][float("inf") if m.group(1) == "+Inf" else float(m.group(1))] = float(m.group(2))
            m = re.match(r'sdfleet_reconcile_duration_seconds_(sum|count)\{controller="%s"\} (\S+)' % name, line)
            if m:
                h[m.group(1)] = float(m.group(2))
    return {"histogram": hist}


def latency_between(before, after):
    """p50/p99/max of the reconciles that ran between two snapshots (the raw rings keep
    the newest 100,000 samples, far more than a run makes, so a phase is a slice)."""
    out = {}
    if "raw" in after:
        for key, samples in after["raw"].items():
            v = sorted(samples[len((before or {}).get("raw", {}).get(key, [])):])
            if v:
                out[key] = {"source": "raw samples", "count": len(v), "p50": quantile(v, 0.5),
                            "p99": quantile(v, 0.99), "max": v[-1]}
        return out
    for key, h in after["histogram"].items():
        b = (before or {}).get("histogram", {}).get(key, {"buckets": {}, "sum": 0.0, "count": 0.0})
        count = h["count"] - b["count"]
        if not count:
            continue
        buckets = sorted((le, c - b["buckets"].get(le, 0.0)) for le, c in h["buckets"].items())
        bound = lambda q: next(le for le, c in buckets if c >= q * count)
        out[key] = {"source": "histogram bucket bounds (p50, p99 are upper bounds; mean exact)",
                    "count": int(count), "p50": bound(0.5), "p99": bound(0.99),
                    "mean": (h["sum"] - b["sum"]) / count}
    return out


def run_tree(tree, cluster, args):
    r = {"tree": tree.label, "commit": tree.commit[:10], "fleets": args.fleets,
         "nodes": args.fleets * args.nodes_per_fleet}
    stamp = f"{tree.label}-{int(time.time()) % 100000}"
    ns, release_ns, release = f"scale-{stamp}", f"sdfleet-bench-{stamp}", f"bench{int(time.time()) % 100000}"
    bucket = f"bench-models-{stamp}"
    procs = []
    nodes = []
    try:
        cluster.k("apply", "--server-side", "--force-conflicts", "-f", f"{tree.dir}/crds/")
        cluster.k("apply", "--server-side", "--force-conflicts", "-f", f"{ROOT}/tests/testbed/fleetclass.yaml")
        time.sleep(3)
        sh(cluster.env["SDFLEET_TESTBED_HELM"], "install", release, f"{tree.dir}/charts/sdfleet", "--namespace", release_ns,
           "--create-namespace", "--kubeconfig", cluster.env["KUBECONFIG"],
           "--set", "controller.clusterName=testbed,controller.region=us-west-2,controller.cloud=kwok,replicaCount=1",
           "--skip-crds")
        controller_user = f"system:serviceaccount:{release_ns}:{release}-sdfleet"
        agent_user = f"system:serviceaccount:{release_ns}:sdfleet-agent"
        users = {controller_user: "controller", agent_user: "agents"}
        kube_as = kubeconfig_as(cluster.env, f"/tmp/sdfleet-bench-{stamp}.kubeconfig", controller_user,
                                ["system:serviceaccounts", f"system:serviceaccounts:{release_ns}", "system:authenticated"])
        cluster.create_bucket(bucket)
        cluster.put_object(bucket, "checkpoints/base.safetensors", b"base weights" * 100)
        cluster.put_object(bucket, "loras/style.safetensors", b"lora weights" * 10)
        cluster.k("create", "namespace", ns)

        port = free_port()
        aws = {k: v for k, v in cluster.env.items() if k.startswith("AWS_")}
        clog = open(f"/tmp/sdfleet-bench-{stamp}-controller.log", "w")
        controller = subprocess.Popen(
            [f"{tree.dir}/sdfleet", "controller", "--cloud", "kwok", "--cluster-name", "testbed", "--region", "us-west-2",
             "--metrics-addr", f"127.0.0.1:{port}", "--agent-namespace", release_ns],
            env={**os.environ, **aws, "KUBECONFIG": kube_as, "RUST_LOG": "warn"}, stdout=clog, stderr=clog)
        procs.append(controller)
        wait_for("the controller's metrics", 60, lambda: _up(port), every=0.5)

        model_set = {"apiVersion": "sdfleet.io/v1alpha1", "kind": "ModelSet", "metadata": {"name": "models", "namespace": ns},
                     "spec": {"source": {"s3": {"bucket": bucket}}, "sync": {"pollInterval": f"{args.poll_seconds}s"}}}
        fleets = [{"apiVersion": "sdfleet.io/v1alpha1", "kind": "ComfyUIDeployment",
                   "metadata": {"name": f"f{i}", "namespace": ns},
                   "spec": {"image": "comfyui:bench", "replicas": 0, "modelSet": "models", "ingress": {"enabled": False}}}
                  for i in range(args.fleets)]
        for i in range(args.fleets):
            pool = f"{ns}.f{i}"
            for j in range(args.nodes_per_fleet):
                nodes.append({"apiVersion": "v1", "kind": "Node",
                              "metadata": {"name": f"sim-{stamp}-{i}-{j}",
                                           "annotations": {"kwok.x-k8s.io/node": "fake"},
                                           "labels": {"karpenter.sh/nodepool": pool, "sdfleet.io/fleet": pool,
                                                      "sdfleet.io/owner-namespace": ns, "sdfleet.io/owner-name": f"f{i}",
                                                      "sdfleet.io/modelset": "models", "type": "kwok",
                                                      "kubernetes.io/hostname": f"sim-{stamp}-{i}-{j}"}},
                              "spec": {"taints": [{"key": "sdfleet.io/models-not-ready", "effect": "NoSchedule"},
                                                  {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]}})
        agents_log = open(f"/tmp/sdfleet-bench-{stamp}-agents.log", "w")
        root = f"/tmp/sdfleet-bench-{stamp}-nodes"
        os.makedirs(root, exist_ok=True)

        # 1. One apply: the ModelSet, the fleets, the nodes; the agents start with their nodes.
        usage0 = proc_usage(controller.pid)
        cpu0 = testbed_cpu()
        offset = cluster.audit_offset()
        t0 = time.time()
        cluster.apply([model_set] + fleets)
        cluster.apply(nodes)
        agents = subprocess.Popen([f"{tree.dir}/sdfleet-sim-agents", release_ns, root, str(args.agent_resync)],
                                  stdin=subprocess.PIPE, stdout=agents_log, stderr=agents_log, text=True,
                                  env={**os.environ, **aws, "KUBECONFIG": cluster.env["KUBECONFIG"], "RUST_LOG": "warn"})
        procs.append(agents)
        agents.stdin.write("\n".join(n["metadata"]["name"] for n in nodes) + "\n")
        agents.stdin.close()
        last = [None]

        def converged():
            last[0] = fleet_state(cluster, ns)
            ready, models, total = last[0]
            return total == args.fleets and ready == total and models == total
        ok = wait_for("every fleet Ready and ModelsReady", args.converge_limit, converged, every=2)
        r["converge_seconds"] = round(time.time() - t0, 1) if ok else None
        r["converged"] = {"ready": last[0][0], "models_ready": last[0][1], "fleets": last[0][2]}
        detail = {}
        r["converge_requests"] = _per_client(cluster.requests_since(offset, users, detail))
        r["converge_detail"] = detail
        usage1 = proc_usage(controller.pid)
        r["converge_cpu"] = {**cpu_between(cpu0, testbed_cpu()), "agents": round(proc_usage(agents.pid)[1], 1),
                             "controller": round(usage1[1] - usage0[1], 1)}
        lat1 = latency_snapshot(port)
        r["latency"] = latency_between(None, lat1)
        r["converge_controller"] = {"rss_mib": round(usage1[0], 1), "cpu_seconds": round(usage1[1] - usage0[1], 1)}
        log(f"[{tree.label}] converged: {r['converge_seconds']} s {r['converged']}")

        # 2. Steady state.
        time.sleep(15)
        lat1 = latency_snapshot(port)
        offset = cluster.audit_offset()
        usage1 = proc_usage(controller.pid)
        cpu1, agents1 = testbed_cpu(), proc_usage(agents.pid)[1]
        t1 = time.time()
        time.sleep(args.steady_seconds)
        minutes = (time.time() - t1) / 60
        detail = {}
        counts = cluster.requests_since(offset, users, detail)
        usage2 = proc_usage(controller.pid)
        lat2 = latency_snapshot(port)
        r["steady"] = {"latency": latency_between(lat1, lat2), "seconds": round(minutes * 60), "per_minute": {f"{c} {v}": round(n / minutes, 2) for (c, v), n in sorted(counts.items())},
                       "controller_per_fleet_per_minute": round(sum(n for (c, _), n in counts.items() if c == "controller") / minutes / args.fleets, 4),
                       "controller_per_fleet_per_minute_besides_watches": round(sum(n for (c, v), n in counts.items() if c == "controller" and v != "watch") / minutes / args.fleets, 4),
                       "writes_per_minute": round(sum(n for (_, v), n in counts.items() if v not in ("get", "list", "watch")) / minutes, 2),
                       "controller_rss_mib": round(usage2[0], 1),
                       "controller_cpu_seconds_per_minute": round((usage2[1] - usage1[1]) / minutes, 2),
                       "detail": detail,
                       "cpu": {**cpu_between(cpu1, testbed_cpu()), "agents": round(proc_usage(agents.pid)[1] - agents1, 1),
                               "controller": round(usage2[1] - usage1[1], 1)}}
        log(f"[{tree.label}] steady: {r['steady']}")

        # 3. One new model: the revision reaches every node.
        before = cluster.get_json("-n", ns, "modelset", "models").get("status", {}).get("revision", "")
        offset = cluster.audit_offset()
        usage2 = proc_usage(controller.pid)
        cpu2, agents2 = testbed_cpu(), proc_usage(agents.pid)[1]
        t2 = time.time()
        cluster.put_object(bucket, "loras/new.safetensors", b"new lora" * 10)
        revision = wait_for("the new revision listed", args.poll_seconds * 3 + 60, lambda: (
            lambda rev: rev if rev and rev != before else None)(
            cluster.get_json("-n", ns, "modelset", "models").get("status", {}).get("revision")), every=0.5)
        t_listed = time.time()
        total_nodes = len(nodes)
        count = [0]

        def everywhere():
            count[0] = reports_at(cluster, ns, revision)
            return count[0] >= total_nodes
        done = revision and wait_for("every node at the new revision", args.converge_limit, everywhere, every=1)
        t3 = time.time()
        usage3 = proc_usage(controller.pid)
        detail = {}
        revision_requests = _per_client(cluster.requests_since(offset, users, detail))
        r["revision"] = {"detail": detail,
                         "cpu": {**cpu_between(cpu2, testbed_cpu()), "agents": round(proc_usage(agents.pid)[1] - agents2, 1),
                                 "controller": round(usage3[1] - usage2[1], 1)},"latency": latency_between(lat2, latency_snapshot(port)),
                         # None: the ModelSet never showed the new revision in the limit.
                         "listed_after_seconds": round(t_listed - t2, 1) if revision else None,
                         "all_nodes_after_listing_seconds": round(t3 - t_listed, 1) if done else None,
                         "nodes_reporting": count[0], "nodes": total_nodes,
                         "requests": revision_requests,
                         "largest_object_bytes": largest_report_object(cluster, ns),
                         "controller_cpu_seconds": round(usage3[1] - usage2[1], 1),
                         "controller_rss_mib": round(usage3[0], 1)}
        try:
            r["agents_rss_mib"] = round(proc_usage(agents.pid)[0], 1)
        except (FileNotFoundError, ProcessLookupError):
            pass
        log(f"[{tree.label}] revision: {r['revision']}")
        return r
    finally:
        log(f"[{tree.label}] cleaning up")
        for p in reversed(procs[1:]):
            p.send_signal(signal.SIGINT)
        cluster.k("delete", "-n", ns, "comfyuideployments", "--all", "--timeout=600s", check=False)
        for p in procs[:1]:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if nodes:
            cluster.k("delete", "nodes", "-l", f"sdfleet.io/owner-namespace={ns}", "--wait=false", check=False)
        cluster.k("delete", "namespace", ns, "--wait=false", check=False)
        subprocess.run([cluster.env["SDFLEET_TESTBED_HELM"], "uninstall", release, "--namespace", release_ns,
                        "--kubeconfig", cluster.env["KUBECONFIG"]], capture_output=True)
        cluster.k("delete", "namespace", release_ns, "--wait=false", check=False)
        shutil.rmtree(f"/tmp/sdfleet-bench-{stamp}-nodes", ignore_errors=True)


def _up(port):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        return True
    except OSError:
        return False


def _per_client(counts):
    out = {}
    for (client, verb), n in sorted(counts.items()):
        out.setdefault(client, {})[verb] = n
    return out


def table(results):
    lines = ["| | " + " | ".join(f"{r['tree']} ({r['commit']})" for r in results) + " |",
             "|---|" + "---|" * len(results)]

    def row(name, f):
        cells = []
        for r in results:
            try:
                cells.append(str(f(r)))
            except (KeyError, TypeError):
                cells.append("—")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def lat(r, key, phase=None):
        v = (r[phase]["latency"] if phase else r["latency"])[key]
        if v["source"] == "raw samples":
            return f"p50 {v['p50'] * 1000:.1f} / p99 {v['p99'] * 1000:.1f} / max {v['max'] * 1000:.1f} ms (n={v['count']})"
        return f"p50 ≤ {v['p50'] * 1000:.0f} / p99 ≤ {v['p99'] * 1000:.0f} ms, mean {v['mean'] * 1000:.1f} ms (n={v['count']}, buckets)"
    row("fleets / nodes", lambda r: f"{r['fleets']} / {r['nodes']}")
    row("all Ready + ModelsReady after one apply", lambda r: f"{r['converge_seconds']} s" if r["converge_seconds"] else f"not after the limit ({r['converged']})")
    row("fleet reconcile", lambda r: lat(r, "comfyuideployment.reconcile"))
    row("fleet reconcile less its apiserver waits", lambda r: lat(r, "comfyuideployment.reconcileOwn"))
    row("fleet queue-to-done", lambda r: lat(r, "comfyuideployment.queueToDone"))
    row("ModelSet reconcile", lambda r: lat(r, "modelset.reconcile"))
    row("steady: fleet reconcile", lambda r: lat(r, "comfyuideployment.reconcile", "steady"))
    row("steady: ModelSet reconcile", lambda r: lat(r, "modelset.reconcile", "steady"))
    row("new revision: fleet reconcile", lambda r: lat(r, "comfyuideployment.reconcile", "revision"))
    row("new revision: fleet reconcile less its apiserver waits", lambda r: lat(r, "comfyuideployment.reconcileOwn", "revision"))
    row("new revision: fleet queue-to-done", lambda r: lat(r, "comfyuideployment.queueToDone", "revision"))
    row("new revision: ModelSet reconcile", lambda r: lat(r, "modelset.reconcile", "revision"))
    row("steady: requests/min (client verb)", lambda r: ", ".join(f"{k} {v}" for k, v in r["steady"]["per_minute"].items()) or "0")
    row("steady: controller requests per fleet per minute", lambda r: r["steady"]["controller_per_fleet_per_minute"])
    row("steady: the same without watch restarts", lambda r: r["steady"]["controller_per_fleet_per_minute_besides_watches"])
    row("steady: writes/min", lambda r: r["steady"]["writes_per_minute"])
    row("new revision: listed after", lambda r: f"{r['revision']['listed_after_seconds']} s" if r["revision"]["listed_after_seconds"] is not None else "not listed within the limit")
    row("new revision: on every node after listing", lambda r: f"{r['revision']['all_nodes_after_listing_seconds']} s" if r["revision"]["all_nodes_after_listing_seconds"] is not None else f"{r['revision']['nodes_reporting']}/{r['revision']['nodes']} nodes by the limit")
    row("new revision: requests", lambda r: "; ".join(f"{c}: " + ", ".join(f"{v} {n}" for v, n in vs.items()) for c, vs in r["revision"]["requests"].items()))
    row("largest report object", lambda r: ", ".join(f"{k} {v / 1024:.1f} KiB" for k, v in r["revision"]["largest_object_bytes"].items()))
    def per_client(key, cell, empty=""):
        """Each client's summary under `key` of the audit detail, converge; revision."""
        def column(r):
            phases = [r.get("converge_detail"), r["revision"].get("detail")]
            return "; ".join((", ".join(f"{c} {cell(v)}" for c, v in p.get(key, {}).items()) or empty) if p else "—"
                             for p in phases)
        return column
    row("apiserver latency p50/p99 (s): converge; revision", per_client("latency", lambda v: f"{v['p50']}/{v['p99']}"))
    row("fairness queue wait of requests over 500 ms (s): converge; revision",
        per_client("apf_queue_wait", lambda v: f"n={v['count']} p50 {v['p50']} / max {v['max']}", "none"))
    row("controller writes: converge", lambda r: ", ".join(f"{k} {n}" for k, n in r["converge_detail"]["controller"].items() if not k.startswith(("get", "list", "watch"))))
    row("controller writes: revision", lambda r: ", ".join(f"{k} {n}" for k, n in r["revision"]["detail"]["controller"].items() if not k.startswith(("get", "list", "watch"))) or "0")
    row("CPU seconds by process: converge", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r["converge_cpu"].items(), key=lambda kv: -kv[1])))
    row("CPU seconds by process: revision", lambda r: ", ".join(f"{k} {v}" for k, v in sorted(r["revision"]["cpu"].items(), key=lambda kv: -kv[1])))
    row("controller RSS (after the revision)", lambda r: f"{r['revision']['controller_rss_mib']} MiB")
    row("controller CPU: converge / steady per min / revision", lambda r: f"{r['converge_controller']['cpu_seconds']} s / {r['steady']['controller_cpu_seconds_per_minute']} s / {r['revision']['controller_cpu_seconds']} s")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fleets", type=int, default=200)
    ap.add_argument("--nodes-per-fleet", type=int, default=5)
    ap.add_argument("--steady-seconds", type=int, default=600)
    ap.add_argument("--poll-seconds", type=int, default=60, help="the ModelSet's pollInterval")
    ap.add_argument("--agent-resync", type=int, default=300, help="the agents' --resync-seconds (their default)")
    ap.add_argument("--converge-limit", type=int, default=900)
    ap.add_argument("--baseline", default="61e54f7", help="the commit measured beside HEAD (main before the caches)")
    ap.add_argument("--only", choices=["new", "baseline"])
    ap.add_argument("--keep-trees", action="store_true", help="keep the checkouts (a rerun builds nothing)")
    ap.add_argument("--out", default=os.path.join(HERE, "results.json"))
    args = ap.parse_args()

    if subprocess.run([TESTBED, "status"], capture_output=True).returncode != 0:
        subprocess.run([TESTBED, "up"], check=True, stdout=subprocess.DEVNULL)
    cluster = Cluster(env_file())
    trees = []
    if args.only != "baseline":
        trees.append(Tree("new", "HEAD"))
    if args.only != "new":
        trees.append(Tree("baseline", args.baseline))
    for t in trees:
        t.build()
    results = []
    try:
        for t in trees:
            results.append(run_tree(t, cluster, args))
            with open(args.out, "w") as f:
                json.dump({"machine": f"{os.cpu_count()} cores", "args": vars(args), "results": results}, f, indent=1)
    finally:
        if not args.keep_trees:
            for t in trees:
                t.remove()
    print(f"machine: {os.cpu_count()} cores, testbed on loopback; {args.fleets} fleets x {args.nodes_per_fleet} kwok nodes, "
          f"steady {args.steady_seconds} s, ModelSet pollInterval {args.poll_seconds} s, agent resync {args.agent_resync} s\n")
    print(table(results))


if __name__ == "__main__":
    sys.exit(main())
