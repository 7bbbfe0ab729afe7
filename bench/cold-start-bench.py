#!/usr/bin/env python3
"""Cold-start benchmark of the models phase: what a new node syncs before its startup
taint lifts, whole ModelSet (case A, a ModelSet without `hot`) against hot models first
(case B: the hot checkpoint; then, as the agent does once the taint lifted, its read into
the page cache, timed apart), side by side in one run, from a local S3 server (versitygw
over a directory). Also the first read of the hot checkpoint right after its sync (what
ComfyUI's first load reads), from the disk (A: the sync writes with O_DIRECT, past the
page cache) and after warming (B).

    bench/cold-start-bench.py [--scale 1.0] [--rounds 3] [--keep-data] [--e2e-rounds 1]

Then, with the same server, end to end on the testbed (it must be up):
tests/cold_start_bench.rs runs a fleet at zero through its first job, A against B.

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


def end_to_end(endpoint, b_first):
    """One end-to-end round on the testbed (tests/cold_start_bench.rs): a fleet at zero
    through its first job, case A then B (or B then A); one dict per case."""
    sb.log("end to end on the testbed: " + ("B then A" if b_first else "A then B"))
    env = {**os.environ, **sb.KEYS, "SDFLEET_BENCH_S3_ENDPOINT": endpoint, "SDFLEET_BENCH_BUCKET": sb.BUCKET,
           "SDFLEET_BENCH_HOT": os.path.basename(HOT), "SDFLEET_BENCH_AGENT_BIN": sb.SDFLEET,
           "CARGO_TARGET_DIR": os.environ.get("CARGO_TARGET_DIR", os.path.join(sb.CACHE, "target"))}
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        env.pop(k, None)
    if b_first:
        env["SDFLEET_BENCH_B_FIRST"] = "1"
    out = subprocess.run(["cargo", "test", "--locked", "--test", "cold_start_bench", "--", "--ignored", "--nocapture"],
                         cwd=sb.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if out.returncode:
        at = out.stdout.find("panicked")
        raise SystemExit(f"the end-to-end run failed:\n{out.stdout[max(at, 0):][:4000]}")
    return [json.loads(line.split(" ", 1)[1]) for line in out.stdout.splitlines() if line.startswith("COLDSTART ")]


def e2e_table(runs):
    """Medians per case of the end-to-end phases (seconds from the job's submit)."""
    def med(case, key):
        return statistics.median(r[key] for r in runs if r["case"] == case)

    rows = [("submit to node (decision, Karpenter launch; kwok)", "submit_to_node_s"),
            ("models: node to taint lifted (agent sync)", "models_s"),
            ("taint lifted to job running (pod start, dispatch)", "taint_lifted_to_running_s"),
            ("**submit to job running**", "submit_to_running_s")]
    lines = [f"End to end on the testbed, {len(runs) // 2} round(s), medians: a fleet at zero, one job; "
             "the node agent (release build) syncs from the same server; node boot, GPU and image pull "
             "are not simulated (see the README's budget).", "",
             "| phase, s | case A: whole set | case B: hot set | B against A |", "|---|---|---|---|"]
    for label, key in rows:
        a, b = med("A", key), med("B", key)
        lines.append(f"| {label} | {a:.1f} | {b:.1f} | {100 * b / a:.0f}% |" if a else f"| {label} | {a:.1f} | {b:.1f} | |")
    lines += ["", "The node phase is Karpenter's kwok provider (its batching window and the previous case's "
              "node going away): it varies between runs and is not a property of either case; the models "
              "phase is what the hot set changes."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep-data", action="store_true")
    ap.add_argument("--e2e-rounds", type=int, default=1,
                    help="end-to-end rounds on the testbed (it must be up); 0 skips them")
    args = ap.parse_args()
    if args.e2e_rounds and subprocess.run([os.path.join(sb.ROOT, "tests/testbed/testbed"), "status"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
        raise SystemExit("the end-to-end rounds need the testbed: tests/testbed/testbed up (or --e2e-rounds 0)")
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
                    # As the agent does: the hot set, then (taint lifted, the pod starting)
                    # its read into the page cache; the second sync finds it all present.
                    row["models"] = timed(sync + ["--dest", d, "--include", HOT], env)
                    row["warm"] = timed(sync + ["--dest", d, "--include", HOT, "--warm"], env)
                    row["first_read"] = first_read(os.path.join(d, HOT), drop=False)
                    row["rest"] = timed(sync + ["--dest", d, "--concurrency", "8"], env)
                got = sb.dir_bytes(d)
                if got != total:
                    raise SystemExit(f"case {case} holds {got} bytes, expected {total}")
                rows.append(row)
                shutil.rmtree(d)
                os.sync()
        e2e = [r for n in range(args.e2e_rounds) for r in end_to_end(endpoint, n % 2 == 1)]
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
        "| | case A: whole set first | case B: hot set first |",
        "|---|---|---|",
        f"| models phase (sync before the taint lifts), s | {a:.1f} ({span('A', 'models')}) | {b:.1f} ({span('B', 'models')}) |",
        f"| B against A | | {100 * b / a:.0f}% |",
        f"| reading the hot set into the page cache (after the taint lifted, while the pod starts), s | "
        f"| {med('B', 'warm'):.1f} ({span('B', 'warm')}) |",
        f"| first read of the hot checkpoint, s | {med('A', 'first_read'):.2f} from disk ({span('A', 'first_read')}) "
        f"| {med('B', 'first_read'):.2f} warmed ({span('B', 'first_read')}) |",
        f"| the rest after the taint lifted (concurrency 8), s | | {med('B', 'rest'):.1f} ({span('B', 'rest')}) |",
    ])
    if e2e:
        table += "\n\n" + e2e_table(e2e)
    sdfleet = sb.SDFLEET if os.environ.get("SDFLEET_BIN") else "sdfleet (release)"
    text = (f"# Cold-start benchmark: the models phase\n\nMade by `bench/cold-start-bench.py --scale {args.scale} "
            f"--rounds {args.rounds}` on {time.strftime('%Y-%m-%d')} with {sdfleet}.\n\n{header}\n\n{table}\n")
    print(text)
    with open(os.path.join(HERE, "cold-start.md"), "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
