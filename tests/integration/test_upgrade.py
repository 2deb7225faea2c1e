"""ALTER EXTENSION pg_changerelay UPDATE from the released 0.1.0 on a real cluster: install 0.1.0's SQL and library,
write data, install the new ones, restart, update, check that everything is kept (README: Upgrades)."""
import os
import shutil
import subprocess
import time
import uuid

import psycopg
import pytest

from conftest import PG, PG_CONFIG, PGTOOL, SERVER_FS, WORK, connect, extra_port
from test_endpoint import http
from test_relay import CLUSTER, ROOT, ExtraCluster, wait_until

RELEASED = {"0.1.0": "388ee5b"}  # the commit each released version was built from
# The majors each release was built for: 0.1.0's sources do not build on 18 (ReplicationSlotAcquire gained an
# argument there), so no 0.1.0 ever ran on 18 and there is nothing to update from.
RELEASED_FOR = {"0.1.0": ("15", "17")}
PORT = extra_port("upgrade")


def pg_config(flag):
    return subprocess.run([PGTOOL, "pg_config", flag], capture_output=True, text=True, check=True).stdout.strip()


def package(version):
    out = os.path.join(WORK, f"package-released-{version}")
    subprocess.run([os.path.join(ROOT, "scripts", "package-ref.sh"), RELEASED[version], out, PG_CONFIG],
                   check=True, timeout=1800)
    lib = out + pg_config("--pkglibdir")
    sql = out + pg_config("--sharedir") + f"/extension/pg_changerelay--{version}.sql"
    # The released version's install script sits beside the current one, as a package would put it.
    shutil.copy(sql, SERVER_FS + pg_config("--sharedir") + "/extension/")
    return lib


def snapshot(c, label, stored=False):
    """What readers get; with `stored`, the JSON as 0.1.0 stored it (its changes() passed numbers through a
    double and lost digits the stored jsonb kept: 0.2.0 shows them exactly)."""
    images = ("h.key::text, h.new::text, h.old::text, h.metadata::text FROM changerelay.changes(NULL, %s) c "
              "JOIN changerelay.history h ON (h.event_id, h.seq) = (c.event_id, c.seq)") if stored else \
        "c.key::text, c.new::text, c.old::text, c.metadata::text FROM changerelay.changes(NULL, %s) c"
    return {
        "changes": c.execute("SELECT c.cursor, c.event_id, c.seq, c.ts, c.xid, c.label, c.table_name, c.op, "
                             "c.identifier, " + images + " ORDER BY c.event_id, c.seq", ([label],)).fetchall(),
        "versions": c.execute("SELECT * FROM changerelay.versions(%s)", (label,)).fetchall(),
        "tracked": c.execute("SELECT * FROM changerelay.tracked()").fetchall(),
        "tokens": c.execute("SELECT name, labels, rows, created_by FROM changerelay.tokens()").fetchall(),
    }


# Functions (arguments, result, strictness, volatility), columns, grants and triggers of the extension's schema.
SCHEMA = """
SELECT 'function ' || p.proname || '(' || pg_get_function_arguments(p.oid) || ') ' || pg_get_function_result(p.oid)
       || ' ' || p.proisstrict || p.provolatile::text || ' ' || coalesce(p.proacl::text, '')
  FROM pg_proc p WHERE p.pronamespace = 'changerelay'::regnamespace
UNION ALL
SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) || ' '
       || a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '') || ' ' || coalesce(c.relacl::text, '')
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
 WHERE c.relnamespace = 'changerelay'::regnamespace AND c.relkind IN ('r', 'S')
UNION ALL
SELECT 'trigger ' || tgname || ' ' || tgrelid::regclass FROM pg_trigger
 WHERE tgrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'changerelay'::regnamespace) AND NOT tgisinternal
ORDER BY 1"""


def test_update_from_0_1_0_keeps_tracking_versions_history_tokens_and_grants():
    if PG not in RELEASED_FOR["0.1.0"]:
        pytest.skip(f"0.1.0 was never built for PostgreSQL {PG}")
    lib = package("0.1.0")
    cluster = ExtraCluster("test-cluster-upgrade", PORT, f"dynamic_library_path = '{lib}:$libdir'")
    reader = "cr_upg_" + uuid.uuid4().hex[:6]
    try:
        with cluster.connect() as c:
            c.execute("CREATE EXTENSION pg_changerelay VERSION '0.1.0'")
            c.execute("CREATE TABLE items (id int PRIMARY KEY, tenant text, doc jsonb)")
            c.execute("ALTER TABLE items REPLICA IDENTITY FULL")
            c.execute("SELECT changerelay.track('items', 'items')")
            c.execute(f"CREATE ROLE {reader} LOGIN")
            c.execute(f"GRANT SELECT ON items TO {reader}")
            secret = c.execute("SELECT changerelay.create_token('svc', ARRAY['items'], true)").fetchone()[0]
            with cluster.connect() as w:
                w.autocommit = False
                w.execute("SELECT changerelay.set_metadata('{\"actor\":\"ann\"}')")
                w.execute("INSERT INTO items VALUES (1, 't1', '{\"n\": 12345678901234567890.5, \"a\": [1, \"x\"]}'), "
                          "(2, 't2', NULL)")
                w.commit()
            c.execute("UPDATE items SET tenant = 't3' WHERE id = 1")
            c.execute("DELETE FROM items WHERE id = 2")
            wait_until(lambda: len(c.execute("SELECT * FROM changerelay.changes(NULL, ARRAY['items'])").fetchall()) == 4,
                       timeout=30, what="0.1.0 relayed the changes")
            before = snapshot(c, "items", stored=True)
            assert before["changes"][0][12] == '{"actor": "ann"}' and "12345678901234567890.5" in before["changes"][0][10]
        # Install the new version: the library is the one in $libdir now; restart so the server loads it.
        with cluster.connect() as c:
            c.execute("ALTER SYSTEM SET dynamic_library_path = '$libdir'")
        subprocess.run([CLUSTER, "stop", cluster.dir], check=True, timeout=120)
        subprocess.run([CLUSTER, "start", cluster.dir, str(PORT)], check=True, timeout=120)
        with cluster.connect() as c:
            wait_until(lambda: "waiting for ALTER EXTENSION" in c.execute(
                "SELECT changerelay.status()->'worker'->>'state'").fetchone()[0], timeout=30,
                what="the new worker waiting for the update")
            c.execute("INSERT INTO items VALUES (3, 't1', NULL)")  # written before the update: kept by the slot
            c.execute("ALTER EXTENSION pg_changerelay UPDATE")
            assert c.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_changerelay'").fetchone() == ("0.2.0",)
            wait_until(lambda: len(c.execute("SELECT * FROM changerelay.changes(NULL, ARRAY['items'])").fetchall()) == 5,
                       timeout=30, what="the change written before the update relayed after it")
            after = snapshot(c, "items")
            for old, new in zip(before["changes"], after["changes"]):
                assert new == old, f"history, cursors and JSON kept: {old} became {new}"
            assert after["changes"][4][7:9] == ("insert", "3")
            assert after["tracked"] == before["tracked"] and after["tokens"] == before["tokens"]
            versions = dict((i, v) for i, v, _ in after["versions"])
            assert all(versions[i] >= v for i, v, _ in before["versions"]), "versions never go back"
            assert c.execute("SELECT count(*) FROM changerelay.dead_letters").fetchone() == (0,)
            # The update script creates what a fresh install does (the test cluster's extension is one).
            with connect() as fresh:
                fresh.execute("CREATE EXTENSION IF NOT EXISTS pg_changerelay")
                want = [r[0] for r in fresh.execute(SCHEMA).fetchall()]
            got = [r[0] for r in c.execute(SCHEMA).fetchall()]
            assert got == want, f"only after the update: {sorted(set(got) - set(want))}; only fresh: " \
                                f"{sorted(set(want) - set(got))}"
            # The token still works (the endpoint is the server's port + 1000), and grants are kept.
            wait_until(lambda: http("/versions/items", token=secret, port=PORT + 1000).status == 200, timeout=10,
                       what="the 0.1.0 token accepted")
        with psycopg.connect(f"host=127.0.0.1 port={PORT} user={reader} dbname=postgres", autocommit=True) as r:
            assert len(r.execute("SELECT * FROM changerelay.changes(NULL, ARRAY['items'])").fetchall()) == 5
    finally:
        cluster.stop()
