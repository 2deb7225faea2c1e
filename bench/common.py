"""Helpers shared by the bench/wl_*.py workloads: connections, percentiles, the relay worker's process,
pgbench, and a rate-driven writer of single-row UPDATEs."""
import math
import os
import re
import subprocess
import threading
import time

import psycopg

# pgbench of the major under test (PG=15|17|18; from its root for 17 and 18, which sees /tmp).
PGBENCH = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "pgtool.sh"), "pgbench"]


class Bench:
    """Where the cluster is and how long to run; handed to every workload."""

    def __init__(self, port, quick):
        self.port, self.quick = port, quick
        self.dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        self.ws_port = port + 1000

    def connect(self):
        return psycopg.connect(self.dsn, autocommit=True)

    def sql(self, query, params=None):
        with self.connect() as c:
            cur = c.execute(query, params)
            return cur.fetchall() if cur.description else None

    def one(self, query, params=None):
        return self.sql(query, params)[0][0]


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))] if s else None


def ms(x):
    return "n/a" if x is None else f"{x:.2f}"


def summary(lat_ms):
    """p50/p95/p99/max of latencies in ms; a negative one (the receiver had it before the writer's COMMIT
    returned, as a NOTIFY can) counts as 0 and is counted in `before_commit_returned`."""
    c = [max(0.0, x) for x in lat_ms]
    return {"n": len(c), "p50_ms": pct(c, 50), "p95_ms": pct(c, 95), "p99_ms": pct(c, 99),
            "max_ms": max(c) if c else None, "before_commit_returned": sum(1 for x in lat_ms if x < 0)}


# --- the relay worker process ---------------------------------------------------------------------------

def worker_pid(b):
    rows = b.sql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_changerelay relay'")
    return rows[0][0] if rows else None


def rss_kb(pid, field="VmRSS"):
    """VmRSS (all resident pages, shared buffers the process touched included) or RssAnon (private memory)."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def cpu_seconds(pid):
    """User + system CPU of a process so far (all its threads, the endpoint's included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu_seconds(pid):
    """User + system CPU of each thread of a process, summed by thread name (the main thread is "main"); a
    thread that is gone counts nothing."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, rest = f.read().rsplit(")", 1)
        except OSError:
            continue
        name = "main" if tid == str(pid) else head.split("(", 1)[1]
        fields = rest.split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_schedstat(pid):
    """Seconds each thread of a process ran and waited runnable for a CPU (/proc/.../schedstat), summed by
    thread name as thread_cpu_seconds does: {name: (ran_s, waited_s)}. A thread whose ran + waited is close to
    the wall time never slept: it was saturated, and its wait is the time it was denied a core."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head = f.read().rsplit(")", 1)[0]
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ran, waited = (int(x) / 1e9 for x in f.read().split()[:2])
        except OSError:
            continue
        name = "main" if tid == str(pid) else head.split("(", 1)[1]
        r0, w0 = out.get(name, (0.0, 0.0))
        out[name] = (r0 + ran, w0 + waited)
    return out


def machine_busy_seconds():
    """CPU seconds the whole machine spent busy (all cores, every process, other users' included) so far."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    """CPU of this process's finished (joined) children, e.g. WebSocket client processes."""
    r = os.times()
    return r.children_user + r.children_system


def wait_worker_idle(b, timeout=300, lag_bytes=256 * 1024):
    """Waits until the relay worker has decoded (nearly) everything written; returns the seconds it took."""
    t0 = time.monotonic()
    with b.connect() as c:
        while time.monotonic() - t0 < timeout:
            st = c.execute("SELECT changerelay.status()").fetchone()[0]
            if st["worker"]["state"] == "streaming" and (st["slot"]["lag_bytes"] or 0) <= lag_bytes:
                return time.monotonic() - t0
            time.sleep(0.1)
    return None


def settle(b):
    """Between workloads: let the worker catch up, vacuum what the last one left (history included) so that
    autovacuum does not run during the next one, checkpoint."""
    wait_worker_idle(b)
    b.sql("VACUUM ANALYZE")
    b.sql("CHECKPOINT")
    wait_worker_idle(b)


def restart_worker(b, timeout=60):
    """Terminates the relay worker (the postmaster starts a fresh one 2 s later) and waits until the new one
    streams and its endpoint answers /health; returns the new pid."""
    import urllib.request
    old = worker_pid(b)
    b.sql("SELECT pg_terminate_backend(%s)", (old,))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        pid = worker_pid(b)
        if pid and pid != old and wait_worker_idle(b, timeout=deadline - time.monotonic()) is not None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{b.ws_port}/health", timeout=5)
                return pid
            except OSError:
                pass
    raise RuntimeError("the relay worker did not come back")


# --- tables -------------------------------------------------------------------------------------------------

def make_table(c, name, rows):
    c.execute(f"DROP TABLE IF EXISTS {name}")
    c.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, n bigint NOT NULL DEFAULT 0)")
    c.execute(f"INSERT INTO {name} (id) SELECT generate_series(1, %s)", (rows,))


def track(c, table, label):
    c.execute("SELECT changerelay.track(%s, %s)", (table, label))


NOTIFY_FUNCTION = """
CREATE OR REPLACE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
  PERFORM pg_notify('changes', json_build_object(
    'event_id', nextval('bench_notify_seq'), 'ts', now(), 'table', TG_TABLE_NAME, 'op', TG_OP,
    'id', r.id, 'n', r.n)::text);
  RETURN NULL;
END $$"""


def add_notify_trigger(c, table):
    """The design users run today: a row trigger numbering events with a sequence and sending pg_notify()."""
    c.execute("CREATE SEQUENCE IF NOT EXISTS bench_notify_seq")
    c.execute(NOTIFY_FUNCTION)
    c.execute(f"CREATE TRIGGER {table}_notify AFTER INSERT OR UPDATE OR DELETE ON {table} "
              f"FOR EACH ROW EXECUTE FUNCTION bench_notify()")


# --- pgbench ------------------------------------------------------------------------------------------------

def pgbench(b, script, clients, seconds, prepared=False):
    """Runs pgbench with a custom script; returns its TPS (without connection time)."""
    path = f"/tmp/pgcr_bench_{os.getpid()}_{abs(hash(script))}.sql"
    with open(path, "w") as f:
        f.write(script)
    cmd = PGBENCH + ["-n", "-f", path, "-c", str(clients), "-j", str(min(2, clients)), "-T", str(seconds),
           "-h", "127.0.0.1", "-p", str(b.port), "-U", "postgres"]
    if prepared:
        cmd += ["-M", "prepared"]
    out = subprocess.run(cmd + ["postgres"], capture_output=True, text=True, check=True).stdout
    os.unlink(path)
    return float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out).group(1))


# --- a writer at a fixed rate ---------------------------------------------------------------------------------

def write_at_rate(b, table, rate, seconds, threads=None):
    """Single-row UPDATEs `UPDATE table SET n = <value> WHERE id = <thread+1>`, one per commit (autocommit),
    `rate` commits/s over `seconds`, spread over `threads` connections (default: one per 2,500/s).
    Values are unique; returns ({value: monotonic time COMMIT returned}, achieved commits/s)."""
    threads = threads or max(1, math.ceil(rate / 2500))
    committed = {}
    start = threading.Barrier(threads + 1)
    t0 = [0.0]

    def writer(k):
        with b.connect() as w:
            interval = threads / rate
            start.wait()
            i = 0
            while True:
                due = t0[0] + i * interval
                now = time.monotonic()
                if due - t0[0] >= seconds or now - t0[0] >= seconds:
                    return
                if due > now:
                    time.sleep(due - now)
                value = i * threads + k + 1
                w.execute(f"UPDATE {table} SET n = %s WHERE id = %s", (value, k + 1))
                committed[value] = time.monotonic()
                i += 1

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    t0[0] = time.monotonic() + 0.05
    start.wait()
    for t in ts:
        t.join()
    return committed, len(committed) / seconds


def latencies(committed, arrivals, first_only=True):
    """Matches (value, arrival time) pairs to commit times; returns latencies in ms (by default of the first
    arrival of each value only; first_only=False keeps every arrival, for several subscribers)."""
    seen, out = set(), []
    for value, at in arrivals:
        if value in committed and not (first_only and value in seen):
            seen.add(value)
            out.append((at - committed[value]) * 1000)
    return out


# --- WebSocket subscribers (bench/ws_fanout.py's client processes) --------------------------------------------

def make_token(b, label):
    """A token for `label` (changes allowed); the worker picks new tokens up within a second."""
    with b.connect() as c:
        c.execute("SELECT changerelay.revoke_token(name) FROM changerelay.tokens() WHERE name = %s", (label,))
        token = c.execute("SELECT changerelay.create_token(%s, %s, true)", (label, [label])).fetchone()[0]
    time.sleep(1.0)
    return token


def ws_session(b, label, token, subscribers, procs, changes, write):
    """Opens `subscribers` WebSocket subscriptions to `label` in `procs` processes (ws_fanout.client_process),
    calls write() once all are subscribed, then waits for the subscribers to go quiet. Returns write()'s result
    and what the subscribers saw: messages, (value, arrival) samples, last arrival, CPU of the client processes."""
    import multiprocessing as mp

    import ws_fanout

    ctx = mp.get_context("fork")
    counts = [n for n in (subscribers // procs + (1 if i < subscribers % procs else 0) for i in range(procs)) if n]
    ready, done, results = ctx.Barrier(len(counts) + 1), ctx.Event(), ctx.Queue()
    ps = [ctx.Process(target=ws_fanout.client_process,
                      args=(i, n, b.ws_port, token, label, changes, ready, done, results))
          for i, n in enumerate(counts)]
    cpu0 = children_cpu_seconds()
    for p in ps:
        p.start()
    ready.wait(timeout=300)
    written = write()
    done.set()
    out = {"messages": 0, "arrivals": [], "last": 0.0, "finals": []}
    for _ in ps:
        got, arrivals, last, finals = results.get(timeout=900)
        out["messages"] += got
        out["arrivals"] += arrivals
        out["last"] = max(out["last"], last)
        out["finals"] += finals
    for p in ps:
        p.join(60)
    out["client_cpu_s"] = children_cpu_seconds() - cpu0
    return written, out


# --- the Rust fan-out client (bench/fanout) ---------------------------------------------------------------------

FANOUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "bench", "release",
                      "changerelay-fanout")


def build_fanout_client():
    """Builds bench/fanout (release) on the host once per run."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "changerelay-fanout"], check=True, cwd=root,
                   env={**os.environ, "CARGO_TARGET_DIR": os.path.join(root, "target", "bench")})


def rust_ws_session(b, label, token, subscribers, write, threads=2):
    """Like ws_session, with the Rust client: `subscribers` WebSocket subscriptions (changes: true) in one
    process of `threads` threads; write() once all are subscribed."""
    import json
    cpu0 = children_cpu_seconds()
    p = subprocess.Popen([FANOUT, str(b.ws_port), token, label, str(subscribers), str(threads)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line.startswith("ready"):
        p.kill()
        raise RuntimeError(f"the fan-out client did not get ready: {line!r}")
    written = write()
    p.stdin.close()
    out = json.loads(p.stdout.read().strip().splitlines()[-1])
    p.wait(120)
    out["client_cpu_s"] = children_cpu_seconds() - cpu0
    out["arrivals"] = [tuple(a) for a in out["arrivals"]]
    return written, out
