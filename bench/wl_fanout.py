"""Fan-out through the endpoint, and version() reads.

* N WebSocket subscribers (changes: true) of one label, in the Rust client bench/fanout (one process, two
  threads), while a writer commits single-row UPDATEs at min(1000, OFFERED / N) commits/s, so that 1,000
  subscribers are offered OFFERED (600,000) messages/s. Messages/s delivered (counted by the clients, and sent according to
  the endpoint's /metrics), latency from COMMIT to arrival (sampled on up to 50 subscribers), the CPU of the
  relay worker (endpoint threads included) and of the client processes, the worker's RSS before and during.
* `SELECT changerelay.version(label, id)` against `SELECT n FROM t WHERE id = ...` with pgbench.
"""
import re
import threading
import time
import urllib.request

import common

LABEL, TABLE = "fan", "fan_tracked"
OFFERED = 600_000


def messages_sent(b):
    text = urllib.request.urlopen(f"http://127.0.0.1:{b.ws_port}/metrics", timeout=10).read().decode()
    return int(float(re.search(r"^changerelay_endpoint_messages_sent_total\S* (\S+)", text, re.M).group(1)))


def fan_out(b, token, subscribers, seconds):
    rate = min(1000, OFFERED // subscribers)
    pid = common.worker_pid(b)
    rss_before = common.rss_kb(pid)
    box = {}

    def write():
        rss_samples, stop = [], threading.Event()

        def sample():
            while not stop.wait(0.2):
                rss_samples.append(common.rss_kb(pid))
        s = threading.Thread(target=sample)
        s.start()
        box["rss_connected"] = common.rss_kb(pid)
        box["sent0"], box["cpu0"], box["t0"] = messages_sent(b), common.cpu_seconds(pid), time.monotonic()
        committed, achieved = common.write_at_rate(b, TABLE, rate, seconds)
        stop.set()
        s.join()
        box["rss_during"] = max(rss_samples + [box["rss_connected"]])
        return committed, achieved

    procs = 1
    (committed, achieved), seen = common.rust_ws_session(b, LABEL, token, subscribers, write)
    window = max(seen["last"] - box["t0"], 0.001)  # first commit to the last message delivered
    worker_cpu = common.cpu_seconds(pid) - box["cpu0"]
    sent = messages_sent(b) - box["sent0"]
    lat = common.latencies(committed, seen["arrivals"], first_only=False)
    expected = len(committed) * subscribers
    return {"subscribers": subscribers, "client_processes": procs, "target_rate": rate, "achieved_rate": achieved,
            "commits": len(committed), "messages_expected": expected, "messages_delivered": seen["messages"],
            "delivery_window_s": window, "messages_per_s": seen["messages"] / window,
            "offered_messages_per_s": achieved * subscribers, "server_messages_sent": sent,
            "worker_cpu_s": worker_cpu, "client_cpu_s": seen["client_cpu_s"],
            "worker_cpu_cores": worker_cpu / window, "client_cpu_cores": seen["client_cpu_s"] / window,
            "worker_rss_kb_before": rss_before, "worker_rss_kb_connected": box["rss_connected"],
            "worker_rss_kb_during": box["rss_during"], "latency": common.summary(lat)}


def version_reads(b, seconds):
    scripts = {"version": f"SELECT changerelay.version('{LABEL}', '1');\n",
               "select": f"SELECT n FROM {TABLE} WHERE id = 1;\n"}
    out = []
    for clients in (1, 8):
        tps = {k: common.pgbench(b, s, clients, seconds, prepared=True) for k, s in scripts.items()}
        out.append({"clients": clients, "version_tps": tps["version"], "select_tps": tps["select"],
                    "ratio": tps["version"] / tps["select"]})
        print(f"  version() {clients} clients: {tps['version']:.0f} tps, SELECT by id {tps['select']:.0f} tps", flush=True)
    return out


def run(b):
    counts, seconds = ([1, 100], 3) if b.quick else ([1, 100, 1000], 10)
    with b.connect() as c:
        common.make_table(c, TABLE, 8)
        common.track(c, TABLE, LABEL)
    token = common.make_token(b, LABEL)
    common.build_fanout_client()
    runs = []
    for n in counts:
        common.wait_worker_idle(b)
        r = fan_out(b, token, n, seconds)
        runs.append(r)
        print(f"  fan-out {n:5} subscribers at {r['achieved_rate']:.0f} commits/s: {r['messages_per_s']:9.0f} msg/s "
              f"({r['messages_delivered']}/{r['messages_expected']}), p99 {common.ms(r['latency']['p99_ms'])} ms, "
              f"worker {r['worker_cpu_cores']:.2f} / clients {r['client_cpu_cores']:.2f} cores, "
              f"RSS {r['worker_rss_kb_before']} -> {r['worker_rss_kb_during']} kB", flush=True)
    reads = version_reads(b, 5 if b.quick else 10)
    with b.connect() as c:
        c.execute("SELECT changerelay.revoke_token(%s)", (LABEL,))
        c.execute("SELECT changerelay.untrack(%s)", (TABLE,))
        c.execute(f"DROP TABLE {TABLE}")
    return {"seconds_per_run": seconds, "runs": runs, "version_reads": reads}
