#!/usr/bin/env python3
"""The benchmark suite (`make bench`, `make bench QUICK=1`): starts its own cluster on loopback, runs every
workload (bench/wl_*.py), writes results.json, results.md and results.png, and stops the cluster. Nothing here
passes or fails; a workload that raises is recorded with its error and the others still run.

    .venv/bin/python bench/run.py --quick --no-install      # against the build installed now
"""
import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)

import common  # noqa: E402
import report  # noqa: E402
import wl_decode  # noqa: E402
import wl_fanout  # noqa: E402
import wl_gate  # noqa: E402
import wl_hostile  # noqa: E402
import wl_latency  # noqa: E402
import wl_memory  # noqa: E402
import wl_overhead  # noqa: E402
import wl_sinks  # noqa: E402
import wl_throughput  # noqa: E402

# The major (PG=15|17|18, as for every make target); 17 and 18 run inside their roots (scripts/root.sh).
PG = os.environ.get("PG", "15")
PGTOOL = os.path.join(ROOT, "scripts", "pgtool.sh")
DATA_DIR = os.path.join(ROOT, "target", f"pg{PG}", "bench-cluster")
EXTRA_CONF = "changerelay.max_clients = 4096\nchangerelay.max_connections_per_address = 4096\nmax_connections = 200"
WORKLOADS = [("decoding", wl_decode), ("throughput", wl_throughput), ("latency", wl_latency),
             ("overhead", wl_overhead), ("fanout", wl_fanout), ("memory", wl_memory), ("hostile", wl_hostile),
             ("gate", wl_gate), ("sinks", wl_sinks)]


def sh(*cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, **kw).stdout.strip()


def library_info():
    """Which build of the library is installed: release builds carry no .debug_info section."""
    libdir = sh(PGTOOL, "pg_config", "--pkglibdir")
    root = "" if PG == "15" else sh(os.path.join(ROOT, "scripts", "root.sh"), "path", PG)
    path = root + os.path.join(libdir, "pg_changerelay.so")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    sections = subprocess.run(["readelf", "-S", path], capture_output=True, text=True).stdout
    return {"path": path, "sha256_16": digest, "build": "debug" if ".debug_info" in sections else "release"}


def machine_info():
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    dirty = bool(sh("git", "status", "--porcelain", "--untracked-files=no"))
    return {"nproc": int(sh("nproc")), "cpu": cpu, "ram_gib": round(mem_kb / 2**20, 1), "kernel": platform.release(),
            "python": platform.python_version(), "git_commit": sh("git", "rev-parse", "HEAD"), "git_dirty": dirty}


def cluster(cmd, port=None):
    args = [os.path.join(ROOT, "scripts", "cluster.sh"), cmd, DATA_DIR] + ([str(port)] if port else [])
    subprocess.run(args, check=True, cwd=ROOT, env={**os.environ, "EXTRA_CONF": EXTRA_CONF})


def server_log_problems():
    try:
        with open(os.path.join(DATA_DIR, "server.log"), errors="replace") as f:
            return [line.rstrip() for line in f if "terminated by signal" in line or "PANIC" in line][:20]
    except OSError as e:
        return [f"could not read the server log: {e}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs, fewer points (about 5 minutes on 2 busy cores)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("PGCR_PORT", "5498")) - 11,
                    help="the cluster's port (default PGCR_PORT-11); the endpoint listens on port+1000")
    ap.add_argument("--out", default=os.path.join(BENCH, "out"), help="directory for results.{json,md,png}")
    ap.add_argument("--no-install", action="store_true",
                    help="use the installed build (default: cargo pgrx install --release first)")
    ap.add_argument("--only", help="comma-separated workloads to run: " + ",".join(n for n, _ in WORKLOADS))
    a = ap.parse_args()
    started = time.monotonic()
    if not a.no_install:
        subprocess.run(["make", "--no-print-directory", "install", f"PG={PG}"], check=True, cwd=ROOT)
    results = {"mode": "quick" if a.quick else "full", "pg": PG, "machine": machine_info(), "library": library_info(),
               "cluster": {"port": a.port, "endpoint_port": a.port + 1000, "extra_conf": EXTRA_CONF.split("\n"),
                           "data_dir": os.path.relpath(DATA_DIR, ROOT)},
               "workloads": {}, "errors": {}}
    if results["library"]["build"] != "release":
        print("WARNING: the installed pg_changerelay.so is a debug build; numbers are not representative",
              file=sys.stderr)
    b = common.Bench(a.port, a.quick)
    wanted = a.only.split(",") if a.only else [n for n, _ in WORKLOADS]
    cluster("stop")
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    try:
        cluster("start", a.port)
        b.sql("CREATE EXTENSION pg_changerelay")
        common.wait_worker_idle(b, timeout=60)
        results["machine"]["postgres"] = b.one("SELECT version()")
        for name, module in WORKLOADS:
            if name not in wanted:
                continue
            print(f"== {name}", flush=True)
            t = time.monotonic()
            try:
                common.settle(b)
                results["workloads"][name] = module.run(b)
            except Exception:
                traceback.print_exc()
                results["errors"][name] = traceback.format_exc()
            results["workloads"].setdefault(name, {})["elapsed_s"] = round(time.monotonic() - t, 1)
    finally:
        results["server_log_problems"] = server_log_problems()
        cluster("stop")
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    os.makedirs(a.out, exist_ok=True)
    paths = report.write(results, a.out)
    print(f"done in {results['elapsed_s']:.0f} s: " + ", ".join(os.path.relpath(p, ROOT) for p in paths))
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
