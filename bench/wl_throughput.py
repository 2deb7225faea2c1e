"""Throughput (issue 13): what tracking costs a write-heavy database, and how fast the relay worker applies.

* tpcb: pgbench's built-in TPC-B-like script (scale 1) at 8 clients, in four configurations, interleaved per round:
  untracked; the four pgbench tables tracked (history on); tracked for versions only (history => false); history
  on with changerelay.max_gather = 10 ms instead of the default 3 ms. Per
  configuration: TPS, WAL bytes per transaction (pg_current_wal_lsn() from before the run to after the worker
  caught up, so the worker's own writes count), the worker's CPU, and its largest delay during the run (sampled
  every 100 ms: now minus the commit time of the newest transaction it has applied).
* apply_large: one INSERT of many rows into a tracked table; from COMMIT returning to the last row's version
  being visible (its history row is committed with it), as changes per second.
* apply_small: the relay worker paused, a stream of small transactions (10 inserted rows each) written by pgbench;
  then the worker resumed: from resuming to the last row's version being visible, as changes per second.
"""
import os
import re
import subprocess
import threading
import time

import common

TABLES = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history"]
CONFIGS = ["untracked", "history", "versions_only", "history_gather_10ms"]
VERSION_CHECKPOINT_S = 10  # src/worker/persist.rs CHECKPOINT_EVERY


def lsn(c):
    return c.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()[0]


def set_tracking(b, config):
    """Tracks the four tables for `config`; history_gather_10ms is history with changerelay.max_gather = 10 ms
    (the WAL it saves against the latency it adds), the others run with the default."""
    with b.connect() as c:
        if config == "history_gather_10ms":
            c.execute("ALTER SYSTEM SET changerelay.max_gather = '10ms'")
        else:
            c.execute("ALTER SYSTEM RESET changerelay.max_gather")
        c.execute("SELECT pg_reload_conf()")
        for t in TABLES:
            if c.execute("SELECT count(*) FROM changerelay.tracked_tables WHERE rel = %s::regclass", (t,)).fetchone()[0]:
                c.execute("SELECT changerelay.untrack(%s)", (t,))
        if config != "untracked":
            for t in TABLES:
                c.execute("SELECT changerelay.track(%s, %s, history => %s)",
                          (t, f"tpcb_{config}_{t}", config != "versions_only"))
    common.wait_worker_idle(b)


def pgbench_builtin(b, clients, seconds):
    cmd = common.PGBENCH + ["-n", "-b", "tpcb-like", "-c", str(clients), "-j", str(min(2, clients)), "-T",
                            str(seconds), "-h", "127.0.0.1", "-p", str(b.port), "-U", "postgres", "postgres"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", out).group(1))
    txns = int(re.search(r"number of transactions actually processed: (\d+)", out).group(1))
    return tps, txns


def delay_sampler(b, stop, out):
    """Largest (now - commit time of the newest applied transaction) while pgbench runs, in seconds."""
    with b.connect() as c:
        while not stop.is_set():
            st = c.execute("SELECT changerelay.status(), (extract(epoch FROM clock_timestamp()) * 1000)::bigint"
                           ).fetchone()
            ts = st[0].get("last_commit_ts")
            if ts:
                out.append((st[1] - ts) / 1000.0)
            time.sleep(0.1)


def tpcb_run(b, pid, config, clients, seconds):
    b.sql("CHECKPOINT")
    common.wait_worker_idle(b)
    with b.connect() as c:
        before = lsn(c)
    cpu0 = common.cpu_seconds(pid)
    stop, delays = threading.Event(), []
    sampler = threading.Thread(target=delay_sampler, args=(b, stop, delays))
    sampler.start()
    try:
        tps, txns = pgbench_builtin(b, clients, seconds)
    finally:
        stop.set()
        sampler.join()
    caught_up = common.wait_worker_idle(b)
    worker_cpu = (common.cpu_seconds(pid) - cpu0) / seconds
    if config != "untracked":
        # Versions are written at checkpoints (every 10 s): wait for the next and make the worker take it, so the
        # run's WAL holds every version it moved.
        time.sleep(VERSION_CHECKPOINT_S + 1)
        b.sql("UPDATE pgbench_branches SET filler = filler WHERE bid = 1")
        common.wait_worker_idle(b)
    time.sleep(0.5)
    with b.connect() as c:
        after = lsn(c)
    # The first samples of a run come before its first commit; only a tracked run has a worker delay.
    delay = max(delays[5:], default=None) if config != "untracked" else None
    r = {"config": config, "clients": clients, "seconds": seconds, "tps": tps, "transactions": txns,
         "wal_bytes": int(after - before), "wal_per_txn": (after - before) / max(1, txns),
         "worker_cpu_cores": worker_cpu, "worker_max_delay_s": delay, "worker_catch_up_s": caught_up}
    print(f"  tpcb {config:13} {clients} clients: {tps:8.0f} tps, {r['wal_per_txn']:7.0f} WAL bytes/txn, worker CPU "
          f"{worker_cpu:.2f} cores, max delay {common.ms(delay)} s, caught up in {common.ms(caught_up)} s", flush=True)
    return r


def tpcb(b):
    seconds, rounds = (5, 1) if b.quick else (20, 3)
    subprocess.run(common.PGBENCH + ["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-p", str(b.port), "-U", "postgres",
                                     "postgres"], check=True, capture_output=True)
    b.sql("VACUUM ANALYZE")
    pid = common.worker_pid(b)
    raw = {}
    for _ in range(rounds):
        for config in CONFIGS:
            set_tracking(b, config)
            pgbench_builtin(b, 8, 2)  # warm-up, not measured
            raw.setdefault(config, []).append(tpcb_run(b, pid, config, 8, seconds))
    runs = []
    for config, rs in raw.items():
        med = sorted(rs, key=lambda r: r["tps"])[len(rs) // 2]
        runs.append({**med, "tps_rounds": [r["tps"] for r in rs],
                     "wal_per_txn_rounds": [r["wal_per_txn"] for r in rs],
                     "wal_per_txn_median": sorted(r["wal_per_txn"] for r in rs)[len(rs) // 2],
                     "worker_max_delay_s_all": max((r["worker_max_delay_s"] or 0) for r in rs)})
    base = next(r for r in runs if r["config"] == "untracked")
    for r in runs:
        r["tps_ratio"] = r["tps"] / base["tps"]
        r["wal_ratio"] = r["wal_per_txn_median"] / base["wal_per_txn_median"]
    set_tracking(b, "untracked")
    b.sql("DROP TABLE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history")
    return {"scale": 1, "rounds": rounds, "runs": runs}


def version_visible(c, label, ident, timeout=900):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.execute("SELECT changerelay.version(%s, %s)", (label, ident)).fetchone()[0]:
            return time.monotonic()
        time.sleep(0.005)
    raise RuntimeError(f"{label}/{ident} never became visible")


def apply_large(b):
    rows = 200_000 if b.quick else 1_000_000
    with b.connect() as c:
        c.execute("DROP TABLE IF EXISTS tp_large")
        c.execute("CREATE TABLE tp_large (id int PRIMARY KEY, v text)")
        common.track(c, "tp_large", "tp_large")
        common.wait_worker_idle(b)
        c.execute(f"INSERT INTO tp_large SELECT g, 'row ' || g FROM generate_series(1, {rows}) g")
        committed = time.monotonic()
        visible = version_visible(c, "tp_large", str(rows))
        stored = c.execute("SELECT sum(changes) FROM changerelay.history WHERE label = 'tp_large'").fetchone()[0]
        c.execute("SELECT changerelay.untrack('tp_large')")
        c.execute("DROP TABLE tp_large")
    r = {"rows": rows, "seconds": visible - committed, "changes_per_s": rows / (visible - committed),
         "history_changes": stored}
    print(f"  apply, one transaction of {rows:,} rows: {r['seconds']:.2f} s = {r['changes_per_s']:,.0f} changes/s",
          flush=True)
    return r


def apply_small(b):
    txns = 20_000 if b.quick else 60_000
    per_txn = 10
    with b.connect() as c:
        c.execute("DROP TABLE IF EXISTS tp_small")
        c.execute("CREATE TABLE tp_small (id bigint PRIMARY KEY, v text)")
        common.track(c, "tp_small", "tp_small")
        common.wait_worker_idle(b)
        c.execute("ALTER SYSTEM SET changerelay.enabled = off")
        c.execute("SELECT pg_reload_conf()")
        common_wait_state(c, "disabled")
    clients = 4
    script = (f"\\set n random(1, 1000000000)\nINSERT INTO tp_small SELECT :client_id::bigint * 10000000000 + "
              f":n::bigint * 10 + g, 'x' FROM generate_series(0, {per_txn - 1}) g ON CONFLICT DO NOTHING;\n")
    path = f"/tmp/pgcr_tp_small_{os.getpid()}.sql"
    with open(path, "w") as f:
        f.write(script)
    subprocess.run(common.PGBENCH + ["-n", "-f", path, "-c", str(clients), "-j", "2", "-t", str(txns // clients),
                                     "-h", "127.0.0.1", "-p", str(b.port), "-U", "postgres", "postgres"],
                   check=True, capture_output=True)
    os.unlink(path)
    with b.connect() as c:
        c.execute("INSERT INTO tp_small VALUES (-1, 'last')")
        changes = c.execute("SELECT count(*) FROM tp_small").fetchone()[0]
        c.execute("ALTER SYSTEM RESET changerelay.enabled")
        resumed = time.monotonic()
        c.execute("SELECT pg_reload_conf()")
        visible = version_visible(c, "tp_small", "-1")
        c.execute("SELECT changerelay.untrack('tp_small')")
        c.execute("DROP TABLE tp_small")
    r = {"transactions": txns + 1, "changes": changes, "seconds": visible - resumed,
         "changes_per_s": changes / (visible - resumed)}
    print(f"  apply, {r['transactions']:,} small transactions ({changes:,} changes): {r['seconds']:.2f} s = "
          f"{r['changes_per_s']:,.0f} changes/s", flush=True)
    return r


def common_wait_state(c, state, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.execute("SELECT changerelay.status()->'worker'->>'state'").fetchone()[0] == state:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the worker never became {state}")


def run(b):
    out = {"apply_large": apply_large(b)}
    common.settle(b)
    out["apply_small"] = apply_small(b)
    common.settle(b)
    out["tpcb"] = tpcb(b)
    return out
