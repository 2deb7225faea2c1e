"""Decoding throughput, side by side: the same WAL decoded by every plugin.

Creates one slot per plugin, writes the workload once (inserts, updates,
deletes over a ten-column table of mixed types), then times
pg_logical_slot_peek_changes / peek_binary_changes on each slot (best of
--repeat runs). Reports rows/s, bytes, and the ratio to wal2json.

Not a test: nothing here passes or fails.
"""
import argparse
import json
import os
import sys
import time

import psycopg

PLUGINS = [
    # name, plugin, function, options
    ("pg_changerelay json", "pg_changerelay", "pg_logical_slot_peek_changes", []),
    ("pg_changerelay binary", "pg_changerelay", "pg_logical_slot_peek_binary_changes", ["format", "binary"]),
    ("wal2json v2", "wal2json", "pg_logical_slot_peek_changes", ["format-version", "2"]),
    ("test_decoding", "test_decoding", "pg_logical_slot_peek_changes", []),
    ("pgoutput v1", "pgoutput", "pg_logical_slot_peek_binary_changes",
     ["proto_version", "1", "publication_names", "bench_pub"]),
]

TABLE = """CREATE TABLE bench_t (
    id bigint PRIMARY KEY, name text, price numeric(12,2), qty int, ratio float8,
    active bool, created timestamptz, doc jsonb, tags text[], note varchar(64))"""


def write_workload(conn, rows, batch):
    conn.execute("DROP TABLE IF EXISTS bench_t")
    conn.execute(TABLE)
    conn.execute("DROP PUBLICATION IF EXISTS bench_pub")
    conn.execute("CREATE PUBLICATION bench_pub FOR TABLE bench_t")
    slots = []
    for i, (name, plugin, _, _) in enumerate(PLUGINS):
        slot = f"bench_{i}"
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        conn.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (slot, plugin))
        slots.append(slot)
    changed = 0
    for lo in range(0, rows, batch):
        hi = min(rows, lo + batch) - 1
        conn.execute("""INSERT INTO bench_t SELECT g, 'name ' || g, (g %% 100000) / 100.0, g %% 1000, g / 7.0,
                          g %% 2 = 0, '2026-01-01'::timestamptz + g * interval '1 second',
                          jsonb_build_object('g', g, 'tag', 'x' || (g %% 10)), ARRAY['a' || g %% 5, 'b'],
                          'note ' || g FROM generate_series(%s::bigint, %s::bigint) g""", (lo, hi))
        changed += hi - lo + 1
    for lo in range(0, rows // 2, batch):
        hi = min(rows // 2, lo + batch) - 1
        conn.execute("UPDATE bench_t SET qty = qty + 1, ratio = ratio * 2 WHERE id BETWEEN %s AND %s", (lo, hi))
        changed += hi - lo + 1
    for lo in range(rows // 2, rows // 2 + rows // 4, batch):
        hi = min(rows // 2 + rows // 4, lo + batch) - 1
        conn.execute("DELETE FROM bench_t WHERE id BETWEEN %s AND %s", (lo, hi))
        changed += hi - lo + 1
    return slots, changed


def time_decode(conn, slot, function, options, repeat):
    best, out = None, None
    args = ", ".join(["%s"] * len(options))
    sql = f"SELECT count(*), coalesce(sum(octet_length(data)), 0) FROM {function}(%s, NULL, NULL{', ' if options else ''}{args})"
    for _ in range(repeat):
        start = time.perf_counter()
        out = conn.execute(sql, [slot, *options]).fetchone()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best, out[0], out[1]


def measure(dsn, rows, batch=10_000, repeat=3, log=sys.stderr):
    """Writes the workload, decodes it with every plugin (relay worker paused); returns
    {"changed_rows", "repeat", "results": [{plugin, seconds, messages, bytes, rows_per_second, ratio_*}]}."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET work_mem = '256MB'")
        # The relay worker would decode the same WAL on the other core; pause it.
        conn.execute("ALTER SYSTEM SET changerelay.enabled = off")
        conn.execute("SELECT pg_reload_conf()")
        slots, changed = write_workload(conn, rows, batch)
        results = []
        try:
            for (name, _, function, options), slot in zip(PLUGINS, slots):
                secs, messages, nbytes = time_decode(conn, slot, function, options, repeat)
                results.append({"plugin": name, "seconds": secs, "messages": messages, "bytes": nbytes,
                                "rows_per_second": changed / secs})
                print(f"  {name:24} {secs:8.3f} s  {changed / secs:12,.0f} rows/s  {nbytes:14,} bytes", file=log)
        finally:
            for slot in slots:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            conn.execute("ALTER SYSTEM RESET changerelay.enabled")
            conn.execute("SELECT pg_reload_conf()")
    base = next(r for r in results if r["plugin"] == "wal2json v2")
    for r in results:
        r["ratio_rows_per_second"] = r["rows_per_second"] / base["rows_per_second"]
        r["ratio_bytes"] = r["bytes"] / base["bytes"]
    return {"changed_rows": changed, "repeat": repeat, "results": results}


MIXED_TABLE = "CREATE TABLE bench_mixed (id int PRIMARY KEY, t text, ts timestamptz, n numeric, j jsonb)"


def measure_mixed(dsn, rows=200_000, repeat=3, log=sys.stderr):
    """Issue 13's decoding comparison: a table of text, int, timestamptz, numeric and jsonb columns, `rows` rows
    inserted (in transactions of 10,000), each plugin's slot peeked (best of `repeat`); ratios to pgoutput."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET work_mem = '256MB'")
        conn.execute("ALTER SYSTEM SET changerelay.enabled = off")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute("DROP TABLE IF EXISTS bench_mixed")
        conn.execute(MIXED_TABLE)
        conn.execute("DROP PUBLICATION IF EXISTS bench_mixed_pub")
        conn.execute("CREATE PUBLICATION bench_mixed_pub FOR TABLE bench_mixed")
        plugins = [(n, p, f, [o if o != "bench_pub" else "bench_mixed_pub" for o in opts])
                   for n, p, f, opts in PLUGINS]
        slots = []
        for i, (_, plugin, _, _) in enumerate(plugins):
            slot = f"bench_mixed_{i}"
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                         (slot,))
            conn.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (slot, plugin))
            slots.append(slot)
        for lo in range(0, rows, 10_000):
            conn.execute("""INSERT INTO bench_mixed SELECT g, 'name ' || g, '2026-01-01'::timestamptz + g * interval '1 s',
                              (g %% 100000) / 100.0, jsonb_build_object('g', g, 'tag', 'x' || (g %% 10))
                              FROM generate_series(%s::int, %s::int) g""", (lo, min(rows, lo + 10_000) - 1))
        results = []
        try:
            for (name, _, function, options), slot in zip(plugins, slots):
                secs, messages, nbytes = time_decode(conn, slot, function, options, repeat)
                results.append({"plugin": name, "seconds": secs, "messages": messages, "bytes": nbytes,
                                "rows_per_second": rows / secs})
                print(f"  mixed {name:24} {secs:8.3f} s  {rows / secs:12,.0f} rows/s  {nbytes:14,} bytes", file=log)
        finally:
            for slot in slots:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            conn.execute("DROP PUBLICATION bench_mixed_pub")
            conn.execute("DROP TABLE bench_mixed")
            conn.execute("ALTER SYSTEM RESET changerelay.enabled")
            conn.execute("SELECT pg_reload_conf()")
    base = next(r for r in results if r["plugin"] == "pgoutput v1")
    for r in results:
        r["ratio_to_pgoutput"] = r["rows_per_second"] / base["rows_per_second"]
    return {"rows": rows, "repeat": repeat, "results": results}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dsn", default=f"host=127.0.0.1 port={os.environ.get('PGCR_PORT', '5499')} user=postgres dbname=postgres")
    ap.add_argument("--rows", type=int, default=600_000, help="rows inserted; updates touch half, deletes a quarter")
    ap.add_argument("--batch", type=int, default=10_000, help="rows per transaction")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json-out")
    a = ap.parse_args()
    out = measure(a.dsn, a.rows, a.batch, a.repeat)
    print(f"\nDecoding {out['changed_rows']:,} changed rows (peek, best of {a.repeat}):\n")
    print("| plugin | rows/s | x wal2json | bytes | bytes vs wal2json |")
    print("|---|---:|---:|---:|---:|")
    for r in out["results"]:
        print(f"| {r['plugin']} | {r['rows_per_second']:,.0f} | {r['ratio_rows_per_second']:.2f} | "
              f"{r['bytes']:,} | {r['ratio_bytes']:.2f} |")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"changed_rows": out["changed_rows"], "results": out["results"]}, f, indent=2)


if __name__ == "__main__":
    main()
