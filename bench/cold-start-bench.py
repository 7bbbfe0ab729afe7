#!/usr/bin/env python3
"""Cold-start benchmark of the models phase: what a new node syncs before its startup
taint lifts, whole ModelSet (case A, a ModelSet without `hot`) against hot models first
(case B: the hot checkpoint, then its read into the page cache, as the agent does), side
by side in one run, from a local S3 server (versitygw over a directory). Also the first
read of the hot checkpoint right after its sync (what ComfyUI's first load reads), from
the disk (A: the sync writes with O_DIRECT, past the page cache) and after warming (B).

    bench/cold-start-bench.py [--scale 1.0] [--rounds 3] [--keep-data]

Data set: sync-bench's `models:SCALE` (1.0: 12.3 GB; 2 checkpoints of 2 GiB, 50 LoRAs of
150 MiB, 500 small files); the hot set is one checkpoint (17% of the bytes). The rest of
B (what the agent syncs after the taint lifted, at an eighth of the concurrency) is timed
too, but is not in the models phase. Each case into an empty directory, the starting case
rotated per round, the server's files in the page cache before each run. Results go to
stdout and bench/cold-start.md. SDFLEET_BIN=PATH uses an already built sdfleet.
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("sync_bench", os.path.join(HERE, "sync-bench.py"))
sb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sb)

HOT = "checkpoints/sdxl_0.safetensors"


def first_read(path, drop):
    """Seconds to read `path` once; with `drop`, its pages are dropped from the cache
    first (so the read comes from the disk)."""
    if drop:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    t = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    return time.monotonic() - t


def timed(cmd, env):
    t = time.monotonic()
    sb.run_checked(cmd, env)
    return time.monotonic() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep-data", action="store_true")
    args = ap.parse_args()
    sb.build()
    work, gw_root, dests, marker, kept = sb.work_dirs("models", args.scale)
    want = {"shape": "models", "scale": args.scale, "layout": 3}
    disk = sb.disk_of(dests)
    gw, endpoint = sb.start_server(work, gw_root)
    env = sb.tool_env(endpoint)
    rows = []
    try:
        if kept is not None:
            total, count = kept["total"], kept["count"]
        else:
            sb.log(f"generating data set models:{args.scale} and uploading it")
            total, count = sb.upload_data(os.path.join(work, "src"), "models", args.scale, endpoint, env)
            with open(marker, "w") as f:
                json.dump({**want, "total": total, "count": count}, f)
        hot_size = next(size for batch in sb.data_set("models", args.scale) for k, size in batch if k == HOT)
        sync = [sb.SDFLEET, "sync", "--bucket", sb.BUCKET, "--endpoint", endpoint, "--region", "us-east-1"]
        cases = ["A", "B"]
        for r in range(args.rounds):
            for case in cases[r % 2:] + cases[:r % 2]:
                d = os.path.join(dests, case)
                os.makedirs(d)
                sb.read_all(gw_root)
                sb.settle(disk)
                sb.log(f"round {r + 1}: case {case}")
                row = {"round": r + 1, "case": case}
                if case == "A":
                    row["models"] = timed(sync + ["--dest", d], env)
                    # Direct writes left nothing in the cache; dropped anyway, so the read
                    # is the disk's whatever the kernel did.
                    row["first_read"] = first_read(os.path.join(d, HOT), drop=True)
                else:
                    row["models"] = timed(sync + ["--dest", d, "--include", HOT, "--warm"], env)
                    row["first_read"] = first_read(os.path.join(d, HOT), drop=False)
                    row["rest"] = timed(sync + ["--dest", d, "--concurrency", "8"], env)
                got = sb.dir_bytes(d)
                if got != total:
                    raise SystemExit(f"case {case} holds {got} bytes, expected {total}")
                rows.append(row)
                shutil.rmtree(d)
                os.sync()
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)

    def med(case, key):
        return statistics.median(r[key] for r in rows if r["case"] == case and key in r)

    def span(case, key):
        v = [r[key] for r in rows if r["case"] == case and key in r]
        return f"{min(v):.1f}-{max(v):.1f}"

    a, b = med("A", "models"), med("B", "models")
    gb = 1e9
    header = (f"Machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB RAM; "
              f"server: versitygw {sb.VGW_VERSION} on 127.0.0.1; ModelSet {total / gb:.1f} GB in {count} files; "
              f"hot set {HOT} ({hot_size / gb:.2f} GB, {100 * hot_size / total:.0f}% of the bytes); "
              f"{args.rounds} rounds, medians (range).")
    table = "\n".join([
        "| | case A: whole set first | case B: hot set first (+ warming) |",
        "|---|---|---|",
        f"| models phase (sync before the taint lifts), s | {a:.1f} ({span('A', 'models')}) | {b:.1f} ({span('B', 'models')}) |",
        f"| B against A | | {100 * b / a:.0f}% |",
        f"| first read of the hot checkpoint, s | {med('A', 'first_read'):.2f} from disk ({span('A', 'first_read')}) "
        f"| {med('B', 'first_read'):.2f} warmed ({span('B', 'first_read')}) |",
        f"| the rest after the taint lifted (concurrency 8), s | | {med('B', 'rest'):.1f} ({span('B', 'rest')}) |",
    ])
    sdfleet = sb.SDFLEET if os.environ.get("SDFLEET_BIN") else "sdfleet (release)"
    text = (f"# Cold-start benchmark: the models phase\n\nMade by `bench/cold-start-bench.py --scale {args.scale} "
            f"--rounds {args.rounds}` on {time.strftime('%Y-%m-%d')} with {sdfleet}.\n\n{header}\n\n{table}\n")
    print(text)
    with open(os.path.join(HERE, "cold-start.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
