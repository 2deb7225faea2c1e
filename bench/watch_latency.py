"""Commit-to-watch-return latency, and what the history costs per change.

A watcher thread loops `changerelay.watch(cursor, labels, '30 seconds')` on its own connection, continuing
from the last cursor it got; the writer commits single-row UPDATEs one at a time and waits for the watcher to
report each one. Latency is from COMMIT returning in the writer to watch() returning the change in the watcher
(both on this machine's monotonic clock). Then reports the history's bytes per change: table plus indexes
(pg_total_relation_size) and WAL written by the worker's history inserts, per change, over --rows rows inserted
in one transaction. Not a test: nothing passes or fails.

    .venv/bin/python bench/watch_latency.py --port 5499 --commits 2000 --rows 100000
"""
import argparse
import queue
import statistics
import threading
import time
import uuid

import psycopg


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=5499)
    ap.add_argument("--commits", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=100000)
    a = ap.parse_args()
    dsn = f"host=127.0.0.1 port={a.port} user=postgres dbname=postgres"
    w = psycopg.connect(dsn, autocommit=True)
    table, label = "bench_watch_" + uuid.uuid4().hex[:8], "bw_" + uuid.uuid4().hex[:8]
    w.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n int, payload text)")
    w.execute(f"INSERT INTO {table} VALUES (1, 0, '')")
    w.execute("SELECT changerelay.track(%s, %s)", (table, label))
    time.sleep(0.5)
    start = w.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    got = queue.Queue()
    stop = threading.Event()

    def watcher():
        r = psycopg.connect(dsn, autocommit=True)
        cursor = start
        while not stop.is_set():
            rows = r.execute("SELECT cursor, new->>'n' FROM changerelay.watch(%s, %s, '2 seconds')",
                             (cursor, [label])).fetchall()
            now = time.monotonic()
            for c, n in rows:
                got.put((int(n), now))
                cursor = c
        r.close()

    t = threading.Thread(target=watcher, daemon=True)
    t.start()
    lat = []
    for n in range(1, a.commits + 1):
        w.execute(f"UPDATE {table} SET n = %s WHERE id = 1", (n,))
        committed = time.monotonic()
        while True:
            m, at = got.get(timeout=30)
            if m == n:
                lat.append(max(0.0, at - committed) * 1000)
                break
    stop.set()
    t.join(5)
    print(f"commit -> watch() returned, {len(lat)} commits: p50={statistics.median(lat):.2f} ms "
          f"p95={pct(lat, 95):.2f} ms p99={pct(lat, 99):.2f} ms max={max(lat):.2f} ms")

    # History cost per change: one transaction of --rows inserts, a 40-character payload each.
    w.execute("CHECKPOINT")
    size0 = w.execute("SELECT pg_total_relation_size('changerelay.history')").fetchone()[0]
    rows0 = w.execute("SELECT count(*) FROM changerelay.history").fetchone()[0]
    wal0 = w.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
    w.execute(f"INSERT INTO {table} SELECT g, g, repeat('x', 40) FROM generate_series(2, %s + 1) g", (a.rows,))
    wal_writer = w.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (wal0,)).fetchone()[0]
    deadline = time.monotonic() + 300
    while w.execute("SELECT count(*) FROM changerelay.history").fetchone()[0] < rows0 + a.rows:
        if time.monotonic() > deadline:
            raise SystemExit("the worker did not file the rows within 300 s")
        time.sleep(0.2)
    wal_all = w.execute("SELECT pg_current_wal_lsn() - %s::pg_lsn", (wal0,)).fetchone()[0]
    size1 = w.execute("SELECT pg_total_relation_size('changerelay.history')").fetchone()[0]
    print(f"history per change ({a.rows} inserted rows of a 3-column table): "
          f"{(size1 - size0) / a.rows:.0f} bytes of table + indexes, "
          f"{(wal_all - wal_writer) / a.rows:.0f} bytes of WAL written by the worker (history and row versions) "
          f"(the writer's own WAL: {wal_writer / a.rows:.0f} bytes per row)")
    w.execute("SELECT changerelay.untrack(%s)", (table,))
    w.execute(f"DROP TABLE {table}")


if __name__ == "__main__":
    main()
