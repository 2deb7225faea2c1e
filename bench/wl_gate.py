"""The cost of waiting for standbys (README: High availability): commit -> WebSocket latency at a fixed commit
rate (bench/wl_latency.py's websocket receiver) with the bench cluster as a primary

* alone (no standby slots: the relay confirms and publishes at once);
* with an asynchronous streaming standby, publish gate on (batches wait for the standby's flush);
* the same, publish gate off (only the slot's confirmation waits);
* with that standby synchronous (synchronous_standby_names), gate on.

The standby is made with scripts/cluster.sh standby on the bench port + 1 and removed afterwards; the primary's
settings go back to what they were. Side by side in one run: compare ratios, not absolute numbers."""
import os
import subprocess
import time

import psycopg
import psycopg.sql

import common
import wl_latency

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "scripts", "cluster.sh")
PG = os.environ.get("PG", "15")
STANDBY_DIR = os.path.join(ROOT, "target", f"pg{PG}", "bench-standby")
SETTINGS = ("changerelay.standby_slots", "changerelay.publish_gate", "synchronous_standby_names")


def configure(b, **settings):
    with b.connect() as c:
        for name in SETTINGS:
            value = settings.get(name.split(".")[-1])
            if value is None:
                c.execute(f"ALTER SYSTEM RESET {name}")
            else:
                c.execute(psycopg.sql.SQL("ALTER SYSTEM SET {} = {}").format(psycopg.sql.SQL(name),
                                                                               psycopg.sql.Literal(value)))
        c.execute("SELECT pg_reload_conf()")
    # The worker reloads between steps; a commit makes it take a step.
    deadline = time.monotonic() + 30
    gate_wanted = settings.get("standby_slots") is not None and settings.get("publish_gate", "on") == "on"
    while time.monotonic() < deadline:
        b.sql("UPDATE lat_tracked SET n = n WHERE id = 8")
        if b.one("SELECT (changerelay.status()->'ha'->'publish_gate'->>'active')::bool") == gate_wanted:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the worker did not take the settings {settings}")


def standby_up(b, slot):
    subprocess.run([CLUSTER, "stop", STANDBY_DIR], check=False, cwd=ROOT)
    subprocess.run(["rm", "-rf", STANDBY_DIR], check=True)
    b.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (slot,))
    env = {**os.environ, "STANDBY_SLOT": slot, "EXTRA_CONF": "synchronous_standby_names = ''\n"
                                                           "changerelay.standby_slots = ''\nchangerelay.port = 0"}
    subprocess.run([CLUSTER, "standby", STANDBY_DIR, str(b.port + 1), str(b.port)], check=True, cwd=ROOT, env=env,
                   timeout=300)
    deadline = time.monotonic() + 60
    while b.one("SELECT count(*) FROM pg_stat_replication WHERE application_name = %s", (slot,)) == 0:
        if time.monotonic() > deadline:
            raise RuntimeError("the standby did not connect")
        time.sleep(0.2)


def standby_down(b, slot):
    subprocess.run([CLUSTER, "stop", STANDBY_DIR], check=False, cwd=ROOT)
    subprocess.run(["rm", "-rf", STANDBY_DIR], check=False)
    b.sql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (slot,))


def run(b):
    rate, seconds = (1000, 3) if b.quick else (1000, 10)
    slot = "bench_standby"
    with b.connect() as c:
        common.make_table(c, "lat_tracked", 8)
        common.track(c, "lat_tracked", "lat")
    token = common.make_token(b, "lat")
    configs = [
        ("no standby", {}),
        ("async standby, gate on", {"standby_slots": slot, "publish_gate": "on"}),
        ("async standby, gate off", {"standby_slots": slot, "publish_gate": "off"}),
        ("sync standby, gate on", {"standby_slots": slot, "publish_gate": "on", "synchronous_standby_names": slot}),
    ]
    out = []
    try:
        for name, settings in configs:
            if settings and not os.path.exists(os.path.join(STANDBY_DIR, "PG_VERSION")):
                standby_up(b, slot)
            configure(b, **settings)
            common.wait_worker_idle(b)
            r = wl_latency.measure(b, "websocket", rate, seconds, token)
            r["config"] = name
            print(f"  gate {name:24} {rate}/s (achieved {r['achieved_rate']:6.0f}/s): p50 {common.ms(r['p50_ms'])} "
                  f"p95 {common.ms(r['p95_ms'])} p99 {common.ms(r['p99_ms'])} ms, "
                  f"{r['delivered']}/{r['commits']} delivered", flush=True)
            out.append(r)
    finally:
        configure(b)
        standby_down(b, slot)
        with b.connect() as c:
            c.execute("SELECT changerelay.revoke_token('lat')")
            c.execute("SELECT changerelay.untrack('lat_tracked')")
            c.execute("DROP TABLE lat_tracked")
    base = out[0] if out else None
    for r in out:
        for key in ("p50_ms", "p99_ms"):
            r[f"{key[:3]}_ratio_to_no_standby"] = (r[key] / base[key]) if base and base[key] and r[key] else None
    return {"target_rate": rate, "seconds_per_run": seconds, "runs": out}
