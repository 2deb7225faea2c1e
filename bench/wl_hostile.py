"""Hostile clients: what abusive or idle clients of the endpoint cost a well-behaved subscriber.

* Re-subscribing from the oldest cursor: a tracked table with a history of 100,000 rows (20,000 with --quick,
  in 1,000-row transactions) under one label; 200 WebSocket clients of that label (one token, 2 processes,
  source addresses 127.0.0.22..25 since the endpoint allows 64 connections per address) that each loop:
  connect, subscribe from the oldest cursor with changes (history catch-up), read 500 changes, subscribe again
  from the oldest cursor on the same connection, read 500 more, disconnect. Meanwhile one live subscriber of
  another label (its own token, its own process) and a writer committing single-row UPDATEs at 1,000
  commits/s into that label's table: commit -> WebSocket latency on the system-wide monotonic clock (as
  wl_latency); the same commits through changerelay.watch() in a loop (no endpoint on that path, so the
  worker's part of the latency shows); the worker's lag every 100 ms (`changerelay.status()`: the slot's
  lag_bytes, and now - the last applied commit's timestamp). The same window without the abusive clients, in
  the same run, is the baseline. Targets (issue): live p99 < 10 ms, lag < 1 s.
* Idle TCP connections: 1,000 connections from 20 loopback source addresses (127.0.0.2..21, 50 each) that
  never send a byte (the endpoint keeps at most 64 unauthenticated connections, closing the oldest for a new
  one, and closes the others at auth_timeout): opened once; or every one the server closes opened again 1 s
  later; or opened again at once (a reconnect storm). Meanwhile 50 authenticated `GET /versions/{label}`, a
  new connection each (as curl or urllib), retried when the connection is dropped, latency counted to the
  answer; then a WebSocket subscriber that connects under the flood, with its commit -> arrival latency;
  against the same without idle connections.

Each window reports the CPU (in cores) of the worker's main thread (decoding, answering requests), its endpoint
thread, the cluster's other processes (the writer's backend among them), each client process, this process
(the writer) and the whole machine, whose remainder is other users' load; and for the worker's threads and
the client processes, how long they waited runnable for a core (/proc/.../schedstat). Not pass/fail: targets
are reported met or missed.
"""
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import re
import resource
import socket
import threading
import time
import urllib.request

import common
import wl_latency

HIST, LIVE = "hostile_hist", "hostile_live"  # table name = label
RATE = 1000
ABUSERS, ABUSER_PROCS = 200, 2
ABUSER_ADDRESSES = [f"127.0.0.{i}" for i in range(22, 26)]  # 50 each: the endpoint allows 64 per address
READ_PER_SUBSCRIPTION, SUBSCRIBES_PER_CONNECTION = 500, 2
IDLE_CONNECTIONS, IDLE_ADDRESSES = 1000, 20
# How the idle connections behave: not there; opened once (the server closes all but 64 at once, the rest at
# auth_timeout); each one the server closes opened again 1 s later; opened again at once (a reconnect storm).
IDLE_MODES = {"none": False, "once": None, "reopen_1s": 1.0, "reopen": 0.0}
VERSION_REQUESTS = 50
P99_TARGET_MS, LAG_TARGET_S = 10.0, 1.0
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
ABUSER_FIELDS = ("connects", "subscribes", "changes", "errors", "resyncs")
FLOOD_FIELDS = ("connects", "closed_by_server", "answered", "reset", "connect_errors")


# --- measuring ----------------------------------------------------------------------------------------------

def ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


class Sampler:
    """A thread of this process that every 100 ms reads the worker's lag (slot lag_bytes; now - the last applied
    commit's timestamp) and the CPU of the cluster's other processes (backends, the writer's included;
    walwriter, ...); a backend that starts during the window counts from 0."""

    def __init__(self, b, worker):
        self.b, self.worker, self.postmaster = b, worker, ppid(worker)
        self.lag, self.cpu_first, self.cpu_last = [], {}, {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def scan(self, first=False):
        for pid in children(self.postmaster):
            if pid == self.worker:
                continue
            try:
                cpu = common.cpu_seconds(pid)
            except OSError:
                continue
            self.cpu_first.setdefault(pid, cpu if first else 0.0)
            self.cpu_last[pid] = cpu

    def loop(self):
        with self.b.connect() as c:
            while not self.stopping.is_set():
                t = time.monotonic()
                lag_bytes, now_ms, last_ms = c.execute(
                    "SELECT (s->'slot'->>'lag_bytes')::bigint, extract(epoch FROM clock_timestamp())::float8 * 1000, "
                    "(s->>'last_commit_ts')::float8 FROM changerelay.status() s").fetchone()
                self.lag.append((t, lag_bytes, now_ms, last_ms))
                self.scan()
                self.stopping.wait(max(0.0, 0.1 - (time.monotonic() - t)))

    def start(self):
        self.scan(first=True)
        self.started_ms = time.time() * 1000
        self.thread.start()

    def stop(self, first_commit=None):
        """Lag in seconds is now - the last applied commit's time once a commit of this window was applied;
        before that, the time since the window's first commit (`first_commit`, monotonic) if it was made."""
        self.stopping.set()
        self.thread.join(10)
        self.scan()
        lag_b = [x[1] for x in self.lag if x[1] is not None]
        lag_s = []
        for t, _, now_ms, last_ms in self.lag:
            if last_ms is not None and last_ms >= self.started_ms:
                lag_s.append(max(0.0, (now_ms - last_ms) / 1000))
            elif first_commit is not None and t > first_commit:
                lag_s.append(t - first_commit)
        return {"samples": len(self.lag), "max_bytes": max(lag_b, default=None), "p99_bytes": common.pct(lag_b, 99),
                "max_s": max(lag_s, default=None), "p99_s": common.pct(lag_s, 99), "p50_s": common.pct(lag_s, 50)}

    def postgres_other_cpu(self):
        return sum(self.cpu_last[p] - self.cpu_first.get(p, 0.0) for p in self.cpu_last)


def own_cpu():
    t = os.times()
    return t.user + t.system


class CpuWindow:
    """CPU of the worker's threads, of client processes and of this process, and the machine's, from now to
    end(); all in cores (CPU seconds / wall seconds)."""

    def __init__(self, worker, procs):
        self.worker, self.procs = worker, procs  # procs: {name: [pid, ...]}
        self.t0 = time.monotonic()
        self.worker0 = common.thread_cpu_seconds(worker)
        self.sched0 = self.sched()
        self.procs0 = {p: common.cpu_seconds(p) for pids in procs.values() for p in pids}
        self.own0, self.machine0 = own_cpu(), common.machine_busy_seconds()

    def sched(self):
        """{what: (ran_s, waited_s)} for the worker's main and endpoint threads and each client process."""
        out = {}
        for name, v in common.thread_schedstat(self.worker).items():
            key = "worker_main" if name == "main" else "worker_endpoint" if name.startswith("changerelay") else None
            if key:
                out[key] = v
        for name, pids in self.procs.items():
            for p in pids:
                try:
                    r = [sum(x) for x in zip(*common.thread_schedstat(p).values())]
                except OSError:
                    continue
                out[f"{name}:{p}"] = tuple(r) if r else (0.0, 0.0)
        return out

    def end(self, sampler):
        wall = time.monotonic() - self.t0
        s1 = self.sched()
        sched = {}
        for k, (ran, waited) in s1.items():
            r0, w0 = self.sched0.get(k, (0.0, 0.0))
            name = k.split(":")[0]
            n = sched.setdefault(name, {"ran": 0.0, "waited": 0.0, "processes": 0})
            n["ran"] += (ran - r0) / wall
            n["waited"] += (waited - w0) / wall
            n["processes"] += 1
        w = common.thread_cpu_seconds(self.worker)
        dw = {k: v - self.worker0.get(k, 0.0) for k, v in w.items()}
        main = dw.pop("main", 0.0)
        endpoint = sum(v for k, v in dw.items() if k.startswith("changerelay"))
        out = {"window_s": wall, "worker_main": main / wall, "worker_endpoint": endpoint / wall,
               "worker_other_threads": (sum(dw.values()) - endpoint) / wall}
        out["worker_total"] = out["worker_main"] + out["worker_endpoint"] + out["worker_other_threads"]
        for name, pids in self.procs.items():
            s = 0.0
            for p in pids:
                try:
                    s += common.cpu_seconds(p) - self.procs0[p]
                except OSError:
                    pass
            out[name] = s / wall
        out["postgres_other"] = sampler.postgres_other_cpu() / wall
        out["bench_process"] = (own_cpu() - self.own0) / wall
        out["machine"] = (common.machine_busy_seconds() - self.machine0) / wall
        known = out["worker_total"] + out["postgres_other"] + out["bench_process"] + sum(
            out[n] for n in self.procs)
        out["unaccounted"] = max(0.0, out["machine"] - known)
        out["cores"] = os.cpu_count()
        # Per thread or process: fraction of the window it ran, and waited runnable for a core (saturated
        # when ran + waited per process is close to 1).
        out["sched"] = sched
        return out


def listen_drops():
    """The kernel's TcpExt ListenOverflows and ListenDrops (machine-wide): SYNs or completed handshakes dropped
    because a listener's accept queue was full; such a client retries its SYN after 1 s."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    row = dict(zip(lines[0][1:], (int(x) for x in lines[1][1:])))
    return {k: row.get(k, 0) for k in ("ListenOverflows", "ListenDrops")}


def listen_backlog(port):
    """The endpoint's listen backlog (ss's Send-Q of the listening socket on 127.0.0.1:port), or None."""
    import subprocess
    try:
        out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 4 and f[3] == f"127.0.0.1:{port}":
            return int(f[2])
    return None


def history_page_ms(b, oldest, repeat=5):
    """How long this build takes to read one 1,000-row history page from the oldest cursor in SQL
    (changerelay.changes(), as the worker's answer to a history request does), median of `repeat`."""
    times = []
    with b.connect() as c:
        for _ in range(repeat):
            t = time.monotonic()
            c.execute("SELECT count(*), sum(length(new::text)) FROM changerelay.changes(%s, ARRAY[%s], 1000)",
                      (oldest, HIST)).fetchone()
            times.append((time.monotonic() - t) * 1000)
    return common.pct(times, 50)


def metrics(b, tries=5):
    """The endpoint's /metrics as {name or name{labels}: value}; None when it could not be read."""
    for _ in range(tries):
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{b.ws_port}/metrics", timeout=5).read().decode()
            return {m.group(1): float(m.group(2))
                    for m in re.finditer(r"^(changerelay_\S+) (\S+)$", text, re.M)}
        except OSError:
            time.sleep(0.2)
    return None


def metrics_delta(before, after):
    if before is None or after is None:
        return None
    keep = ("catch_ups_total", "messages_sent_total", "channel_gaps_total", "refusals_total", "auth_failures")
    return {k.replace("changerelay_endpoint_", ""): after[k] - before.get(k, 0.0) for k in after
            if any(x in k for x in keep) and after[k] - before.get(k, 0.0)}


def metric_gauges(m):
    if m is None:
        return None
    return {k.replace("changerelay_endpoint_", ""): v for k, v in m.items()
            if k.endswith(("_clients", "requests_in_flight", "requests_queued"))}


# --- client processes ---------------------------------------------------------------------------------------

def live_process(ws_port, token, label, ready, done, results):
    """One subscriber of `label` (changes from now); connects with retries (it may have to get in under a flood
    of idle connections), then records (row value, arrival time) of every change until `done` and 1.5 s quiet."""
    import websockets

    async def main():
        uri = f"ws://127.0.0.1:{ws_port}/ws?token={token}"
        attempts, errors, t0 = 0, [], time.monotonic()
        ws = None
        while ws is None and time.monotonic() - t0 < 60:
            attempts += 1
            try:
                ws = await websockets.connect(uri, max_queue=None, open_timeout=10, ping_interval=None,
                                              compression=None)
                await ws.send(json.dumps({"op": "subscribe", "labels": [label], "since": None, "versions": False,
                                          "changes": True}))
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if m.get("type") != "subscribed":
                    raise RuntimeError(f"subscribe answered {m}")
            except Exception as e:  # noqa: BLE001 (recorded; the subscriber tries again)
                errors.append(f"{type(e).__name__}: {e}"[:200])
                ws = None
                await asyncio.sleep(0.05)
        out = {"connect_attempts": attempts, "connect_s": time.monotonic() - t0, "errors": errors[:5],
               "arrivals": [], "closed": None}
        ready.set()
        if ws is None:
            return out
        heard = time.monotonic()
        while True:
            try:
                msg = await asyncio.wait_for(ws.recv(), 0.5)
            except asyncio.TimeoutError:
                if done.is_set() and time.monotonic() - heard > 1.5:
                    break
                continue
            except websockets.ConnectionClosed as e:
                out["closed"] = str(e)[:200]
                break
            now = heard = time.monotonic()
            m = json.loads(msg)
            if m.get("type") == "change":
                out["arrivals"].append((m["new"]["n"], now))
        await ws.close()
        return out

    results.put(asyncio.run(main()))


def abuser_process(k, first, count, ws_port, token, oldest, stop, counters, results):
    """`count` clients that re-subscribe from the oldest cursor in a loop (see the module's doc); counts go to
    counters[k * 5 ...] (ABUSER_FIELDS) as they happen; at the end, the wait from each subscribe to its first
    change and to its 1,500th, and the first errors."""
    import websockets
    base = k * len(ABUSER_FIELDS)
    waits, reads, notes = [], [], []
    sub = json.dumps({"op": "subscribe", "labels": [HIST], "since": oldest, "versions": False, "changes": True})
    uri = f"ws://127.0.0.1:{ws_port}/ws?token={token}"

    def note(x):
        if len(notes) < 5:
            notes.append(x[:200])

    async def client(g):
        addr = ABUSER_ADDRESSES[g * len(ABUSER_ADDRESSES) // ABUSERS]
        while True:
            ws = None
            try:
                ws = await websockets.connect(uri, max_queue=None, open_timeout=30, ping_interval=None,
                                              compression=None, close_timeout=1, local_addr=(addr, 0))
                counters[base] += 1
                for j in range(SUBSCRIBES_PER_CONNECTION):
                    t0, n = time.monotonic(), 0
                    await ws.send(sub)
                    counters[base + 1] += 1
                    while n < READ_PER_SUBSCRIPTION:
                        msg = await ws.recv()
                        if msg.startswith('{"type":"change"'):
                            n += 1
                            counters[base + 2] += 1
                            if n == 1 and j == 0:  # later ones may get what is left of the last page
                                waits.append(time.monotonic() - t0)
                        elif msg.startswith('{"type":"error"'):
                            counters[base + 3] += 1
                            note(msg)
                        elif msg.startswith('{"type":"resync"'):
                            counters[base + 4] += 1
                            note(msg)
                            break
                    reads.append(time.monotonic() - t0)
                await ws.close()
            except asyncio.CancelledError:
                if ws is not None:
                    ws.transport.abort()
                raise
            except Exception as e:  # noqa: BLE001 (counted; the client goes on)
                counters[base + 3] += 1
                note(f"{type(e).__name__}: {e}")
                if ws is not None:
                    ws.transport.abort()
                await asyncio.sleep(0.2)

    async def main():
        tasks = [asyncio.create_task(client(first + i)) for i in range(count)]
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    results.put({"first_change_s": waits, "read_s": reads, "notes": notes})


def flood_process(ws_port, addresses, per_address, reopen, stop, counters, results):
    """`per_address` idle TCP connections from each source address, that never send anything. reopen None:
    each is opened once; else every connection the server closes (or answers, e.g. 429) is opened again
    `reopen` seconds later."""
    need = len(addresses) * per_address + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else min(need, hard), hard))

    async def slot(addr):
        loop = asyncio.get_running_loop()
        while True:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                s.bind((addr, 0))
                await loop.sock_connect(s, ("127.0.0.1", ws_port))
            except OSError:
                counters[4] += 1
                s.close()
                await asyncio.sleep(0.05)
                continue
            counters[0] += 1
            try:
                data = await loop.sock_recv(s, 4096)
                counters[2 if data else 1] += 1
            except OSError:
                counters[3] += 1
            finally:
                s.close()
            if reopen is None:
                await asyncio.Event().wait()  # until cancelled
            if reopen:
                await asyncio.sleep(reopen)

    async def main():
        tasks = [asyncio.create_task(slot(a)) for a in addresses for _ in range(per_address)]
        while not stop.is_set():
            await asyncio.sleep(0.1)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    results.put(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


# --- windows ------------------------------------------------------------------------------------------------

CTX = mp.get_context("fork")


def measure_live(b, token, seconds, procs=None, at_start=None, at_end=None):
    """One live subscriber of LIVE (its own process) while the writer commits RATE commits/s for `seconds`;
    lag, CPU and endpoint counters over the writer's window."""
    ready, done, results = CTX.Event(), CTX.Event(), CTX.Queue()
    p = CTX.Process(daemon=True, target=live_process, args=(b.ws_port, token, LIVE, ready, done, results))
    p.start()
    ready.wait(90)
    # changerelay.watch() in a loop (wl_latency's receiver): the same commits without the endpoint, so that
    # WebSocket latency splits into the worker's part (commit -> applied and woken) and the endpoint's.
    w_ready, w_results = CTX.Event(), CTX.Queue()
    wp = CTX.Process(daemon=True, target=wl_latency.watch_receiver, args=(b.dsn, LIVE, w_ready, done, w_results))
    wp.start()
    w_ready.wait(60)
    try:
        worker = common.worker_pid(b)
        sampler = Sampler(b, worker)
        m0 = metrics(b)
        extra = at_start() if at_start else None
        sampler.start()
        cpu = CpuWindow(worker, {"live_subscriber": [p.pid], "watch_receiver": [wp.pid], **(procs or {})})
        committed, achieved = common.write_at_rate(b, LIVE, RATE, seconds)
        cpu_out = cpu.end(sampler)
        lag = sampler.stop(min(committed.values(), default=None))
        extra_end = at_end(extra) if at_end else None
        m1 = metrics(b)
    finally:
        done.set()
    sub = results.get(timeout=120)
    watched = w_results.get(timeout=120)
    p.join(30)
    wp.join(30)
    arrivals = sub.pop("arrivals")
    lat = common.latencies(committed, arrivals)
    wlat = common.latencies(committed, watched)
    out = {"commits": len(committed), "achieved_rate": achieved, "delivered": len(lat),
           "latency": common.summary(lat), "latency_trend": trend(committed, arrivals),
           "watch_latency": common.summary(wlat), "lag": lag, "cpu": cpu_out, "subscriber": sub,
           "endpoint_counters": metrics_delta(m0, m1), "endpoint_gauges_at_end": metric_gauges(m1)}
    return out, extra_end


def trend(committed, arrivals):
    """p50 latency (ms) of the commits of the window's first and last quarter: a last quarter much later than
    the first means a queue that grew during the window (arrivals slower than commits), not a steady delay."""
    t = sorted(committed.values())
    if len(t) < 8:
        return None
    q1, q3 = t[len(t) // 4], t[3 * len(t) // 4]
    first = common.latencies({v: c for v, c in committed.items() if c <= q1}, arrivals)
    last = common.latencies({v: c for v, c in committed.items() if c >= q3}, arrivals)
    return {"first_quarter_p50_ms": common.pct(first, 50), "last_quarter_p50_ms": common.pct(last, 50)}


def fmt_live(name, r):
    l, lag, c = r["latency"], r["lag"], r["cpu"]
    return (f"  {name:28} p50 {common.ms(l['p50_ms'])} p95 {common.ms(l['p95_ms'])} p99 {common.ms(l['p99_ms'])} "
            f"max {common.ms(l['max_ms'])} ms (first/last quarter p50 "
            f"{common.ms((r['latency_trend'] or {}).get('first_quarter_p50_ms'))}/"
            f"{common.ms((r['latency_trend'] or {}).get('last_quarter_p50_ms'))}; "
            f"watch() p50 {common.ms(r['watch_latency']['p50_ms'])} p99 "
            f"{common.ms(r['watch_latency']['p99_ms'])}), {r['delivered']}/{r['commits']} delivered, lag max "
            f"{common.ms(lag['max_s'])} s / {lag['max_bytes']} B; CPU worker main {sched(c, 'worker_main')}, "
            f"endpoint {sched(c, 'worker_endpoint')}, machine {c['machine']:.2f} of {c['cores']} cores")


def sched(cpu, name):
    """'ran/waited' cores of a thread or process group."""
    s = cpu["sched"].get(name)
    return "n/a" if s is None else f"{s['ran']:.2f}/{s['waited']:.2f} waited"


def resubscribe_phase(b, tok_hist, tok_live, oldest, seconds):
    counters = CTX.Array("q", ABUSER_PROCS * len(ABUSER_FIELDS), lock=False)
    stop, results = CTX.Event(), CTX.Queue()
    counts = [ABUSERS // ABUSER_PROCS + (1 if i < ABUSERS % ABUSER_PROCS else 0) for i in range(ABUSER_PROCS)]
    ps = [CTX.Process(daemon=True, target=abuser_process,
                      args=(k, sum(counts[:k]), n, b.ws_port, tok_hist, oldest, stop, counters, results))
          for k, n in enumerate(counts)]
    for p in ps:
        p.start()

    def totals():
        n = len(ABUSER_FIELDS)
        return {f: sum(counters[k * n + i] for k in range(ABUSER_PROCS)) for i, f in enumerate(ABUSER_FIELDS)}

    t0 = time.monotonic()
    while totals()["subscribes"] < ABUSERS and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    ramp = time.monotonic() - t0
    time.sleep(1.0)  # every client in its loop

    def at_start():
        return totals(), time.monotonic()

    def at_end(start):
        (c0, t), c1 = start, totals()
        wall = time.monotonic() - t
        d = {f: c1[f] - c0[f] for f in ABUSER_FIELDS}
        return {**d, "window_s": wall, "reconnects_per_s": d["connects"] / wall,
                "subscribes_per_s": d["subscribes"] / wall, "changes_per_s": d["changes"] / wall}

    try:
        live, window = measure_live(b, tok_live, seconds, procs={"abusers": [p.pid for p in ps]},
                                    at_start=at_start, at_end=at_end)
    finally:
        stop.set()
        got = [results.get(timeout=60) for _ in ps]
        for p in ps:
            p.join(30)
    first = [x for g in got for x in g["first_change_s"]]
    reads = [x for g in got for x in g["read_s"]]
    live["abusers"] = {"clients": ABUSERS, "processes": ABUSER_PROCS, "ramp_s": ramp, "window": window,
                       "whole_run": totals(),
                       "first_change_ms": {"n": len(first), "p50": (common.pct(first, 50) or 0) * 1000,
                                           "p99": (common.pct(first, 99) or 0) * 1000},
                       f"read_{READ_PER_SUBSCRIPTION}_ms": {"n": len(reads), "p50": (common.pct(reads, 50) or 0) * 1000,
                                                            "p99": (common.pct(reads, 99) or 0) * 1000},
                       "notes": [n for g in got for n in g["notes"]][:5]}
    return live


def versions_requests(b, token, n, deadline_s):
    """n authenticated GET /versions/LIVE, each on a new connection, 20 ms apart; a dropped connection is
    retried at once (up to 10 attempts), and the latency runs to the answer."""
    lat, retries, errors = [], 0, {}
    deadline = time.monotonic() + deadline_s
    for _ in range(n):
        t0 = time.monotonic()
        for _attempt in range(10):
            if time.monotonic() > deadline:
                break
            try:
                c = http.client.HTTPConnection("127.0.0.1", b.ws_port, timeout=5)
                c.request("GET", f"/versions/{LIVE}", headers={"Authorization": f"Bearer {token}"})
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    lat.append((time.monotonic() - t0) * 1000)
                    break
                key = f"HTTP {r.status}"
            except (OSError, http.client.HTTPException) as e:
                key = type(e).__name__
            errors[key] = errors.get(key, 0) + 1
            retries += 1
        time.sleep(0.02)
    return {"requests": n, "served": len(lat), "unserved": n - len(lat), "retries": retries, "errors": errors,
            "p50_ms": common.pct(lat, 50), "p99_ms": common.pct(lat, 99), "max_ms": max(lat, default=None)}


def idle_phase(b, tok_live, mode, seconds, requests):
    """mode: one of IDLE_MODES."""
    reopen = IDLE_MODES[mode]
    out = {"mode": mode, "reopen_after_s": reopen}
    ps, stop, counters, results = [], CTX.Event(), CTX.Array("q", len(FLOOD_FIELDS), lock=False), CTX.Queue()
    m0 = metrics(b)
    if mode != "none":
        addrs = [f"127.0.0.{i}" for i in range(2, 2 + IDLE_ADDRESSES)]
        ps = [CTX.Process(daemon=True, target=flood_process, args=(b.ws_port, addrs, IDLE_CONNECTIONS // IDLE_ADDRESSES,
                                                      reopen, stop, counters, results))]
        ps[0].start()
        t0 = time.monotonic()
        while counters[0] < IDLE_CONNECTIONS and time.monotonic() - t0 < 15:
            time.sleep(0.05)
        out["flood_ramp_s"] = time.monotonic() - t0
        time.sleep(0.5)
    f0 = list(counters)
    t0 = time.monotonic()
    drops0 = listen_drops()
    gauges = []

    def watch_gauges():  # the server's count of open and unauthenticated connections, every second
        while not stop.wait(1.0):
            g = metric_gauges(metrics(b, tries=1))
            if g:
                gauges.append(g)
    watcher = threading.Thread(target=watch_gauges, daemon=True)
    watcher.start()
    try:
        worker = common.worker_pid(b)
        sampler = Sampler(b, worker)
        sampler.start()
        cpu = CpuWindow(worker, {"flood": [p.pid for p in ps]})
        out["versions"] = versions_requests(b, tok_live, requests, deadline_s=max(seconds * 2, 10))
        out["versions"]["cpu"] = cpu.end(sampler)
        out["versions"]["lag"] = sampler.stop()
        out["live"], _ = measure_live(b, tok_live, seconds, procs={"flood": [p.pid for p in ps]})
    finally:
        wall = time.monotonic() - t0
        f1 = list(counters)
        drops1 = listen_drops()
        out["listen_drops"] = {k: drops1[k] - drops0[k] for k in drops0}
        stop.set()
        watcher.join(5)
        if ps:
            out["flood_nofile"] = results.get(timeout=60)
        for p in ps:
            p.join(30)
    out["endpoint_counters"] = metrics_delta(m0, metrics(b))
    out["server_gauges_max"] = {k: max(g.get(k, 0) for g in gauges) for k in (gauges[0] if gauges else {})}
    out["gauge_samples"] = len(gauges)
    if mode != "none":
        d = {f: f1[i] - f0[i] for i, f in enumerate(FLOOD_FIELDS)}
        closed = d["closed_by_server"] + d["answered"] + d["reset"]
        out["flood"] = {"connections": IDLE_CONNECTIONS, "addresses": IDLE_ADDRESSES, "window_s": wall, **d,
                        "connects_per_s": d["connects"] / wall,
                        "open_at_end_client_view": f1[0] - f1[1] - f1[2] - f1[3], "closed_per_s": closed / wall}
    return out


# --- the workload ---------------------------------------------------------------------------------------------

def run(b):
    rows = 20_000 if b.quick else 100_000
    seconds = 5 if b.quick else 20
    idle_seconds = 4 if b.quick else 10
    with b.connect() as c:
        common.make_table(c, LIVE, 8)
        common.track(c, LIVE, LIVE)
        common.make_table(c, HIST, 0)
        common.track(c, HIST, HIST)
        for start in range(1, rows + 1, 1000):  # the history: 1,000-row transactions
            c.execute(f"INSERT INTO {HIST} (id) SELECT generate_series(%s::int, %s::int)",
                      (start, min(rows, start + 999)))
    t0 = time.monotonic()
    with b.connect() as c:
        while not c.execute("SELECT changerelay.version(%s, %s)", (HIST, str(rows))).fetchone()[0]:
            if time.monotonic() - t0 > 300:
                raise RuntimeError("the history was not applied within 300 s")
            time.sleep(0.2)
        oldest = c.execute("SELECT cursor FROM changerelay.changes(NULL, ARRAY[%s], 1)", (HIST,)).fetchone()[0]
    history_apply_s = time.monotonic() - t0
    common.wait_worker_idle(b)
    # Planned on the statistics of before the history was written, a page from the oldest cursor reads every
    # row of the label after it (bitmap scan on history_label, top-N sort) instead of 1,000 in key order; the
    # windows measure the analyzed state (autovacuum gets there on its own within a minute or so).
    page_stale_ms = history_page_ms(b, oldest)
    b.sql("ANALYZE changerelay.history")
    page_ms = history_page_ms(b, oldest)
    tok_hist, tok_live = common.make_token(b, HIST), common.make_token(b, LIVE)
    print(f"  history of {rows:,} rows applied {history_apply_s:.1f} s after the last commit; one 1,000-row page "
          f"from the oldest cursor takes {page_ms:.1f} ms in SQL ({page_stale_ms:.1f} ms before ANALYZE)", flush=True)

    base, _ = measure_live(b, tok_live, seconds)
    print(fmt_live("live, alone", base), flush=True)
    common.wait_worker_idle(b)
    hostile = resubscribe_phase(b, tok_hist, tok_live, oldest, seconds)
    print(fmt_live(f"live, {ABUSERS} re-subscribing", hostile), flush=True)
    a, c = hostile["abusers"]["window"], hostile["cpu"]
    print(f"  abusive clients: {a['connects']} connects ({a['reconnects_per_s']:.1f}/s), {a['subscribes']} subscribes, "
          f"{a['changes']:,} changes ({a['changes_per_s']:,.0f}/s), {a['errors']} errors; first change after "
          f"p50 {hostile['abusers']['first_change_ms']['p50']:.0f} ms; CPU abusers {c['abusers']:.2f}, live "
          f"{c['live_subscriber']:.2f}, writer {c['bench_process']:.2f}, postgres other {c['postgres_other']:.2f}, "
          f"unaccounted {c['unaccounted']:.2f} cores", flush=True)
    lb, lh = base["latency"], hostile["latency"]
    resub = {"abusive_clients": ABUSERS, "client_processes": ABUSER_PROCS,
             "read_per_subscription": READ_PER_SUBSCRIPTION,
             "subscribes_per_connection": SUBSCRIBES_PER_CONNECTION, "baseline": base, "hostile": hostile,
             "p50_ratio": lh["p50_ms"] / lb["p50_ms"] if lh["p50_ms"] and lb["p50_ms"] else None,
             "p99_ratio": lh["p99_ms"] / lb["p99_ms"] if lh["p99_ms"] and lb["p99_ms"] else None,
             "p99_target_ms": P99_TARGET_MS, "lag_target_s": LAG_TARGET_S,
             "p99_met": lh["p99_ms"] is not None and lh["p99_ms"] < P99_TARGET_MS,
             "lag_met": hostile["lag"]["max_s"] is not None and hostile["lag"]["max_s"] < LAG_TARGET_S}

    backlog = listen_backlog(b.ws_port)
    idle = []
    for mode in IDLE_MODES:
        common.wait_worker_idle(b)
        r = idle_phase(b, tok_live, mode, idle_seconds, VERSION_REQUESTS)
        idle.append(r)
        v = r["versions"]
        fl = r.get("flood")
        print(f"  idle connections {r['mode']:9}: /versions {v['served']}/{v['requests']} served, p50 "
              f"{common.ms(v['p50_ms'])} p99 {common.ms(v['p99_ms'])} ms, {v['retries']} retries; subscriber in after "
              f"{r['live']['subscriber']['connect_attempts']} attempt(s)"
              + (f"; flood {fl['connects']} connects ({fl['connects_per_s']:.0f}/s), server max "
                 f"{r['server_gauges_max'].get('clients', 'n/a')} open / "
                 f"{r['server_gauges_max'].get('unauthenticated_clients', 'n/a')} unauthenticated, flood CPU "
                 f"{r['live']['cpu']['flood']:.2f} cores, kernel listen overflows "
                 f"{r['listen_drops']['ListenOverflows']} (backlog {backlog})" if fl else ""), flush=True)
        print(fmt_live(f"live, idle {r['mode']}", r["live"]), flush=True)
    none = idle[0]
    for r in idle[1:]:
        for key, x, y in (("versions_p99_ratio", r["versions"]["p99_ms"], none["versions"]["p99_ms"]),
                          ("versions_p50_ratio", r["versions"]["p50_ms"], none["versions"]["p50_ms"]),
                          ("live_p99_ratio", r["live"]["latency"]["p99_ms"], none["live"]["latency"]["p99_ms"]),
                          ("live_p50_ratio", r["live"]["latency"]["p50_ms"], none["live"]["latency"]["p50_ms"])):
            r[key] = x / y if x and y else None
    served = all(r["versions"]["unserved"] == 0 and r["live"]["delivered"] == r["live"]["commits"] for r in idle[1:])

    with b.connect() as c:
        for label in (HIST, LIVE):
            c.execute("SELECT changerelay.revoke_token(%s)", (label,))
            c.execute("SELECT changerelay.untrack(%s)", (label,))
            c.execute(f"DROP TABLE {label}")
    return {"rate": RATE, "history_rows": rows, "history_apply_s": history_apply_s, "history_page_ms": page_ms,
            "history_page_ms_before_analyze": page_stale_ms,
            "listen_backlog": backlog, "seconds_per_window": seconds,
            "idle_seconds_per_window": idle_seconds, "resubscribe": resub,
            "idle_connections": {"connections": IDLE_CONNECTIONS, "addresses": IDLE_ADDRESSES,
                                 "version_requests": VERSION_REQUESTS, "runs": idle, "all_served": served}}
