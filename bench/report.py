#!/usr/bin/env python3
"""Writes results.json, results.md (Markdown tables, targets met/missed) and results.png from bench/run.py's
results. Re-render from a saved file: .venv/bin/python bench/report.py bench/out/results.json"""
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
    r = find(w.get("fanout", {}).get("runs", []), subscribers=1000)
    x = r and r["messages_per_s"]
    note = ""
    if r:
        note = (f" (worker {f2(r['worker_cpu_cores'])} cores, Python clients {f2(r['client_cpu_cores'])} cores"
                + ("; the clients are the limit" if r["client_cpu_cores"] > r["worker_cpu_cores"] else "") + ")")
    out.append(("fan-out >= 200,000 messages/s to 1,000 subscribers",
                ("not run" if x is None else f"{f0(x)} msg/s") + note, None if x is None else x >= 200_000))
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
    md.append("Elapsed per workload: " + ", ".join(f"{k} {v.get('elapsed_s', 0):.0f} s" for k, v in w.items()) + "\n")
    return "\n".join(md)


def legend(a):
    if a.get_legend_handles_labels()[0]:
        a.legend()


def chart(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    w = res["workloads"]
    fig, ax = plt.subplots(2, 2, figsize=(13, 9))
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(res, out):
    paths = [os.path.join(out, n) for n in ("results.json", "results.md", "results.png")]
    with open(paths[0], "w") as f:
        json.dump(res, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(markdown(res))
    chart(res, paths[2])
    return paths


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "out", "results.json")
    with open(src) as f:
        write(json.load(f), os.path.dirname(os.path.abspath(src)))
