"""Safe inside a production database (README: Security): no value a table can hold, no transaction the worker
can not apply, no database setting and no transaction size stops the relay. Real clusters, real roles."""
import json
import os
import re
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from conftest import DATA, INSTALL, PORT, connect, extra_port
from test_endpoint import http
from test_relay import CLUSTER, ROOT, ExtraCluster, version, wait_until


def fresh(db, ddl="id int PRIMARY KEY, doc json"):
    table, label = "s_" + uuid.uuid4().hex[:10], "sl_" + uuid.uuid4().hex[:8]
    db.execute(f"CREATE TABLE {table} ({ddl})")
    db.execute("SELECT changerelay.track(%s, %s)", (table, label))
    return table, label


def cursor(db):
    return db.execute("SELECT changerelay.current_cursor()").fetchone()[0]


def changes(db, since, label, max_events=1000):
    return db.execute(
        "SELECT cursor, event_id, op, identifier, new, metadata FROM changerelay.changes(%s, %s, %s)",
        (since, [label], max_events)).fetchall()


def caught_up(db, label, n, since, timeout=30.0):
    return wait_until(lambda: len(r := changes(db, since, label)) >= n and r, timeout=timeout,
                      what=f"{n} changes of {label}")


def server_log():
    with open(os.path.join(DATA, "server.log"), errors="replace") as f:
        return f.read()


def still_relaying(db):
    """A later change of another table is delivered: the relay goes on."""
    table, label = fresh(db, "id int PRIMARY KEY")
    start = cursor(db)
    db.execute(f"INSERT INTO {table} VALUES (1)")
    (row,) = caught_up(db, label, 1, start)
    # Shared memory moves right after the history commits.
    wait_until(lambda: version(db, label, "1") == row[1], what="the version moved")


def test_values_jsonb_refuses_are_kept_and_the_relay_goes_on(db):
    table, label = fresh(db)
    start = cursor(db)
    db.execute(f"INSERT INTO {table} VALUES (1, %s)", ('{"a":"\\u0000"}',))
    db.execute(f"INSERT INTO {table} VALUES (2, %s)", ("[1e1000000]",))
    db.execute(f"INSERT INTO {table} VALUES (3, %s)", ('{"ok":true}',))
    rows = caught_up(db, label, 3, start)
    assert [r[3] for r in rows] == ["1", "2", "3"]
    nul, huge, ok = (r[4] for r in rows)
    assert nul["id"] == 1 and nul["doc"]["$changerelay"] == "unrepresentable", nul
    assert nul["doc"]["json"] == '{"a":"\\u0000"}', "the original text is kept"
    assert huge["doc"]["json"] == "[1e1000000]" and ok["doc"] == {"ok": True}
    assert version(db, label, "3") == rows[2][1] and version(db, label, "1") == rows[0][1]
    # The endpoint sends the value as the table holds it.
    token = db.execute("SELECT changerelay.create_token(%s, %s, true)",
                       ("tok_" + uuid.uuid4().hex[:8], [label])).fetchone()[0]
    # The endpoint loads new tokens within a second of their creation.
    resp = wait_until(lambda: (r := http(f"/changes?labels={label}&since={start}&wait=0s", token=token)).status
                      != 401 and r, timeout=15, what="the new token accepted")
    assert resp.status == 200, resp
    assert '"doc":{"a":"\\u0000"}' in resp.body and '"doc":[1e1000000]' in resp.body, resp.body
    still_relaying(db)


def test_large_values_become_markers_naming_their_size_and_a_row_near_1gb_passes(db):
    table, label = fresh(db, "id int PRIMARY KEY, a text, b text, c text")
    start = cursor(db)
    db.execute(f"INSERT INTO {table} VALUES (1, repeat('x', 1000000), NULL, NULL)")
    db.execute(f"INSERT INTO {table} VALUES (2, repeat('y', 300 * 1024 * 1024), NULL, NULL)")
    # Three 300 MB values (compressible, so the table stores them small): a row of 900 MB.
    db.execute(f"INSERT INTO {table} SELECT 3, repeat('a', 300 << 20), repeat('b', 300 << 20), repeat('c', 300 << 20)")
    rows = caught_up(db, label, 3, start, timeout=120)
    assert len(rows[0][4]["a"]) == 1000000, "a value under changerelay.max_value_size is kept whole"
    assert rows[1][4]["a"] == {"$changerelay": "omitted", "bytes": 300 * 1024 * 1024}
    assert [rows[2][4][c]["bytes"] for c in "abc"] == [300 << 20] * 3
    assert version(db, label, "3") == rows[2][1]
    still_relaying(db)


def test_max_value_size_is_a_plugin_option_too(db):
    from conftest import Slot
    s = Slot(db)
    try:
        db.execute("CREATE TEMP TABLE IF NOT EXISTS _unused (x int)")  # temp tables are not decoded
        t = "mv_" + uuid.uuid4().hex[:8]
        db.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v text)")
        db.execute(f"INSERT INTO {t} VALUES (1, repeat('z', 5000))")
        ins = [e for e in s.peek(max_value_size=1024) if e["type"] == "insert" and e["table"] == t]
        assert ins[0]["new"]["v"] == {"$changerelay": "omitted", "bytes": 5000}
        ins = [e for e in s.peek() if e["type"] == "insert" and e["table"] == t]
        assert ins[0]["new"]["v"] == "z" * 5000
        with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
            s.peek(max_value_size=0)
        assert "max_value_size" in str(err.value)
        db.execute(f"DROP TABLE {t}")
    finally:
        s.drop()


def test_metadata_of_any_size_through_emit_message(db):
    table, label = fresh(db, "id int PRIMARY KEY")
    start = cursor(db)
    before = server_log().count("left out")
    with connect() as c:
        c.autocommit = False
        c.execute("SELECT pg_logical_emit_message(true, 'changerelay.metadata', repeat('x', 10 * 1024 * 1024))")
        c.execute(f"INSERT INTO {table} VALUES (1)")
        c.commit()
        c.execute("SELECT pg_logical_emit_message(true, 'changerelay.metadata', '[1, 2]')")
        c.execute(f"INSERT INTO {table} VALUES (2)")
        c.commit()
        c.execute("SELECT pg_logical_emit_message(true, 'changerelay.metadata', '{\"who\":\"ann\"}')")
        for key in ("big1", "big2"):  # 40 kB each: the second would take the transaction past 64 kB
            c.execute("SELECT pg_logical_emit_message(true, 'changerelay.metadata', "
                      f"'{{\"{key}\":\"' || repeat('y', 40000) || '\"}}')")
        c.execute(f"INSERT INTO {table} VALUES (3)")
        c.commit()
        c.execute("SELECT pg_logical_emit_message(true, 'changerelay.metadata', convert_to('{\"s\":\"\\u0000\"}', 'UTF8'))")
        c.execute(f"INSERT INTO {table} VALUES (4)")
        c.commit()
    rows = caught_up(db, label, 4, start)
    m = [r[5] for r in rows]
    assert "more than the limit" in m[0]["$changerelay"]["metadata_omitted"] and m[0]["$changerelay"]["bytes"] == 10 << 20
    assert "JSON object" in m[1]["$changerelay"]["metadata_omitted"]
    assert m[2]["who"] == "ann" and len(m[2]["big1"]) == 40000 and "big2" not in m[2]
    assert "would reach" in m[2]["$changerelay"]["metadata_omitted"]
    assert m[3]["s"]["$changerelay"] == "unrepresentable", "jsonb refuses \\u0000: shown as a marker"
    wait_until(lambda: server_log().count("left out") >= before + 3, what="one WARNING per message left out")
    still_relaying(db)


def test_a_transaction_that_can_not_be_applied_becomes_a_dead_letter(db):
    table, label = fresh(db, "id int PRIMARY KEY, v text")
    other, other_label = fresh(db, "id int PRIMARY KEY")
    start = cursor(db)
    dead0 = db.execute("SELECT changerelay.status()->'worker'->>'dead_letters'").fetchone()[0]
    db.execute(f"ALTER SYSTEM SET changerelay.debug_fail_label = '{label}'")
    db.execute("SELECT pg_reload_conf()")
    try:
        # The worker reloads its settings when it next wakes: write until a transaction is refused.
        n = 0

        def refused():
            nonlocal n
            n += 1
            db.execute(f"INSERT INTO {table} VALUES (%s, 'poison')", (n,))
            return wait_until(lambda: db.execute("SELECT count(*) FROM changerelay.dead_letters d "
                                                 "WHERE %s = ANY (d.labels)", (label,)).fetchone()[0]
                              or len(changes(db, start, label)) >= n, timeout=20, what="applied or refused") \
                and db.execute("SELECT count(*) FROM changerelay.dead_letters d WHERE %s = ANY (d.labels)",
                               (label,)).fetchone()[0] > 0

        wait_until(refused, timeout=60, what="a dead letter")
        event_id, error, frames = db.execute(
            "SELECT event_id, error, frames FROM changerelay.dead_letters WHERE %s = ANY (labels)", (label,)).fetchone()
        assert "debug_fail_label" in error and frames >= 3, "begin, the insert, commit"
        decoded = [r[0] for r in db.execute("SELECT changerelay.decode(frame) FROM changerelay.dead_letter_frames "
                                            "WHERE event_id = %s ORDER BY n", (event_id,)).fetchall()]
        assert any(d["type"] == "insert" and d["new"]["v"] == "poison" for d in decoded), decoded
        # Its versions moved (every row of the label: caches reload), and the worker says so.
        assert version(db, label) >= event_id and version(db, label, "no-such-row") >= event_id
        st = db.execute("SELECT changerelay.status()").fetchone()[0]
        assert int(st["worker"]["dead_letters"]) > int(dead0 or 0) and st["worker"]["state"] == "streaming"
        assert "recorded in changerelay.dead_letters" in server_log()
        # Other labels are relayed meanwhile.
        s2 = cursor(db)
        db.execute(f"INSERT INTO {other} VALUES (1)")
        caught_up(db, other_label, 1, s2)
    finally:
        db.execute("ALTER SYSTEM RESET changerelay.debug_fail_label")
        db.execute("SELECT pg_reload_conf()")
    # Once the fault is gone, the label is relayed again.
    s3 = cursor(db)

    def delivered():
        # A write the worker read before it reloaded its settings still fails: write again after a while.
        db.execute(f"INSERT INTO {table} VALUES (%s, 'fine')", (10_000 + int(time.monotonic() * 1000) % 1_000_000,))
        until = time.monotonic() + 10
        while time.monotonic() < until:
            if changes(db, s3, label):
                return True
            time.sleep(0.05)
        return False

    wait_until(delivered, timeout=60, what="the label relayed again")


def worker_pid(db):
    return wait_until(lambda: db.execute("SELECT (changerelay.status()->'worker'->>'pid')::int").fetchone()[0],
                      what="worker pid")


def proc_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1))


def test_a_2m_row_transaction_is_applied_in_bounded_memory(db):
    """The worker's peak RSS stays below 256 MB, and its own (anonymous) memory below 128 MB, while it applies
    2,000,000 rows of one transaction, which readers then see whole (README: Security, limits). RSS also counts
    the shared buffers the worker touched: at most this cluster's shared_buffers (128 MB)."""
    table, label = fresh(db, "id int PRIMARY KEY, v text")
    start = cursor(db)
    pid = worker_pid(db)
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    anon = [proc_kb(pid, "RssAnon")]
    done = threading.Event()

    def sample():
        while not done.is_set():
            anon.append(proc_kb(pid, "RssAnon"))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        db.execute(f"INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, 2000000) g")
        wait_until(lambda: version(db, label, "2000000"), timeout=600, what="2M rows applied")
    finally:
        done.set()
        sampler.join()
    assert worker_pid(db) == pid, "the worker did not restart"
    peak = proc_kb(pid, "VmHWM")
    print(f"worker for 2,000,000 rows: VmHWM {peak // 1024} MB, RssAnon peak {max(anon) // 1024} MB")
    assert peak < 256 * 1024, f"peak RSS {peak // 1024} MB"
    assert max(anon) < 128 * 1024, f"peak anonymous memory {max(anon) // 1024} MB"
    n, events = db.execute("SELECT sum(changes), count(DISTINCT event_id) FROM changerelay.history WHERE label = %s",
                           (label,)).fetchone()
    assert (n, events) == (2_000_000, 1), "one transaction, every row, whole"
    page = changes(db, start, label, max_events=10)
    assert [r[3] for r in page] == [str(i) for i in range(1, 11)]
    still_relaying(db)


def test_the_worker_ignores_what_a_database_owner_sets():
    """A database owner who is not a superuser sets search_path to a schema with their own operator, and makes
    the database read-only with a tiny statement_timeout. The worker connects to that database and never runs
    the owner's code, and keeps relaying."""
    cluster = ExtraCluster("test-cluster-owner", extra_port("owner"), "changerelay.database = 'appdb'")
    try:
        with cluster.connect() as su:
            su.execute("CREATE ROLE app_owner LOGIN")
            su.execute("CREATE DATABASE appdb OWNER app_owner")
        with cluster.connect("appdb") as su:
            su.execute("CREATE EXTENSION pg_changerelay")
            su.execute("CREATE TABLE public.items (id text PRIMARY KEY, n int)")
            su.execute("ALTER TABLE public.items OWNER TO app_owner")
            su.execute("SELECT changerelay.track('public.items', 'items')")
        with cluster.connect("appdb", user="app_owner") as owner:
            owner.execute("CREATE SCHEMA evil")
            owner.execute("CREATE TABLE evil.calls (who text, at timestamptz DEFAULT now())")
            owner.execute("GRANT INSERT ON evil.calls TO PUBLIC")
            owner.execute("GRANT USAGE ON SCHEMA evil TO PUBLIC")
            for lt, rt in [("text", "text"), ("name", "name"), ("bigint", "bigint"), ("oid", "oid")]:
                owner.execute(f"""CREATE FUNCTION evil.eq(a {lt}, b {rt}) RETURNS bool LANGUAGE plpgsql AS $$
                                  BEGIN INSERT INTO evil.calls (who) VALUES (current_user);
                                        RETURN a OPERATOR(pg_catalog.=) b; END $$""")
                owner.execute(f"CREATE OPERATOR evil.= (LEFTARG = {lt}, RIGHTARG = {rt}, FUNCTION = evil.eq)")
            owner.execute("ALTER DATABASE appdb SET search_path = evil, pg_catalog, public")
            owner.execute("ALTER DATABASE appdb SET default_transaction_read_only = on")
            owner.execute("ALTER DATABASE appdb SET statement_timeout = '1ms'")
            owner.execute("ALTER DATABASE appdb SET work_mem = '64kB'")
        with cluster.connect("appdb") as su:
            su.execute("SET search_path = pg_catalog, public")
            su.execute("SET default_transaction_read_only = off")
            su.execute("SET statement_timeout = 0")
            # The worker reconnects and so picks up the database's settings.
            su.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'pg_changerelay relay'")
            wait_until(lambda: su.execute("SELECT changerelay.status()->'worker'->>'state'").fetchone()[0] == "streaming",
                       timeout=30, what="worker back")
            su.execute("INSERT INTO public.items VALUES ('a', 1)")
            wait_until(lambda: (su.execute("SELECT changerelay.version('items', 'a')").fetchone()[0] or 0) > 0,
                       timeout=30, what="the change relayed")
            rows = su.execute("SELECT op, identifier FROM changerelay.changes(NULL, ARRAY['items'])").fetchall()
            assert rows == [("insert", "a")]
            calls = su.execute("SELECT who FROM evil.calls").fetchall()
            assert calls == [], f"the owner's operator ran as {calls}"
    finally:
        cluster.stop()


def test_text_that_is_not_utf8_in_a_sql_ascii_database():
    cluster = ExtraCluster("test-cluster-sqlascii", extra_port("sqlascii"), "", encoding="SQL_ASCII")
    try:
        with cluster.connect() as c:
            c.execute("SET client_encoding = 'UTF8'")  # SQL_ASCII passes bytes through; the relay's are UTF-8
            c.execute("CREATE EXTENSION pg_changerelay")
            c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            c.execute("SELECT changerelay.track('t', 't')")
            c.execute("INSERT INTO t VALUES (1, E'caf\\xe9 \\xff\\xfe')")
            c.execute("INSERT INTO t VALUES (2, 'plain')")
            wait_until(lambda: c.execute("SELECT changerelay.version('t', '2')").fetchone()[0], timeout=30,
                       what="both rows relayed")
            rows = c.execute("SELECT identifier, new FROM changerelay.changes(NULL, ARRAY['t'])").fetchall()
            assert rows[0][0] == "1" and rows[0][1]["v"] == "caf\ufffd \ufffd\ufffd", rows
            assert rows[1][1]["v"] == "plain"
    finally:
        cluster.stop()


def test_jsonb_and_text_in_a_latin1_database():
    """jsonb's strings are stored in the database encoding; the plugin reads jsonb itself only in UTF-8
    databases (LATIN1's "\xc3\xa9" is two characters that look like UTF-8's one)."""
    cluster = ExtraCluster("test-cluster-latin1", extra_port("latin1"), "", encoding="LATIN1")
    try:
        with cluster.connect() as c:
            c.execute("SET client_encoding = 'UTF8'")
            c.execute("CREATE TABLE t (id int PRIMARY KEY, v text, j jsonb)")
            c.execute("SELECT pg_create_logical_replication_slot('latin1', 'pg_changerelay')")
            c.execute("""INSERT INTO t VALUES (1, 'Ã© é', jsonb_build_object('k', 'Ã©', 'n', 1.50))""")
            # The plugin writes UTF-8 whatever the database encoding: read its bytes, not LATIN1 text.
            (data,) = [json.loads(bytes(d).decode()) for (d,) in c.execute(
                "SELECT data FROM pg_logical_slot_get_binary_changes('latin1', NULL, NULL)").fetchall()
                if json.loads(bytes(d).decode())["type"] == "insert"]
            assert data["new"]["v"] == "Ã© é" and data["new"]["j"] == {"k": "Ã©", "n": 1.50}, data
    finally:
        cluster.stop()


def test_ddl_on_a_tracked_table_interleaved_with_endpoint_and_sql_reads(db):
    """Each DDL is a catalog-changing transaction the worker decodes; the worker's own queries (answering the
    endpoint) and SQL readers then see the new shape."""
    table, label = fresh(db, "id int PRIMARY KEY, a text")
    token = db.execute("SELECT changerelay.create_token(%s, %s, true)",
                       ("tok_" + uuid.uuid4().hex[:8], [label])).fetchone()[0]
    start = cursor(db)
    steps = [
        (f"ALTER TABLE {table} ADD COLUMN b int", f"INSERT INTO {table} VALUES (1, 'x', 10)", {"id": 1, "a": "x", "b": 10}),
        (f"ALTER TABLE {table} RENAME COLUMN a TO c", f"UPDATE {table} SET c = 'y' WHERE id = 1", {"id": 1, "c": "y", "b": 10}),
        (f"ALTER TABLE {table} ALTER COLUMN b TYPE text", f"INSERT INTO {table} VALUES (2, 'z', '20')",
         {"id": 2, "c": "z", "b": "20"}),
        (f"ALTER TABLE {table} DROP COLUMN c", f"INSERT INTO {table} VALUES (3, '30')", {"id": 3, "b": "30"}),
        (f"CREATE INDEX ON {table} (b)", f"DELETE FROM {table} WHERE id = 2", None),
    ]
    for n, (ddl, dml, expect) in enumerate(steps, start=1):
        db.execute(ddl)
        db.execute(dml)
        rows = caught_up(db, label, n, start)
        assert rows[-1][4] == expect, (ddl, rows[-1])
        resp = http(f"/changes?labels={label}&since={start}&wait=0s", token=token)
        assert resp.status == 200, resp
        sent = resp.json()["changes"]
        assert len(sent) == n and sent[-1]["new"] == expect, (ddl, sent[-1])
        assert http(f"/versions/{label}", token=token).status == 200
    st = db.execute("SELECT changerelay.status()").fetchone()[0]
    assert st["worker"]["state"] == "streaming"
    still_relaying(db)


# ---------------------------------------------------------------------------------------------------------------
# Privileges, with real non-superuser roles
# ---------------------------------------------------------------------------------------------------------------


def role(db, name, *grants):
    db.execute(f"DROP ROLE IF EXISTS {name}")
    db.execute(f"CREATE ROLE {name} LOGIN")
    for g in grants:
        db.execute(g.format(role=name))
    return name


def as_role(name):
    return psycopg.connect(f"host=127.0.0.1 port={PORT} user={name} dbname=postgres", autocommit=True)


def test_a_token_reads_only_what_its_creator_may_select(db):
    payroll, payroll_label = fresh(db, "id int PRIMARY KEY, salary int")
    public, public_label = fresh(db, "id int PRIMARY KEY, v text")
    admin = role(db, "cr_tok_admin_" + uuid.uuid4().hex[:6], "GRANT changerelay_admin TO {role}",
                 f"GRANT SELECT ON {public} TO {{role}}")
    try:
        with as_role(admin) as a:
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                a.execute("SELECT changerelay.create_token('cr_pay', %s, true)", ([payroll_label],))
            assert payroll in str(err.value.diag.message_detail)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                a.execute("INSERT INTO changerelay.tokens VALUES ('x', sha256('s'), ARRAY['a'], true, now(), 'x', 10)")
            name = "cr_pub_" + uuid.uuid4().hex[:6]
            secret = a.execute("SELECT changerelay.create_token(%s, %s, true)", (name, [public_label])).fetchone()[0]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                a.execute("DELETE FROM changerelay.tokens")
        db.execute(f"INSERT INTO {public} VALUES (1, 'a')")
        wait_until(lambda: http(f"/changes?labels={public_label}&wait=0s", token=secret).status == 200,
                   what="the token served")
        # The creator loses SELECT: the token stops reading the label within about a second.
        db.execute(f"REVOKE SELECT ON {public} FROM {admin}")
        t0 = time.monotonic()
        wait_until(lambda: http(f"/changes?labels={public_label}&wait=0s", token=secret).status == 403,
                   timeout=5, what="the token narrowed")
        print(f"token narrowed {time.monotonic() - t0:.2f} s after REVOKE")
        # Back, then the label gains a table the creator can not read.
        db.execute(f"GRANT SELECT ON {public} TO {admin}")
        wait_until(lambda: http(f"/changes?labels={public_label}&wait=0s", token=secret).status == 200,
                   timeout=5, what="the token widened again")
        db.execute(f"CREATE TABLE {public}_more (id int PRIMARY KEY)")
        db.execute("SELECT changerelay.track(%s, %s)", (f"{public}_more", public_label))
        wait_until(lambda: http(f"/changes?labels={public_label}&wait=0s", token=secret).status == 403,
                   timeout=5, what="the token narrowed by the new table")
    finally:
        db.execute("DELETE FROM changerelay.tokens WHERE created_by = %s", (admin,))
        db.execute(f"DROP OWNED BY {admin}")
        db.execute(f"DROP ROLE {admin}")


def test_a_token_removed_by_delete_or_truncate_stops_within_a_second(db):
    table, label = fresh(db, "id int PRIMARY KEY")
    for how in ("DELETE FROM changerelay.tokens WHERE name = %s", "TRUNCATE changerelay.tokens"):
        name = "cr_del_" + uuid.uuid4().hex[:6]
        secret = db.execute("SELECT changerelay.create_token(%s, %s)", (name, [label])).fetchone()[0]
        wait_until(lambda: http(f"/versions/{label}", token=secret).status == 200, what="token live")
        db.execute(how, (name,) if "%s" in how else None)
        t0 = time.monotonic()
        wait_until(lambda: http(f"/versions/{label}", token=secret).status == 401, timeout=5, what="token gone")
        assert time.monotonic() - t0 < 1.5, f"{how}: refused after {time.monotonic() - t0:.2f} s"


def test_a_label_whose_last_table_is_untracked_is_not_public(db):
    table, label = fresh(db, "id int PRIMARY KEY")
    db.execute(f"INSERT INTO {table} VALUES (1)")
    wait_until(lambda: version(db, label, "1"), what="a version")
    reader = role(db, "cr_reader_" + uuid.uuid4().hex[:6], f"GRANT SELECT ON {table} TO {{role}}")
    try:
        with as_role(reader) as r:
            assert r.execute("SELECT count(*) FROM changerelay.versions(%s)", (label,)).fetchone()[0] == 2
            db.execute("SELECT changerelay.untrack(%s)", (table,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                r.execute("SELECT * FROM changerelay.versions(%s)", (label,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                r.execute("SELECT changerelay.version(%s, '1')", (label,))
    finally:
        db.execute(f"DROP OWNED BY {reader}")
        db.execute(f"DROP ROLE {reader}")


def test_row_level_security_is_honoured_in_history_and_versions(db):
    table, label = fresh(db, "id int PRIMARY KEY, tenant text, v text")
    db.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    db.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    db.execute(f"CREATE POLICY own ON {table} FOR SELECT USING (tenant = current_user)")
    a = role(db, "cr_ta_" + uuid.uuid4().hex[:6], f"GRANT SELECT ON {table} TO {{role}}")
    b = role(db, "cr_tb_" + uuid.uuid4().hex[:6], f"GRANT SELECT ON {table} TO {{role}}")
    try:
        start = cursor(db)
        db.execute(f"INSERT INTO {table} VALUES (1, %s, 'a1'), (2, %s, 'b1'), (3, %s, 'a2')", (a, b, a))
        db.execute(f"UPDATE {table} SET v = 'b2' WHERE id = 2")
        db.execute(f"DELETE FROM {table} WHERE id = 3")
        db.execute(f"UPDATE {table} SET tenant = %s WHERE id = 1", (b,))  # moves out of a's sight
        caught_up(db, label, 6, start)
        with as_role(a) as ra:
            got = [(r[2], r[3]) for r in changes(ra, start, label)]
            assert got == [("insert", "1"), ("insert", "3"), ("delete", "3")], got
            watched = ra.execute("SELECT op, identifier FROM changerelay.watch(%s, %s, '1 second')",
                                 (start, [label])).fetchall()
            assert watched == got
            ids = [r[0] for r in ra.execute("SELECT identifier FROM changerelay.versions(%s)", (label,))]
            assert ids == ["all"], "row 1 now belongs to b, 3 is gone: a sees no identifier"
            assert ra.execute("SELECT changerelay.version(%s, '2')", (label,)).fetchone()[0] is None
        with as_role(b) as rb:
            got = [(r[2], r[3]) for r in changes(rb, start, label)]
            assert got == [("insert", "2"), ("update", "2"), ("update", "1")], got
            ids = [r[0] for r in rb.execute("SELECT identifier FROM changerelay.versions(%s)", (label,))]
            assert ids == ["all", "1", "2"]
            vmap = rb.execute("SELECT changerelay.version_map(%s)", (label,)).fetchone()[0]
            assert set(vmap["data"]) == {"all", "1", "2"}
            assert rb.execute("SELECT changerelay.version(%s, '2')", (label,)).fetchone()[0] is not None
    finally:
        for r in (a, b):
            db.execute(f"DROP OWNED BY {r}")
            db.execute(f"DROP ROLE {r}")


def test_installing_under_a_running_server_leaves_it_running(db):
    """scripts/install.sh (what `make install`, `make run` and `make test` use) renames the new library into place:
    the running postmaster, worker and backends keep the file they mapped."""
    pid = worker_pid(db)
    out = subprocess.run(INSTALL, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    with connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert worker_pid(db) == pid, "the worker kept running"
    still_relaying(db)


def test_a_fast_shutdown_is_not_held_up_by_a_synchronous_standby_that_is_gone():
    """synchronous_standby_names names a standby that never connects, so the worker's commits wait for it, as
    every backend's do. A fast shutdown ends that wait for the worker as for a client backend (PostgreSQL's
    WARNING: committed locally, maybe not replicated) and the server stops in seconds; before, the worker waited
    on and pg_ctl gave up after a minute."""
    cluster = ExtraCluster("test-cluster-syncgone", extra_port("syncgone"), "synchronous_standby_names = 'nobody'")
    try:
        with cluster.connect() as c:
            c.execute("SET synchronous_commit = local")   # this session does not wait for the standby
            c.execute("CREATE EXTENSION pg_changerelay")
            c.execute("CREATE TABLE items (id int PRIMARY KEY)")
            c.execute("SELECT changerelay.track('items', 'items')")
            c.execute("INSERT INTO items VALUES (1)")
            wait_until(lambda: c.execute("SELECT wait_event FROM pg_stat_activity "
                                         "WHERE backend_type = 'pg_changerelay relay'").fetchone() == ("SyncRep",),
                       timeout=30, what="the worker's commit waiting for the standby")
        started = time.monotonic()
        stopped = subprocess.run([CLUSTER, "stop", cluster.dir], env={**cluster.env, "STOP_TIMEOUT": "30"},
                                 capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        assert stopped.returncode == 0, f"no fast shutdown in {took:.0f} s: {stopped.stderr}"
        log = cluster.log()
        assert "canceling the wait for synchronous replication" in log, log[-3000:]
        assert "PANIC" not in log
    finally:
        cluster.stop()
