#!/usr/bin/env python3
"""Delivery latency and fan-out through the relay worker's WebSocket endpoint.

A writer commits single-row transactions at a fixed rate into a tracked table; N WebSocket subscribers (the
`websockets` library) follow its label. Latency is from COMMIT returning in the writer to the change (or the
version delta) arriving at a subscriber, on the same machine's monotonic clock (measured with --changes, whose
messages carry the row). Reports p50/p95/p99 and the
messages per second delivered to all subscribers together. Not a pass/fail test.

    .venv/bin/python bench/ws_fanout.py --port 5499 --subscribers 1 --rate 1000 --seconds 10 --changes
    .venv/bin/python bench/ws_fanout.py --port 5499 --subscribers 1000 --rate 100 --seconds 10
"""
import argparse
import asyncio
import json
import statistics
import threading
import time
import uuid

import psycopg
import websockets


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=5499, help="Postgres port; the endpoint is on changerelay.port")
    ap.add_argument("--subscribers", type=int, default=1)
    ap.add_argument("--rate", type=int, default=1000, help="commits per second")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--changes", action="store_true", help="subscribe to changes (default: versions only)")
    a = ap.parse_args()

    dsn = f"host=127.0.0.1 port={a.port} user=postgres dbname=postgres"
    db = psycopg.connect(dsn, autocommit=True)
    ws_port = int(db.execute("SHOW changerelay.port").fetchone()[0])
    table, label = "bench_ws_" + uuid.uuid4().hex[:8], "bench_" + uuid.uuid4().hex[:8]
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, n bigint)")
    db.execute(f"INSERT INTO {table} VALUES (1, 0)")
    db.execute("SELECT changerelay.track(%s, %s)", (table, label))
    token = db.execute("SELECT changerelay.create_token(%s, %s, true)", (label, [label])).fetchone()[0]
    time.sleep(0.5)

    committed = {}  # n -> monotonic time COMMIT returned
    latencies = []
    received = [0]
    ready = [0]
    done = threading.Event()

    def writer():
        w = psycopg.connect(dsn, autocommit=True)
        interval = 1.0 / a.rate
        start = time.monotonic()
        n = 0
        while time.monotonic() - start < a.seconds:
            n += 1
            w.execute(f"UPDATE {table} SET n = %s WHERE id = 1", (n,))
            committed[n] = time.monotonic()
            lag = start + n * interval - time.monotonic()
            if lag > 0:
                time.sleep(lag)
        w.close()
        done.set()

    async def subscriber(i, started):
        uri = f"ws://127.0.0.1:{ws_port}/ws?token={token}"
        async with websockets.connect(uri, max_queue=None, open_timeout=30) as ws:
            await ws.send(json.dumps({"op": "subscribe", "labels": [label], "since": None,
                                      "versions": not a.changes, "changes": a.changes}))
            await ws.recv()  # subscribed
            if not a.changes:
                await ws.recv()  # the full version map
            ready[0] += 1
            if ready[0] == a.subscribers:
                started.set()
            while True:
                try:
                    msg = await asyncio.wait_for(ws.recv(), timeout=3 if done.is_set() else 60)
                except (asyncio.TimeoutError, websockets.ConnectionClosed):
                    return
                now = time.monotonic()
                m = json.loads(msg)
                received[0] += 1
                # Latency is sampled from change messages (they carry the row) on the first 50 subscribers;
                # version deltas carry only the event id.
                if m.get("type") == "change" and i < 50:
                    n = m["new"]["n"]
                    if n in committed:
                        latencies.append((now - committed[n]) * 1000)

    async def run():
        started = asyncio.Event()
        tasks = [asyncio.create_task(subscriber(i, started)) for i in range(a.subscribers)]
        await asyncio.wait_for(started.wait(), 120)
        t0 = time.monotonic()
        received[0] = 0
        threading.Thread(target=writer, daemon=True).start()
        await asyncio.gather(*tasks)
        return time.monotonic() - t0

    elapsed = asyncio.run(run())
    writes = len(committed)
    print(f"subscribers={a.subscribers} mode={'changes' if a.changes else 'versions'} commits={writes} "
          f"({writes / a.seconds:.0f}/s) delivered={received[0]} messages "
          f"({received[0] / max(elapsed - 3, 0.001):.0f}/s to all subscribers)")
    if latencies:
        print(f"latency commit->subscriber ms: p50={statistics.median(latencies):.2f} "
              f"p95={pct(latencies, 95):.2f} p99={pct(latencies, 99):.2f} max={max(latencies):.2f} "
              f"(n={len(latencies)})")
    db.execute("SELECT changerelay.revoke_token(%s)", (label,))
    db.execute("SELECT changerelay.untrack(%s)", (table,))
    db.execute(f"DROP TABLE {table}")


if __name__ == "__main__":
    main()
