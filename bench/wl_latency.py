"""Commit-to-subscriber latency at fixed commit rates, for three receivers:

* websocket: one subscriber to the endpoint (changes: true), the Rust client of bench/fanout on one thread (a
  Python receiver competes with the Python writer for this machine's two cores and measures itself);
* watch: a loop of changerelay.watch(cursor, labels, '1 second') continuing from its last cursor
  (bench/watch_latency.py's loop, in its own process, while the writer runs at a fixed rate);
* trigger_notify: a row trigger doing nextval() + pg_notify('changes', json), and a psycopg client that LISTENs.

The writer (common.write_at_rate) commits single-row UPDATEs at the rate; latency is from COMMIT returning to
the receiver seeing the row value written, both on the system-wide monotonic clock.
"""
import json
import multiprocessing as mp
import time

import common

RECEIVERS = ["websocket", "watch", "trigger_notify"]


def watch_receiver(dsn, label, ready, done, results):
    import psycopg
    arrivals = []
    with psycopg.connect(dsn, autocommit=True) as r:
        cursor = r.execute("SELECT changerelay.current_cursor()").fetchone()[0]
        ready.set()
        heard = time.monotonic()
        while not (done.is_set() and time.monotonic() - heard > 1.5):
            rows = r.execute("SELECT cursor, (new->>'n')::bigint FROM changerelay.watch(%s, %s, '1 second', 10000)",
                             (cursor, [label])).fetchall()
            now = time.monotonic()
            for c, n in rows:
                arrivals.append((n, now))
                cursor = c
            if rows:
                heard = now
    results.put(arrivals)


def listen_receiver(dsn, channel, ready, done, results):
    import psycopg
    arrivals = []
    with psycopg.connect(dsn, autocommit=True) as r:
        r.execute(f"LISTEN {channel}")
        ready.set()
        heard = time.monotonic()
        while not (done.is_set() and time.monotonic() - heard > 1.5):
            for note in r.notifies(timeout=0.5):
                now = heard = time.monotonic()
                arrivals.append((json.loads(note.payload)["n"], now))
    results.put(arrivals)


def run_with_process(b, target, arg, write):
    ctx = mp.get_context("fork")
    ready, done, results = ctx.Event(), ctx.Event(), ctx.Queue()
    p = ctx.Process(target=target, args=(b.dsn, arg, ready, done, results))
    p.start()
    ready.wait(60)
    written = write()
    done.set()
    arrivals = results.get(timeout=120)
    p.join(30)
    return written, arrivals


def measure(b, receiver, rate, seconds, token):
    if receiver == "trigger_notify":
        def write():
            return common.write_at_rate(b, "lat_notify", rate, seconds)
        (committed, achieved), arrivals = run_with_process(b, listen_receiver, "changes", write)
    else:
        def write():
            return common.write_at_rate(b, "lat_tracked", rate, seconds)
        if receiver == "watch":
            (committed, achieved), arrivals = run_with_process(b, watch_receiver, "lat", write)
        else:
            (committed, achieved), seen = common.rust_ws_session(b, "lat", token, 1, write, threads=1)
            arrivals = seen["arrivals"]
    lat = common.latencies(committed, arrivals)
    return {"receiver": receiver, "target_rate": rate, "achieved_rate": achieved, "commits": len(committed),
            "delivered": len(lat), **common.summary(lat)}


def run(b):
    rates, seconds = ([100, 1000], 3) if b.quick else ([100, 1000, 5000], 10)
    common.build_fanout_client()
    with b.connect() as c:
        common.make_table(c, "lat_tracked", 8)
        common.track(c, "lat_tracked", "lat")
        common.make_table(c, "lat_notify", 8)
        common.add_notify_trigger(c, "lat_notify")
    token = common.make_token(b, "lat")
    out = []
    for rate in rates:
        for receiver in RECEIVERS:
            common.wait_worker_idle(b)
            r = measure(b, receiver, rate, seconds, token)
            print(f"  latency {receiver:15} {rate:5}/s (achieved {r['achieved_rate']:7.0f}/s): "
                  f"p50 {common.ms(r['p50_ms'])} p95 {common.ms(r['p95_ms'])} p99 {common.ms(r['p99_ms'])} ms, "
                  f"{r['delivered']}/{r['commits']} delivered", flush=True)
            out.append(r)
    with b.connect() as c:
        c.execute("SELECT changerelay.revoke_token('lat')")
        c.execute("SELECT changerelay.untrack('lat_tracked')")
        c.execute("DROP TABLE lat_tracked, lat_notify")
    return {"seconds_per_run": seconds, "runs": out}
