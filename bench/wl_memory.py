"""Memory: the shared-memory map's bytes per entry, and the relay worker's RSS per idle WebSocket client.

* pg_shmem_allocations row 'pg_changerelay' (src/shmem.rs) divided by changerelay.max_tracked_rows (it also
  holds the label table), next to status()->'tracked_rows'->'bytes_per_row';
* VmRSS of the relay worker before and after opening 1,000 WebSocket connections that each subscribe to a label
  (changes: true) and then stay idle, divided by 1,000;
* one transaction of 10,000,000 inserted rows (1,000,000 with --quick) into a tracked table: the worker's peak RSS
  (VmHWM after clear_refs, shared buffers it touched included) and peak RssAnon (sampled every 20 ms), and the
  time from COMMIT to the last row's version being visible, as rows per second.
"""
import threading
import time

import common

IDLE_CLIENTS = 1000


def shared_map(b):
    size = b.one("SELECT size FROM pg_shmem_allocations WHERE name = 'pg_changerelay'")
    rows = int(b.one("SHOW changerelay.max_tracked_rows"))
    labels = int(b.one("SHOW changerelay.max_labels"))
    st = b.one("SELECT changerelay.status()")
    return {"allocation_bytes": size, "max_tracked_rows": rows, "max_labels": labels,
            "bytes_per_entry": size / rows, "status_bytes_per_row": st["tracked_rows"]["bytes_per_row"]}


def idle_clients(b):
    with b.connect() as c:
        common.make_table(c, "mem_tracked", 1)
        common.track(c, "mem_tracked", "mem")
    token = common.make_token(b, "mem")
    pid = common.restart_worker(b)  # a fresh process: freed memory of earlier clients would be reused
    time.sleep(1)
    before, anon_before = common.rss_kb(pid), common.rss_kb(pid, "RssAnon")

    def hold():  # called once every client is connected and subscribed
        time.sleep(2)
        return common.rss_kb(pid), common.rss_kb(pid, "RssAnon")
    (during, anon_during), _ = common.ws_session(b, "mem", token, IDLE_CLIENTS, 2, True, hold)
    time.sleep(1)
    after = common.rss_kb(pid)
    with b.connect() as c:
        c.execute("SELECT changerelay.revoke_token('mem')")
        c.execute("SELECT changerelay.untrack('mem_tracked')")
        c.execute("DROP TABLE mem_tracked")
    return {"clients": IDLE_CLIENTS, "worker_rss_kb_before": before, "worker_rss_kb_with_clients": during,
            "worker_rss_kb_after_close": after, "bytes_per_client": (during - before) * 1024 / IDLE_CLIENTS,
            "worker_anon_kb_before": anon_before, "worker_anon_kb_with_clients": anon_during,
            "anon_bytes_per_client": (anon_during - anon_before) * 1024 / IDLE_CLIENTS}


def large_transaction(b):
    rows = 1_000_000 if b.quick else 10_000_000
    with b.connect() as c:
        c.execute("DROP TABLE IF EXISTS mem_big")
        c.execute("CREATE TABLE mem_big (id int PRIMARY KEY, v text)")
        common.track(c, "mem_big", "mem_big")
    pid = common.worker_pid(b)
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")
    anon = [common.rss_kb(pid, "RssAnon")]
    done = threading.Event()

    def sample():
        while not done.is_set():
            anon.append(common.rss_kb(pid, "RssAnon"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with b.connect() as c:
            c.execute(f"INSERT INTO mem_big SELECT g, 'row ' || g FROM generate_series(1, {rows}) g")
            committed = time.monotonic()
            while not c.execute("SELECT changerelay.version('mem_big', %s)", (str(rows),)).fetchone()[0]:
                time.sleep(0.05)
            applied = time.monotonic()
    finally:
        done.set()
        sampler.join()
    peak = common.rss_kb(pid, "VmHWM")
    restarted = common.worker_pid(b) != pid
    with b.connect() as c:
        c.execute("SELECT changerelay.untrack('mem_big')")
        c.execute("DROP TABLE mem_big")
    return {"rows": rows, "worker_vmhwm_kb": peak, "worker_rss_anon_peak_kb": max(anon),
            "apply_seconds": applied - committed, "rows_per_second": rows / (applied - committed),
            "worker_restarted": restarted}


def run(b):
    t = large_transaction(b)
    print(f"  one transaction of {t['rows']:,} rows: worker VmHWM {t['worker_vmhwm_kb'] // 1024} MB, RssAnon peak "
          f"{t['worker_rss_anon_peak_kb'] // 1024} MB; applied in {t['apply_seconds']:.1f} s after COMMIT = "
          f"{t['rows_per_second']:,.0f} rows/s{' (THE WORKER RESTARTED)' if t['worker_restarted'] else ''}",
          flush=True)
    m = shared_map(b)
    print(f"  shared map: {m['allocation_bytes']:,} bytes / {m['max_tracked_rows']:,} rows = "
          f"{m['bytes_per_entry']:.1f} bytes per entry (status says {m['status_bytes_per_row']})", flush=True)
    i = idle_clients(b)
    print(f"  idle WebSocket clients: RSS {i['worker_rss_kb_before']} -> {i['worker_rss_kb_with_clients']} kB "
          f"for {i['clients']} = {i['bytes_per_client']:.0f} bytes per client "
          f"(RssAnon: {i['anon_bytes_per_client']:.0f} bytes per client; "
          f"VmRSS {i['worker_rss_kb_after_close']} kB after they closed)", flush=True)
    return {"shared_map": m, "idle_websocket": i, "large_transaction": t}
