"""Commit-to-visible latency of a version, measured from a separate client.

A writer commits single-row updates of a tracked table; right after each
COMMIT returns, a second connection polls changerelay.version() until it
shows the new version. Reports p50/p95/p99 over --commits commits.
Not a test: nothing passes or fails.
"""
import argparse
import json
import os
import statistics
import time

import psycopg


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", default=f"host=127.0.0.1 port={os.environ.get('PGCR_PORT', '5499')} user=postgres dbname=postgres")
    ap.add_argument("--commits", type=int, default=1000)
    ap.add_argument("--json-out")
    a = ap.parse_args()
    with psycopg.connect(a.dsn, autocommit=True) as w, psycopg.connect(a.dsn, autocommit=True) as r:
        w.execute("CREATE EXTENSION IF NOT EXISTS pg_changerelay")
        w.execute("DROP TABLE IF EXISTS bench_versions")
        w.execute("CREATE TABLE bench_versions (name text PRIMARY KEY, n int)")
        w.execute("INSERT INTO bench_versions VALUES ('WAFCONFIG', 0)")
        w.execute("SELECT changerelay.track('bench_versions', 'bench_versions')")
        poll = r.cursor()
        q = "SELECT changerelay.version('bench_versions', 'WAFCONFIG')"
        deadline = time.monotonic() + 10
        while poll.execute(q).fetchone()[0] is None and time.monotonic() < deadline:
            time.sleep(0.01)
        lat, polls = [], []
        for i in range(a.commits):
            before = poll.execute(q).fetchone()[0]
            w.execute("UPDATE bench_versions SET n = n + 1 WHERE name = 'WAFCONFIG'")
            t0 = time.perf_counter()
            n = 0
            while True:
                n += 1
                v = poll.execute(q).fetchone()[0]
                if v is not None and (before is None or v > before):
                    break
                if time.perf_counter() - t0 > 5:
                    raise SystemExit(f"commit {i}: version did not move within 5 s")
            lat.append((time.perf_counter() - t0) * 1000)
            polls.append(n)
        w.execute("SELECT changerelay.untrack('bench_versions')")
        w.execute("DROP TABLE bench_versions")
        alloc = w.execute("SELECT size FROM pg_shmem_allocations WHERE name = 'pg_changerelay'").fetchone()
        st = w.execute("SELECT changerelay.status()").fetchone()[0]
    res = {
        "commits": a.commits,
        "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95), "p99_ms": pct(lat, 99),
        "mean_ms": statistics.mean(lat), "max_ms": max(lat),
        "mean_polls": statistics.mean(polls),
        "shmem_bytes": alloc[0] if alloc else None,
        "capacity_rows": st["tracked_rows"]["capacity"], "capacity_labels": st["labels"]["capacity"],
        "bytes_per_row": st["tracked_rows"]["bytes_per_row"],
    }
    print(f"commit -> visible version over {a.commits} commits: p50 {res['p50_ms']:.2f} ms, "
          f"p95 {res['p95_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms (max {res['max_ms']:.2f} ms)")
    print(f"shared memory: {res['shmem_bytes']} bytes for {res['capacity_rows']} rows + {res['capacity_labels']} labels "
          f"({res['bytes_per_row']} bytes per row entry)")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
