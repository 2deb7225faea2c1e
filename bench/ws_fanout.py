#!/usr/bin/env python3
"""Delivery latency and fan-out through the relay worker's WebSocket endpoint.

A writer commits single-row transactions at a fixed rate into a tracked table; N WebSocket subscribers (the
`websockets` library) follow its label. Latency is from COMMIT returning in the writer to the change (or the
version delta) arriving at a subscriber, on the same machine's monotonic clock (measured with --changes, whose
messages carry the row). Reports p50/p95/p99 and the
messages per second delivered to all subscribers together. Not a pass/fail test.

    .venv/bin/python bench/ws_fanout.py --port 5499 --subscribers 1 --rate 1000 --seconds 10 --changes
    .venv/bin/python bench/ws_fanout.py --port 5499 --subscribers 1000 --rate 100 --seconds 10 --procs 2
"""
import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import time
import uuid

import psycopg
import websockets


QUIET = 3  # seconds of silence after the writer is done before a subscriber hangs up


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def source_address(index, i, per_address=50):
    """The loopback address subscriber i of client process `index` connects from: 50 subscribers per address,
    since the endpoint admits at most 64 connections from one address (max_per_address)."""
    n = i // per_address
    return f"127.{10 + index}.{n // 250}.{n % 250 + 1}"


def client_process(index, count, ws_port, token, label, changes, ready, done, results):
    """`count` subscribers in one process; reports (messages, latency samples, time of the last message)."""
    got = [0]
    arrivals = []
    last = [time.monotonic()]
    final = {}  # subscriber -> the newest "all" version it saw

    # At most 24 handshakes at a time per process: the endpoint keeps 64 connections that have not
    # authenticated yet and closes the oldest of them for a new one.
    opening = asyncio.Semaphore(24)

    async def subscriber(i):
        uri = f"ws://127.0.0.1:{ws_port}/ws?token={token}"
        for attempt in range(20):
            try:
                async with opening:
                    ws = await websockets.connect(uri, max_queue=None, open_timeout=60, ping_interval=None,
                                                  local_addr=(source_address(index, i), 0))
                break
            except (OSError, websockets.InvalidHandshake):
                if attempt == 19:
                    raise
                await asyncio.sleep(0.2)
        await ws.send(json.dumps({"op": "subscribe", "labels": [label], "since": None,
                                  "versions": not changes, "changes": changes}))
        await ws.recv()  # subscribed
        if not changes:
            await ws.recv()  # the full version map
        return ws, i

    async def follow(ws, i):
        # Ends 3 s (QUIET) after the last message once `done` is set, or after 120 s of silence; polls every
        # second so a recv() begun before `done` was set does not hold the subscriber for 120 s.
        heard = time.monotonic()
        while True:
            try:
                msg = await asyncio.wait_for(ws.recv(), timeout=1)
            except asyncio.TimeoutError:
                if time.monotonic() - heard < (QUIET if done.is_set() else 120):
                    continue
                await ws.close()
                return
            except websockets.ConnectionClosed:
                return
            now = heard = time.monotonic()
            m = json.loads(msg)
            if m.get("type") == "checkpoint":
                continue
            got[0] += 1
            last[0] = now
            if "data" in m and "all" in m["data"]:
                final[i] = max(final.get(i, 0), m["data"]["all"]["v"])
            elif m.get("type") == "change":
                final[i] = max(final.get(i, 0), m["event_id"])
                # Latency is sampled from change messages (they carry the row) on 50 subscribers of process 0;
                # version deltas carry only the event id.
                if index == 0 and i < 50:
                    arrivals.append((m["new"]["n"], now))

    async def run():
        conns = await asyncio.gather(*(subscriber(i) for i in range(count)))
        await asyncio.get_running_loop().run_in_executor(None, ready.wait)
        await asyncio.gather(*(follow(ws, i) for ws, i in conns))

    asyncio.run(run())
    results.put((got[0], arrivals, last[0], list(final.values())))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=5499, help="Postgres port; the endpoint is on changerelay.port")
    ap.add_argument("--subscribers", type=int, default=1)
    ap.add_argument("--rate", type=int, default=1000, help="commits per second")
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--changes", action="store_true", help="subscribe to changes (default: versions only)")
    ap.add_argument("--procs", type=int, default=1, help="client processes sharing the subscribers")
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

    ctx = mp.get_context("fork")
    counts = [a.subscribers // a.procs + (1 if i < a.subscribers % a.procs else 0) for i in range(a.procs)]
    counts = [n for n in counts if n]
    ready, done, results = ctx.Barrier(len(counts) + 1), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=client_process, args=(i, n, ws_port, token, label, a.changes, ready, done, results))
             for i, n in enumerate(counts)]
    for p in procs:
        p.start()
    ready.wait(timeout=180)
    committed = {}  # n -> monotonic time COMMIT returned (CLOCK_MONOTONIC is system-wide)
    w = psycopg.connect(dsn, autocommit=True)
    interval = 1.0 / a.rate
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < a.seconds:
        n += 1
        w.execute(f"UPDATE {table} SET n = %s WHERE id = 1", (n,))
        committed[n] = time.monotonic()
        lag = t0 + n * interval - time.monotonic()
        if lag > 0:
            time.sleep(lag)
    w.close()
    done.set()
    received, last, latencies, finals = 0, t0, [], []
    for _ in procs:
        got, arrivals, last_at, final = results.get(timeout=600)
        finals.extend(final)
        received += got
        last = max(last, last_at)
        latencies.extend(max(0.0, t - committed[k]) * 1000 for k, t in arrivals if k in committed)
    for p in procs:
        p.join(30)
    writes = len(committed)
    elapsed = max(last - t0, 0.001)
    print(f"subscribers={a.subscribers} client processes={len(procs)} mode={'changes' if a.changes else 'versions'} "
          f"commits={writes} ({writes / a.seconds:.0f}/s) delivered={received} messages "
          f"({received / elapsed:.0f}/s to all subscribers, last one {elapsed - a.seconds:.2f} s after the last commit)")
    newest = db.execute("SELECT changerelay.version(%s)", (label,)).fetchone()[0]
    print(f"subscribers that ended at the newest version ({newest}): {sum(1 for v in finals if v == newest)} "
          f"of {a.subscribers}")
    if latencies:
        print(f"latency commit->subscriber ms: p50={statistics.median(latencies):.2f} "
              f"p95={pct(latencies, 95):.2f} p99={pct(latencies, 99):.2f} max={max(latencies):.2f} "
              f"(n={len(latencies)})")
    db.execute("SELECT changerelay.revoke_token(%s)", (label,))
    db.execute("SELECT changerelay.untrack(%s)", (table,))
    db.execute(f"DROP TABLE {table}")


if __name__ == "__main__":
    main()
