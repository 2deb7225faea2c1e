#!/usr/bin/env python3
"""Writes results.json, results.md (Markdown tables, targets met/missed) and results.png from bench/run.py's
results. Re-render from a saved file: .venv/bin/python bench/report.py bench/out/results.json"""
import decimal
import json
import os
import sys


def f0(x):
    return "n/a" if x is None else f"{x:,.0f}"


def f2(x):
    return "n/a" if x is None else f"{x:.2f}"


def table(head, rows, align=None):
    align = align or ["---"] + ["---:"] * (len(head) - 1)
    return "\n".join(["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"] +
                     ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]) + "\n"


def find(rows, **kw):
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


def targets(w):
    """(target, measured, met) rows; met is True, False or None (not measured)."""
    out = []
    dec = {r["plugin"]: r for r in w.get("decoding", {}).get("results", [])}
    for plugin, want in (("pg_changerelay json", 1.5), ("pg_changerelay binary", 3.0)):
        r = dec.get(plugin)
        x = r and r["ratio_rows_per_second"]
        out.append((f"decoding {plugin.split()[-1]} >= {want}x wal2json rows/s", "n/a" if x is None else f"{x:.2f}x",
                    None if x is None else x >= want))
    lat = w.get("latency", {}).get("runs", [])
    ws, trig = find(lat, receiver="websocket", target_rate=1000), find(lat, receiver="trigger_notify", target_rate=1000)
    for key, limit in (("p50_ms", 2), ("p99_ms", 10)):
        x = ws and ws[key]
        out.append((f"1,000 commits/s, WebSocket {key[:3]} < {limit} ms", "n/a" if x is None else f"{x:.2f} ms",
                    None if x is None else x < limit))
    if ws and trig and ws["p50_ms"] is not None and trig["p50_ms"] is not None:
        ok = ws["p50_ms"] <= trig["p50_ms"] and ws["p99_ms"] <= trig["p99_ms"]
        out.append(("1,000 commits/s, WebSocket no worse than trigger+NOTIFY (p50 and p99)",
                    f"{f2(ws['p50_ms'])} / {f2(ws['p99_ms'])} ms vs {f2(trig['p50_ms'])} / {f2(trig['p99_ms'])} ms",
                    ok))
    ovh = w.get("overhead", {}).get("runs", [])
    for clients in (1, 8):
        r = find(ovh, config="changerelay", clients=clients)
        x = r and r["ratio_to_plain"]
        out.append((f"write overhead, {clients} client(s): tracked >= 0.95x plain TPS",
                    ("n/a" if x is None else f"{x:.2f}x") + (f" (counting the worker's catch-up after the run: "
                                   f"{f2(r['sustained_ratio_to_plain'])}x)" if r else ""),
                    None if x is None else x >= 0.95))
    x = w.get("overhead", {}).get("changerelay_vs_trigger_8_clients")
    out.append(("write overhead, 8 clients: tracked >= 1.5x trigger+NOTIFY TPS", "n/a" if x is None else f"{x:.2f}x",
                None if x is None else x >= 1.5))
    out += throughput_targets(w)
    r = find(w.get("fanout", {}).get("runs", []), subscribers=1000)
    x = r and r["messages_per_s"]
    note = ""
    if r:
        note = (f" (server: relay worker {f2(r['worker_cpu_cores'])} cores; Rust client {f2(r['client_cpu_cores'])}"
                f" cores; {f0(r['messages_delivered'])} of {f0(r['messages_expected'])} delivered)")
    out.append(("fan-out >= 500,000 messages/s to 1,000 WebSocket subscribers (Rust client)",
                ("not run" if x is None else f"{f0(x)} msg/s") + note, None if x is None else x >= 500_000))
    h = w.get("hostile", {})
    rs = h.get("resubscribe")
    n = rs["abusive_clients"] if rs else 200
    x = rs and rs["hostile"]["latency"]["p99_ms"]
    out.append((f"{n} clients re-subscribing from the oldest cursor: live WebSocket p99 < "
                f"{f0(rs['p99_target_ms']) if rs else 10} ms",
                "not run" if not rs else f"{f2(x)} ms (alone {f2(rs['baseline']['latency']['p99_ms'])} ms, "
                                         f"{f2(rs['p99_ratio'])}x)", None if not rs or x is None else rs["p99_met"]))
    lag = rs and rs["hostile"]["lag"]
    out.append((f"{n} clients re-subscribing from the oldest cursor: worker lag < "
                f"{f0(rs['lag_target_s']) if rs else 1} s",
                "not run" if not rs else f"max {f2(lag['max_s'])} s, {f0(lag['max_bytes'])} bytes",
                None if not rs or lag["max_s"] is None else rs["lag_met"]))
    ic = h.get("idle_connections")
    if ic:
        runs = [r for r in ic["runs"] if r["mode"] != "none"]
        desc = "; ".join(f"{r['mode']}: /versions {r['versions']['served']}/{r['versions']['requests']}, WebSocket "
                         f"{r['live']['delivered']}/{r['live']['commits']}" for r in runs)
        out.append((f"{f0(ic['connections'])} idle TCP connections: an authenticated client is served", desc,
                    ic["all_served"]))
    else:
        out.append(("1,000 idle TCP connections: an authenticated client is served", "not run", None))
    return out


def throughput_targets(w):
    """Issue 13's targets: WAL, TPS and worker delay under pgbench TPC-B-like, apply rates, mixed-type decoding,
    WebSocket p99 at 5,000 commits/s."""
    out = []
    tp = w.get("throughput", {})
    runs = tp.get("tpcb", {}).get("runs", [])
    for config, want in (("history", 1.5), ("versions_only", 1.1)):
        r = find(runs, config=config)
        x = r and r["wal_ratio"]
        out.append((f"TPC-B-like WAL per transaction, four tables tracked ({config.replace('_', ' ')}) <= {want}x "
                    "untracked", "n/a" if x is None else f"{x:.2f}x ({f0(r['wal_per_txn_median'])} bytes)",
                    None if x is None else x <= want))
    for config in ("history", "versions_only"):
        r = find(runs, config=config)
        x = r and r["tps_ratio"]
        out.append((f"TPC-B-like TPS at 8 clients ({config.replace('_', ' ')}) >= 0.95x untracked",
                    "n/a" if x is None else f"{x:.2f}x", None if x is None else x >= 0.95))
        d = r and r["worker_max_delay_s_all"]
        out.append((f"TPC-B-like at 8 clients ({config.replace('_', ' ')}): worker never more than 1 s behind",
                    "n/a" if d is None else f"{d:.2f} s at most", None if d is None else d <= 1.0))
    for key, what, want in (("apply_large", "inside one large transaction", 300_000),
                            ("apply_small", "as a stream of small transactions", 100_000)):
        x = tp.get(key, {}).get("changes_per_s")
        out.append((f"apply rate {what} >= {want:,} changes/s", "n/a" if x is None else f"{f0(x)} changes/s",
                    None if x is None else x >= want))
    mixed = {r["plugin"]: r for r in w.get("decoding", {}).get("mixed", {}).get("results", [])}
    for plugin, want in (("pg_changerelay binary", 1.0), ("pg_changerelay json", 0.85)):
        r = mixed.get(plugin)
        x = r and r["ratio_to_pgoutput"]
        out.append((f"mixed-type decoding, {plugin.split()[-1]} >= {want}x pgoutput rows/s",
                    "n/a" if x is None else f"{x:.2f}x", None if x is None else x >= want))
    ws = find(w.get("latency", {}).get("runs", []), receiver="websocket", target_rate=5000)
    x = ws and ws["p99_ms"]
    out.append(("5,000 commits/s, WebSocket p99 < 5 ms", "n/a" if x is None else f"{x:.2f} ms",
                None if x is None else x < 5))
    return out


def verdict(target, ok):
    if ok is False and target.startswith("fan-out") and "the clients are the limit" in target:
        return "**missed** (client-limited)"
    return {True: "met", False: "**missed**", None: "not measured"}[ok]


def markdown(res):
    m, lib, w = res["machine"], res["library"], res["workloads"]
    md = [f"# pg_changerelay benchmarks ({res['mode']} run)\n",
          f"{m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, {m.get('postgres', '?').split(',')[0]}, "
          f"commit `{m['git_commit'][:12]}`{' (uncommitted changes)' if m['git_dirty'] else ''}, "
          f"library {lib['build']} build (sha256 {lib['sha256_16']}…), cluster `{res['cluster']['data_dir']}` on "
          f"127.0.0.1:{res['cluster']['port']} (fsync off), total {res['elapsed_s']:.0f} s. Not pass/fail.\n"]
    if lib["build"] != "release":
        md.append("**Warning: a debug build was loaded; these numbers do not represent the release build.**\n")
    for name, err in res.get("errors", {}).items():
        md.append(f"**Workload `{name}` failed:** `{err.strip().splitlines()[-1]}`\n")
    if res.get("server_log_problems"):
        md.append("**Server log:** " + "; ".join(f"`{x}`" for x in res["server_log_problems"]) + "\n")
    md.append("## Targets\n")
    md.append(table(["target", "measured", "result"],
                    [(t, x, verdict(t + x, ok)) for t, x, ok in targets(w)],
                    ["---", "---", "---"]))
    if w.get("decoding", {}).get("results"):
        d = w["decoding"]
        md.append(f"## Decoding throughput\n\n{d['changed_rows']:,} changed rows (inserts, updates, deletes of a "
                  f"ten-column table), `pg_logical_slot_peek_*`, best of {d['repeat']}, relay worker paused.\n")
        md.append(table(["plugin", "rows/s", "x wal2json", "bytes", "bytes vs wal2json"],
                        [(r["plugin"], f0(r["rows_per_second"]), f2(r["ratio_rows_per_second"]), f0(r["bytes"]),
                          f2(r["ratio_bytes"])) for r in d["results"]]))
    if w.get("decoding", {}).get("mixed"):
        d = w["decoding"]["mixed"]
        md.append(f"## Decoding a mixed-type table\n\n{d['rows']:,} inserted rows of (int, text, timestamptz, "
                  f"numeric, jsonb), `pg_logical_slot_peek_*`, best of {d['repeat']}, relay worker paused.\n")
        md.append(table(["plugin", "rows/s", "x pgoutput", "bytes"],
                        [(r["plugin"], f0(r["rows_per_second"]), f2(r["ratio_to_pgoutput"]), f0(r["bytes"]))
                         for r in d["results"]]))
    if w.get("throughput", {}).get("tpcb"):
        d = w["throughput"]
        runs = d["tpcb"]["runs"]
        md.append(f"## pgbench TPC-B-like, four tables tracked\n\nScale {d['tpcb']['scale']}, 8 clients, "
                  f"{runs[0]['seconds']} s per run, median of {d['tpcb']['rounds']} interleaved round(s). WAL from "
                  f"before the run to after the worker caught up and took its next version checkpoint. *Max delay*: "
                  f"largest (now - commit time of the newest transaction applied) sampled every 100 ms.\n")
        md.append(table(["configuration", "TPS", "x untracked", "WAL bytes/txn", "x untracked", "worker CPU (cores)",
                         "max delay s", "catch-up s"],
                        [(r["config"], f0(r["tps"]), f2(r["tps_ratio"]), f0(r["wal_per_txn_median"]),
                          f2(r["wal_ratio"]), f2(r["worker_cpu_cores"]), f2(r["worker_max_delay_s_all"]),
                          f2(r["worker_catch_up_s"])) for r in runs]))
        a, sm = d.get("apply_large", {}), d.get("apply_small", {})
        md.append(f"Apply rate: one transaction of {f0(a.get('rows'))} rows visible {f2(a.get('seconds'))} s after "
                  f"COMMIT = **{f0(a.get('changes_per_s'))} changes/s**; {f0(sm.get('transactions'))} small "
                  f"transactions ({f0(sm.get('changes'))} changes) written while the worker was paused, applied "
                  f"{f2(sm.get('seconds'))} s after it resumed = **{f0(sm.get('changes_per_s'))} changes/s**.\n")
    if w.get("latency", {}).get("runs"):
        d = w["latency"]
        md.append(f"## Commit-to-subscriber latency\n\nSingle-row UPDATE per commit at a fixed rate for "
                  f"{d['seconds_per_run']} s; from COMMIT returning to the receiver seeing the value (monotonic "
                  f"clock, same machine).\n")
        md.append(table(["receiver", "target commits/s", "achieved", "delivered", "p50 ms", "p95 ms", "p99 ms",
                         "max ms", "before COMMIT returned"],
                        [(r["receiver"], f0(r["target_rate"]), f0(r["achieved_rate"]),
                          f"{r['delivered']}/{r['commits']}", f2(r["p50_ms"]), f2(r["p95_ms"]), f2(r["p99_ms"]),
                          f2(r["max_ms"]), f0(r.get("before_commit_returned"))) for r in d["runs"]]))
        md.append("*Before COMMIT returned*: deliveries that reached the receiver before the writer saw its COMMIT "
                  "return (counted as 0 ms).\n")
    if w.get("overhead", {}).get("runs"):
        d = w["overhead"]
        md.append(f"## Write overhead\n\npgbench, single-row UPDATE of a random id among {d['rows']:,} rows, "
                  f"{d['runs'][0]['seconds']} s per run, median of {d['rounds']} interleaved round(s). *Lag at "
                  f"end*: WAL bytes the relay worker still had to decode when pgbench ended; *catch-up*: how long "
                  f"it then took; *sustained*: TPS x run / (run + catch-up).\n")
        md.append(table(["table", "clients", "TPS", "x plain", "rounds", "worker CPU (cores)", "lag at end",
                         "catch-up s", "sustained TPS", "sustained x plain"],
                        [(r["config"], r["clients"], f0(r["tps"]), f2(r["ratio_to_plain"]),
                          " / ".join(f0(x) for x in r["tps_rounds"]), f2(r["worker_cpu_cores"]),
                          f0(r["worker_lag_bytes_at_end"]), f2(r["worker_catch_up_s"]), f0(r["sustained_tps"]),
                          f2(r["sustained_ratio_to_plain"])) for r in d["runs"]]))
        md.append(f"pg_changerelay / trigger+NOTIFY at 8 clients: **{f2(d['changerelay_vs_trigger_8_clients'])}x**\n")
    if w.get("fanout", {}).get("runs"):
        d = w["fanout"]
        md.append(f"## Fan-out\n\nWebSocket subscribers (changes) of one label, Python `websockets` clients in "
                  f"1-2 processes; writer at min(1000, 200000/N) commits/s for {d['seconds_per_run']} s. Messages/s "
                  f"= messages delivered / (first commit to last arrival). CPU in cores over that window.\n")
        md.append(table(["subscribers", "commits/s", "offered msg/s", "delivered", "msg/s", "p50 ms", "p99 ms",
                         "worker CPU", "client CPU", "worker RSS before / during (kB)"],
                        [(r["subscribers"], f0(r["achieved_rate"]), f0(r["offered_messages_per_s"]),
                          f"{r['messages_delivered']:,}/{r['messages_expected']:,}", f0(r["messages_per_s"]),
                          f2(r["latency"]["p50_ms"]), f2(r["latency"]["p99_ms"]), f2(r["worker_cpu_cores"]),
                          f2(r["client_cpu_cores"]), f"{r['worker_rss_kb_before']:,} / {r['worker_rss_kb_during']:,}")
                         for r in d["runs"]]))
        md.append("`SELECT changerelay.version(label, id)` against `SELECT n FROM t WHERE id = ...` (pgbench, "
                  "prepared):\n")
        md.append(table(["clients", "version() TPS", "SELECT TPS", "ratio"],
                        [(r["clients"], f0(r["version_tps"]), f0(r["select_tps"]), f2(r["ratio"]))
                         for r in d["version_reads"]]))
    if w.get("memory", {}).get("shared_map"):
        s, i = w["memory"]["shared_map"], w["memory"]["idle_websocket"]
        md.append("## Memory\n")
        md.append(table(["what", "value"], [
            ("shared map allocation (`pg_shmem_allocations` 'pg_changerelay')", f"{s['allocation_bytes']:,} bytes"),
            ("max_tracked_rows / max_labels", f"{s['max_tracked_rows']:,} / {s['max_labels']:,}"),
            ("allocation / max_tracked_rows (labels included)", f"{s['bytes_per_entry']:.1f} bytes"),
            ("status()->'tracked_rows'->'bytes_per_row'", s["status_bytes_per_row"]),
            (f"relay worker VmRSS before / with {i['clients']:,} idle subscribed WebSocket clients",
             f"{i['worker_rss_kb_before']:,} / {i['worker_rss_kb_with_clients']:,} kB"),
            ("per idle WebSocket client (VmRSS / RssAnon)",
             f"{f0(i['bytes_per_client'])} / {f0(i['anon_bytes_per_client'])} bytes"),
        ], ["---", "---:"]))
    if w.get("hostile", {}).get("resubscribe"):
        md.append(hostile_markdown(w["hostile"]))
    if w.get("gate", {}).get("runs"):
        d = w["gate"]
        md.append(f"## Waiting for standbys (publish gate)\n\nCommit -> WebSocket latency at {d['target_rate']:,} "
                  f"commits/s for {d['seconds_per_run']} s, the bench cluster alone and then as the primary of a "
                  f"streaming standby on the same machine (bench/wl_gate.py).\n")
        md.append(table(["configuration", "achieved", "delivered", "p50 ms", "p95 ms", "p99 ms", "max ms",
                         "p50 x alone", "p99 x alone"],
                        [(r["config"], f0(r["achieved_rate"]), f"{r['delivered']}/{r['commits']}", f2(r["p50_ms"]),
                          f2(r["p95_ms"]), f2(r["p99_ms"]), f2(r["max_ms"]), f2(r.get("p50_ratio_to_no_standby")),
                          f2(r.get("p99_ratio_to_no_standby"))) for r in d["runs"]]))
    if w.get("sinks", {}).get("redis") or w.get("sinks", {}).get("nats"):
        d = w["sinks"]
        md.append("## Sinks\n\nRedis Streams and NATS JetStream on this machine (persistence on). Throughput: "
                  "inserts in 100-row transactions, from the first COMMIT until the broker holds every change. "
                  "Latency: single-row UPDATE per commit at 1,000 commits/s, from COMMIT returning to a reader of "
                  "the broker seeing the change.\n")
        md.append(table(["sink", "changes", "changes/s", "commits/s", "delivered", "p50 ms", "p95 ms", "p99 ms",
                         "max ms"],
                        [(k, f0(v["throughput"]["rows"]), f0(v["throughput"]["changes_per_s"]),
                          f0(v["latency"]["achieved_rate"]), f"{v['latency']['delivered']}/{v['latency']['commits']}",
                          f2(v["latency"]["p50_ms"]), f2(v["latency"]["p95_ms"]), f2(v["latency"]["p99_ms"]),
                          f2(v["latency"]["max_ms"])) for k, v in d.items() if isinstance(v, dict) and "latency" in v]))
    md.append("Elapsed per workload: " + ", ".join(f"{k} {v.get('elapsed_s', 0):.0f} s" for k, v in w.items()) + "\n")
    return "\n".join(md)


def sched(cpu, name):
    s = cpu.get("sched", {}).get(name)
    return "n/a" if s is None else f"{s['ran']:.2f} / {s['waited']:.2f}"


def hostile_markdown(h):
    rs, ic = h["resubscribe"], h["idle_connections"]
    ab = rs["hostile"]["abusers"]
    md = [f"## Hostile clients\n\nA live subscriber (WebSocket, changes, its own token and process) of a label "
          f"written at {f0(h['rate'])} commits/s, {h['seconds_per_window']} s per window, latency from COMMIT to "
          f"arrival; *watch()*: the same commits through `changerelay.watch()` in a loop (no endpoint), so the "
          f"worker's part of the latency shows. *Lag*: every 100 ms, the slot's lag_bytes and now - the last "
          f"applied commit. *Re-subscribing*: {rs['abusive_clients']} clients of another label with a history of "
          f"{f0(h['history_rows'])} rows (one token, {rs['client_processes']} processes, 4 source addresses) "
          f"loop: connect, subscribe from the oldest cursor, read {f0(rs['read_per_subscription'])} changes, "
          f"subscribe again, read, disconnect. *Idle*: {f0(ic['connections'])} TCP connections from "
          f"{ic['addresses']} loopback addresses that send nothing: opened once, re-opened 1 s after the server "
          f"closes them, or re-opened at once ({h['idle_seconds_per_window']} s windows).\n"]
    rows = [("alone", rs["baseline"]), (f"{rs['abusive_clients']} re-subscribing", rs["hostile"])]
    rows += [(f"idle: {r['mode']}", r["live"]) for r in ic["runs"]]
    md.append(table(["window", "p50 ms", "p95 ms", "p99 ms", "max ms", "p50 first / last quarter",
                     "watch() p50 / p99 ms", "delivered",
                     "lag max s", "lag max bytes", "worker main ran / waited", "endpoint ran / waited",
                     "machine busy", "other users"],
                    [(n, f2(r["latency"]["p50_ms"]), f2(r["latency"]["p95_ms"]), f2(r["latency"]["p99_ms"]),
                      f2(r["latency"]["max_ms"]),
                      " / ".join(f2((r.get("latency_trend") or {}).get(k))
                                 for k in ("first_quarter_p50_ms", "last_quarter_p50_ms")),
                      f"{f2(r['watch_latency']['p50_ms'])} / {f2(r['watch_latency']['p99_ms'])}",
                      f"{r['delivered']}/{r['commits']}", f2(r["lag"]["max_s"]), f0(r["lag"]["max_bytes"]),
                      sched(r["cpu"], "worker_main"), sched(r["cpu"], "worker_endpoint"),
                      f"{f2(r['cpu']['machine'])} of {r['cpu']['cores']}", f2(r["cpu"]["unaccounted"]))
                     for n, r in rows]))
    md.append("*ran / waited*: cores the thread ran, and waited runnable for a core (`/proc/…/schedstat`); "
              "ran + waited near 1 means the thread never slept (saturated). *Machine busy*: every process, "
              "other users' included; *other users*: what remains after the cluster, the client processes and "
              "this one (cores; kernel time not charged to a process too). *First / last quarter*: p50 of the commits of the window's first and last "
              "quarter; a growing one is a queue building up, not a steady delay.\n")
    wnd, c = ab["window"], rs["hostile"]["cpu"]
    md.append(f"Re-subscribing vs alone: p50 **{f2(rs['p50_ratio'])}x**, p99 **{f2(rs['p99_ratio'])}x**. "
              f"The abusive clients in the window: {f0(wnd['connects'])} connects ({wnd['reconnects_per_s']:.1f}/s), "
              f"{f0(wnd['subscribes'])} subscribes, {f0(wnd['changes'])} changes ({f0(wnd['changes_per_s'])}/s), "
              f"{f0(wnd['errors'])} errors, {f0(wnd['resyncs'])} resyncs; first change "
              f"{f0(ab['first_change_ms']['p50'])} ms (p50) / {f0(ab['first_change_ms']['p99'])} ms (p99) after "
              f"subscribing. CPU in cores: worker {f2(c['worker_total'])} (main {f2(c['worker_main'])}, endpoint "
              f"{f2(c['worker_endpoint'])}), abusive clients {f2(c['abusers'])}, live subscriber "
              f"{f2(c['live_subscriber'])}, watch() receiver {f2(c.get('watch_receiver'))}, writer (bench process) "
              f"{f2(c['bench_process'])}, other Postgres processes {f2(c['postgres_other'])}, unaccounted (other "
              f"users) {f2(c['unaccounted'])}. One 1,000-row history page from the oldest cursor takes "
              f"{f2(h.get('history_page_ms'))} ms through `changerelay.changes()` in this build "
              f"({f2(h.get('history_page_ms_before_analyze'))} ms before `changerelay.history` was analyzed: the "
              f"plan then reads every row of the label after the cursor and sorts them).\n")
    none = ic["runs"][0]
    md.append(table(["idle connections", "/versions served", "retries", "p50 ms", "p99 ms", "p99 x none",
                     "WebSocket p50 ms", "p99 ms", "p99 x none", "subscriber attempts", "flood connects/s",
                     "server max open / unauth.", "evicted", "auth timeouts", "kernel listen overflows", "flood CPU",
                     "endpoint ran / waited"],
                    [(r["mode"], f"{r['versions']['served']}/{r['versions']['requests']}", r["versions"]["retries"],
                      f2(r["versions"]["p50_ms"]), f2(r["versions"]["p99_ms"]),
                      f2(r.get("versions_p99_ratio")) if r is not none else "",
                      f2(r["live"]["latency"]["p50_ms"]), f2(r["live"]["latency"]["p99_ms"]),
                      f2(r.get("live_p99_ratio")) if r is not none else "",
                      r["live"]["subscriber"]["connect_attempts"],
                      f0(r["flood"]["connects_per_s"]) if r.get("flood") else "",
                      " / ".join(f0(r["server_gauges_max"].get(k)) for k in ("clients", "unauthenticated_clients")),
                      f0((r["endpoint_counters"] or {}).get('refusals_total{reason="unauthenticated_limit"}', 0)),
                      f0((r["endpoint_counters"] or {}).get('refusals_total{reason="auth_timeout"}', 0)),
                      f0(r.get("listen_drops", {}).get("ListenOverflows")),
                      f2(r["live"]["cpu"].get("flood")), sched(r["live"]["cpu"], "worker_endpoint"))
                     for r in ic["runs"]]))
    md.append("*/versions*: an authenticated `GET /versions/{label}`, a new connection each (as curl), a dropped "
              "connection retried at once, latency to the answer. *Evicted*: unauthenticated connections the "
              "server closed to admit a newer one (`max_unauthenticated`); *auth timeouts*: closed at "
              f"`auth_timeout`; *kernel listen overflows*: handshakes dropped machine-wide because an accept queue "
              f"was full (the endpoint's listen backlog: {h.get('listen_backlog', 'n/a')}); such a client "
              f"retries its SYN after 1 s.\n")
    return "\n".join(md)


def legend(a):
    if a.get_legend_handles_labels()[0]:
        a.legend()


def chart(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    w = res["workloads"]
    fig, ax = plt.subplots(3, 3, figsize=(19, 13))
    fig.suptitle(f"pg_changerelay benchmarks ({res['mode']}, {res['library']['build']} build, "
                 f"{res['machine']['git_commit'][:10]})")
    a = ax[0][0]
    dec = w.get("decoding", {}).get("results", [])
    a.barh([r["plugin"] for r in dec], [r["rows_per_second"] for r in dec], color="tab:blue")
    a.invert_yaxis()
    a.set_title("Decoding throughput (rows/s)")
    a = ax[0][1]
    lat = w.get("latency", {}).get("runs", [])
    rates = sorted({r["target_rate"] for r in lat})
    receivers = list(dict.fromkeys(r["receiver"] for r in lat))
    for k, rec in enumerate(receivers):
        rs = [find(lat, receiver=rec, target_rate=x) for x in rates]
        xs = [i + k * 0.25 for i in range(len(rates))]
        a.bar(xs, [max(r["p99_ms"] or 0, 0.01) for r in rs], 0.25, alpha=0.35, color=f"C{k}")
        a.bar(xs, [max(r["p50_ms"] or 0, 0.01) for r in rs], 0.25, label=rec, color=f"C{k}")
    a.set_xticks([i + 0.25 for i in range(len(rates))], [f"{x:,}/s" for x in rates])
    a.set_yscale("log")
    a.set_title("Commit-to-subscriber latency, ms (solid p50, pale p99; floor 0.01)")
    legend(a)
    a = ax[1][0]
    ovh = w.get("overhead", {}).get("runs", [])
    configs = list(dict.fromkeys(r["config"] for r in ovh))
    for k, clients in enumerate((1, 8)):
        rs = [find(ovh, config=c, clients=clients) for c in configs]
        a.bar([i + k * 0.4 for i in range(len(configs))], [r["tps"] if r else 0 for r in rs], 0.4,
              label=f"{clients} client(s)")
    a.set_xticks([i + 0.2 for i in range(len(configs))], configs)
    a.set_title("Write throughput, pgbench TPS")
    legend(a)
    a = ax[1][1]
    fan = w.get("fanout", {}).get("runs", [])
    labels = [str(r["subscribers"]) for r in fan]
    a.bar([i - 0.2 for i in range(len(fan))], [r["offered_messages_per_s"] for r in fan], 0.4, label="offered")
    a.bar([i + 0.2 for i in range(len(fan))], [r["messages_per_s"] for r in fan], 0.4, label="delivered")
    a.set_xticks(range(len(fan)), labels)
    a.set_xlabel("WebSocket subscribers")
    a.set_yscale("log")
    a.set_title("Fan-out, messages/s")
    legend(a)
    tpcb = w.get("throughput", {}).get("tpcb", {}).get("runs", [])
    a = ax[2][0]
    names = [r["config"] for r in tpcb]
    a.bar([i - 0.2 for i in range(len(tpcb))], [r["wal_per_txn_median"] for r in tpcb], 0.4, label="WAL bytes/txn")
    a2 = a.twinx()
    a2.bar([i + 0.2 for i in range(len(tpcb))], [r["tps"] for r in tpcb], 0.4, color="tab:orange", label="TPS")
    a.set_xticks(range(len(tpcb)), names)
    a.set_title("pgbench TPC-B-like, 8 clients, four tables: WAL bytes/txn (blue), TPS (orange)")
    a = ax[2][1]
    mixed = w.get("decoding", {}).get("mixed", {}).get("results", [])
    a.barh([r["plugin"] for r in mixed], [r["rows_per_second"] for r in mixed], color="tab:green")
    a.invert_yaxis()
    a.set_title("Decoding a mixed-type table (rows/s)")
    hostile_chart(ax[0][2], ax[1][2], w.get("hostile", {}))
    ax[2][2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def hostile_chart(a, b, h):
    rs, ic = h.get("resubscribe"), h.get("idle_connections")
    rows = []
    if rs:
        rows += [("alone", rs["baseline"]), (f"{rs['abusive_clients']} re-sub.", rs["hostile"])]
    if ic:
        rows += [(f"idle {r['mode']}", r["live"]) for r in ic["runs"]]
    xs = range(len(rows))
    a.bar([x - 0.2 for x in xs], [max(r["latency"]["p50_ms"] or 0, 0.01) for _, r in rows], 0.4, label="WebSocket p50")
    a.bar([x + 0.2 for x in xs], [max(r["latency"]["p99_ms"] or 0, 0.01) for _, r in rows], 0.4, label="WebSocket p99")
    a.plot(list(xs), [max(r["watch_latency"]["p99_ms"] or 0, 0.01) for _, r in rows], "k_", markersize=18,
           label="watch() p99")
    if rs:
        a.axhline(rs["p99_target_ms"], color="tab:red", linestyle="--", linewidth=1, label="p99 target")
    a.set_xticks(list(xs), [n for n, _ in rows], rotation=20)
    a.set_yscale("log")
    a.set_title("Hostile clients: live subscriber latency, ms")
    legend(a)
    runs = ic["runs"] if ic else []
    xs = range(len(runs))
    b.bar([x - 0.2 for x in xs], [max(r["versions"]["p50_ms"] or 0, 0.01) for r in runs], 0.4, label="p50")
    b.bar([x + 0.2 for x in xs], [max(r["versions"]["p99_ms"] or 0, 0.01) for r in runs], 0.4, label="p99")
    b.set_xticks(list(xs), [r["mode"] for r in runs])
    b.set_yscale("log")
    b.set_xlabel(f"{ic['connections']:,} idle TCP connections" if ic else "")
    b.set_title("Authenticated GET /versions under idle connections, ms")
    legend(b)


def write(res, out):
    paths = [os.path.join(out, n) for n in ("results.json", "results.md", "results.png")]
    with open(paths[0], "w") as f:
        # Numbers read from Postgres may be Decimals.
        json.dump(res, f, indent=2, default=lambda o: float(o) if isinstance(o, decimal.Decimal) else str(o))
    with open(paths[1], "w") as f:
        f.write(markdown(res))
    chart(res, paths[2])
    return paths


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "out", "results.json")
    with open(src) as f:
        write(json.load(f), os.path.dirname(os.path.abspath(src)))
