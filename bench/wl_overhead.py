"""Write overhead: pgbench single-row UPDATEs of a random id among 10,000 rows, on three tables:

* plain: no change capture (baseline);
* changerelay: tracked by pg_changerelay (the relay worker decodes it and writes history and versions);
* trigger_notify: the row trigger with nextval() + pg_notify(), a LISTENing client draining the notifications.

TPS per configuration and client count (median of the rounds), the ratio to the baseline, the relay worker's CPU
during the run, the WAL it had still to decode when pgbench ended and how long it took to catch up.
"""
import common
import wl_latency

CONFIGS = [("plain", "ovh_plain"), ("changerelay", "ovh_tracked"), ("trigger_notify", "ovh_notify")]
ROWS = 10_000


def script(table):
    return f"\\set id random(1, {ROWS})\nUPDATE {table} SET n = n + 1 WHERE id = :id;\n"


def one_run(b, pid, config, table, clients, seconds):
    b.sql("CHECKPOINT")
    common.wait_worker_idle(b)
    cpu0 = common.cpu_seconds(pid)

    def bench():
        return common.pgbench(b, script(table), clients, seconds)
    notified = None
    if config == "trigger_notify":  # a LISTENing client drains the queue (bench/wl_latency.py's receiver)
        tps, arrivals = wl_latency.run_with_process(b, wl_latency.listen_receiver, "changes", bench)
        notified = len(arrivals)
    else:
        tps = bench()
    worker_cpu = (common.cpu_seconds(pid) - cpu0) / seconds
    lag = b.one("SELECT (changerelay.status()->'slot'->>'lag_bytes')::bigint")
    catch_up = common.wait_worker_idle(b)
    print(f"  overhead {config:15} {clients} clients: {tps:9.0f} tps, worker CPU {worker_cpu:.2f} cores, "
          f"lag at end {lag} bytes, caught up in {common.ms(catch_up)} s", flush=True)
    return {"tps": tps, "worker_cpu_cores": worker_cpu, "worker_lag_bytes_at_end": lag, "worker_catch_up_s": catch_up,
            "notifications_received": notified}


def run(b):
    """Rounds of (1 and 8 clients) x (every configuration), interleaved; per point the median TPS."""
    seconds, rounds = (5, 1) if b.quick else (20, 3)
    with b.connect() as c:
        for _, table in CONFIGS:
            common.make_table(c, table, ROWS)
        common.track(c, "ovh_tracked", "ovh")
        common.add_notify_trigger(c, "ovh_notify")
        c.execute("VACUUM ANALYZE ovh_plain, ovh_tracked, ovh_notify")
    pid = common.worker_pid(b)
    for _, table in CONFIGS:  # warm-up (the first runs came out low); not measured
        common.pgbench(b, script(table), 8, 2)
    raw = {}
    for _ in range(rounds):
        for clients in (1, 8):
            for config, table in CONFIGS:
                raw.setdefault((config, clients), []).append(one_run(b, pid, config, table, clients, seconds))
    runs = []
    for (config, clients), rs in raw.items():
        med = sorted(rs, key=lambda r: r["tps"])[len(rs) // 2]
        runs.append({"config": config, "clients": clients, "seconds": seconds, **med,
                     "tps_rounds": [r["tps"] for r in rs],
                     # what the system sustains when the worker's catch-up after the run is counted
                     "sustained_tps": med["tps"] * seconds / (seconds + (med["worker_catch_up_s"] or 0))})
    for r in runs:
        base = next(x for x in runs if x["clients"] == r["clients"] and x["config"] == "plain")
        r["ratio_to_plain"] = r["tps"] / base["tps"]
        r["sustained_ratio_to_plain"] = r["sustained_tps"] / base["sustained_tps"]
    at8 = {r["config"]: r["tps"] for r in runs if r["clients"] == 8}
    with b.connect() as c:
        c.execute("SELECT changerelay.untrack('ovh_tracked')")
        c.execute("DROP TABLE ovh_plain, ovh_tracked, ovh_notify")
    return {"rows": ROWS, "rounds": rounds, "runs": runs,
            "changerelay_vs_trigger_8_clients": at8["changerelay"] / at8["trigger_notify"]}
