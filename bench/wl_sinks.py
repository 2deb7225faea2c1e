"""Sinks into Redis Streams and NATS JetStream (Debian's redis-server and nats-server, started here on the bench
cluster's port + 250 / + 251 with persistence on: append-only file, JetStream file store):

* throughput: changes per second from the first COMMIT until the broker holds all of them, for inserts of
  100,000 rows (20,000 with --quick) in transactions of 100 rows;
* latency: single-row UPDATEs at 1,000 commits/s (common.write_at_rate); from COMMIT returning to a reader of
  the broker seeing the change (Redis: XREAD BLOCK on the stream; NATS: a core subscription to the subject,
  which JetStream's publishes pass through once stored).
"""
import asyncio
import os
import sys
import threading
import time

import common

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "integration"))
import brokers  # noqa: E402

KINDS = ["redis", "nats"]


def count(broker, kind, label):
    if kind == "redis":
        return broker.client().xlen(f"changerelay:{label}")

    async def n(nc, js):
        info = await js.stream_info("CHANGERELAY", subjects_filter=f"changerelay.{label}")
        return (info.state.subjects or {}).get(f"changerelay.{label}", 0)
    return broker.run(n)


def throughput(b, broker, kind, rows):
    label = f"thr_{kind}"
    with b.connect() as c:
        c.execute(f"DROP TABLE IF EXISTS {label}")
        c.execute(f"CREATE TABLE {label} (id int PRIMARY KEY, v text)")
        common.track(c, label, label)
        c.execute("SELECT changerelay.create_sink(%s, %s, %s, ARRAY[%s])", (label, kind, broker.url, label))
        time.sleep(1.0)
        t0 = time.monotonic()
        for first in range(1, rows + 1, 100):
            c.execute(f"INSERT INTO {label} SELECT g, 'value ' || g FROM generate_series(%s::int, %s::int) g",
                      (first, min(rows, first + 99)))
        written = time.monotonic() - t0
        deadline = time.monotonic() + 600
        while count(broker, kind, label) < rows and time.monotonic() < deadline:
            time.sleep(0.05)
        elapsed = time.monotonic() - t0
        got = count(broker, kind, label)
        c.execute("SELECT changerelay.drop_sink(%s)", (label,))
        c.execute("SELECT changerelay.untrack(%s)", (label,))
        c.execute(f"DROP TABLE {label}")
    return {"rows": rows, "delivered": got, "seconds": round(elapsed, 2), "write_seconds": round(written, 2),
            "changes_per_s": round(got / elapsed)}


def redis_reader(broker, label, done, arrivals):
    c = broker.client()
    last = "$"
    import json
    while not done.is_set():
        for _, entries in c.xread({f"changerelay:{label}": last}, block=500, count=1000) or []:
            now = time.monotonic()
            for entry_id, fields in entries:
                arrivals.append((json.loads(fields["change"])["new"]["n"], now))
                last = entry_id


def nats_reader(broker, label, ready, done, arrivals):
    import json

    import nats

    async def go():
        nc = await nats.connect(broker.url)

        async def got(msg):
            arrivals.append((json.loads(msg.data)["new"]["n"], time.monotonic()))
        await nc.subscribe(f"changerelay.{label}", cb=got)
        await nc.flush()
        ready.set()
        while not done.is_set():
            await asyncio.sleep(0.05)
        await nc.drain()
    asyncio.run(go())


def latency(b, broker, kind, rate, seconds):
    label = f"lat_{kind}"
    with b.connect() as c:
        common.make_table(c, label, 8)
        common.track(c, label, label)
        c.execute("SELECT changerelay.create_sink(%s, %s, %s, ARRAY[%s])", (label, kind, broker.url, label))
        # Wait until the sink streams (its first write done), so the run measures steady delivery.
        c.execute(f"UPDATE {label} SET n = -1 WHERE id = 1")
        deadline = time.monotonic() + 30
        while count(broker, kind, label) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    done, ready, arrivals = threading.Event(), threading.Event(), []
    if kind == "redis":
        t = threading.Thread(target=redis_reader, args=(broker, label, done, arrivals))
        ready.set()
    else:
        t = threading.Thread(target=nats_reader, args=(broker, label, ready, done, arrivals))
    t.start()
    ready.wait(30)
    committed, achieved = common.write_at_rate(b, label, rate, seconds)
    deadline = time.monotonic() + 30
    while len({n for n, _ in arrivals} & committed.keys()) < len(committed) and time.monotonic() < deadline:
        time.sleep(0.05)
    done.set()
    t.join(30)
    with b.connect() as c:
        c.execute("SELECT changerelay.drop_sink(%s)", (label,))
        c.execute("SELECT changerelay.untrack(%s)", (label,))
        c.execute(f"DROP TABLE {label}")
    lat = common.latencies(committed, arrivals)
    return {"target_rate": rate, "achieved_rate": achieved, "commits": len(committed), "delivered": len(lat),
            **common.summary(lat)}


def run(b):
    rows, seconds = (20_000, 3) if b.quick else (100_000, 10)
    work = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "bench-brokers")
    out = {}
    for kind in KINDS:
        cls = brokers.Redis if kind == "redis" else brokers.Nats
        broker = cls(brokers.broker_port(kind, b.port), work)
        try:
            common.wait_worker_idle(b)
            thr = throughput(b, broker, kind, rows)
            print(f"  sink {kind:5}: {thr['changes_per_s']:7} changes/s ({thr['delivered']}/{rows} in "
                  f"{thr['seconds']} s; writing took {thr['write_seconds']} s)", flush=True)
            common.settle(b)
            lat = latency(b, broker, kind, 1000, seconds)
            print(f"  sink {kind:5}: commit->broker at {lat['achieved_rate']:.0f} commits/s: p50 "
                  f"{common.ms(lat['p50_ms'])} p95 {common.ms(lat['p95_ms'])} p99 {common.ms(lat['p99_ms'])} ms, "
                  f"{lat['delivered']}/{lat['commits']} delivered", flush=True)
            out[kind] = {"throughput": thr, "latency": lat}
        finally:
            broker.stop()
    return out
