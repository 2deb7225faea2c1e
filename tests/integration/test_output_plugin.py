"""The pg_changerelay output plugin against a real cluster."""
import json
import math
import os
import re
import subprocess
import threading

import psycopg
import pytest

from conftest import DSN, PORT, Slot, connect, rows


def fresh_table(db, name, ddl):
    db.execute(f"DROP TABLE IF EXISTS {name} CASCADE")
    db.execute(f"CREATE TABLE {name} ({ddl})")


def test_insert_update_delete_default_identity(db, slot):
    fresh_table(db, "t_basic", "id int PRIMARY KEY, name text, n int")
    db.execute("INSERT INTO t_basic VALUES (1, 'a', 10)")
    db.execute("UPDATE t_basic SET name = 'b' WHERE id = 1")
    db.execute("DELETE FROM t_basic WHERE id = 1")
    events = slot.get()
    assert [e["type"] for e in events] == [
        "begin", "insert", "commit", "begin", "update", "commit", "begin", "delete", "commit"]
    ins, upd, dele = rows(events)
    assert ins["schema"] == "public" and ins["table"] == "t_basic"
    assert ins["key"] == {"id": 1} and ins["new"] == {"id": 1, "name": "a", "n": 10}
    assert "old" not in ins and ins["seq"] == 0
    assert upd["key"] == {"id": 1} and upd["new"] == {"id": 1, "name": "b", "n": 10} and "old" not in upd
    assert dele["key"] == {"id": 1} and "new" not in dele and "old" not in dele
    for e in events:
        assert isinstance(e["event_id"], int) and e["event_id"] > 0
    begin, commit = events[0], events[2]
    assert begin["event_id"] == commit["event_id"] == ins["event_id"]
    assert begin["xid"] == commit["xid"] == ins["xid"]
    assert commit["changes"] == 1 and "metadata" not in commit
    hi, lo = begin["lsn"].split("/")
    assert (int(hi, 16) << 32 | int(lo, 16)) == begin["event_id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00", begin["commit_time"])


def test_commit_time_matches_the_commit(db, slot):
    fresh_table(db, "t_time", "id int PRIMARY KEY")
    before = db.execute("SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint").fetchone()[0]
    db.execute("INSERT INTO t_time VALUES (1)")
    after = db.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").fetchone()[0]
    begin = slot.get()[0]
    assert before <= begin["ts"] <= after
    got = db.execute("SELECT floor(extract(epoch FROM %s::timestamptz) * 1000)::bigint", (begin["commit_time"],)).fetchone()[0]
    assert got == begin["ts"]


def test_update_that_changes_the_key_reports_the_old_key(db, slot):
    fresh_table(db, "t_key", "id int PRIMARY KEY, v text")
    db.execute("INSERT INTO t_key VALUES (1, 'x')")
    db.execute("UPDATE t_key SET id = 2 WHERE id = 1")
    upd = rows(slot.get())[1]
    assert upd["type"] == "update"
    assert upd["key"] == {"id": 1}
    assert upd["new"] == {"id": 2, "v": "x"}
    assert "old" not in upd


def test_replica_identity_full_sends_the_old_row(db, slot):
    fresh_table(db, "t_full", "id int PRIMARY KEY, v text, w int")
    db.execute("ALTER TABLE t_full REPLICA IDENTITY FULL")
    db.execute("INSERT INTO t_full VALUES (1, 'x', 5)")
    db.execute("UPDATE t_full SET v = 'y' WHERE id = 1")
    db.execute("DELETE FROM t_full WHERE id = 1")
    events = slot.peek()
    _, upd, dele = rows(events)
    assert upd["key"] == {"id": 1}
    assert upd["old"] == {"id": 1, "v": "x", "w": 5} and upd["new"] == {"id": 1, "v": "y", "w": 5}
    assert dele["old"] == {"id": 1, "v": "y", "w": 5} and dele["key"] == {"id": 1}
    # include_old=false drops the old row but keeps the key.
    _, upd, dele = rows(slot.get(include_old=False))
    assert "old" not in upd and "old" not in dele and dele["key"] == {"id": 1}


def test_full_identity_without_a_key_uses_the_whole_row(db, slot):
    fresh_table(db, "t_nokey_full", "a int, b text")
    db.execute("ALTER TABLE t_nokey_full REPLICA IDENTITY FULL")
    db.execute("INSERT INTO t_nokey_full VALUES (1, 'x')")
    db.execute("DELETE FROM t_nokey_full")
    ins, dele = rows(slot.get())
    assert ins["key"] == {"a": 1, "b": "x"}
    assert dele["key"] == {"a": 1, "b": "x"} and dele["old"] == {"a": 1, "b": "x"}


def test_table_without_identity_has_null_key(db, slot):
    fresh_table(db, "t_nokey", "a int")
    db.execute("INSERT INTO t_nokey VALUES (1)")
    (ins,) = rows(slot.get())
    assert ins["key"] is None and ins["new"] == {"a": 1}


def test_truncate_of_several_tables_with_cascade(db, slot):
    db.execute("DROP TABLE IF EXISTS t_child, t_parent, t_other CASCADE")
    db.execute("CREATE TABLE t_parent (id int PRIMARY KEY)")
    db.execute("CREATE TABLE t_child (id int PRIMARY KEY, p int REFERENCES t_parent)")
    db.execute("CREATE TABLE t_other (id serial PRIMARY KEY)")
    db.execute("INSERT INTO t_parent VALUES (1); INSERT INTO t_child VALUES (1, 1); INSERT INTO t_other DEFAULT VALUES")
    slot2 = Slot(db)
    try:
        db.execute("TRUNCATE t_parent, t_other RESTART IDENTITY CASCADE")
        events = slot2.get()
        (tr,) = rows(events)
        assert tr["type"] == "truncate"
        assert sorted(tr["tables"]) == ["public.t_child", "public.t_other", "public.t_parent"]
        assert tr["cascade"] is True and tr["restart_identity"] is True
        assert tr["seq"] == 0 and tr["event_id"] == events[0]["event_id"]
        assert events[-1]["changes"] == 1
    finally:
        slot2.drop()


def test_copy_of_100k_rows(db, slot):
    fresh_table(db, "t_copy", "id int PRIMARY KEY, v text")
    with db.cursor() as cur:
        with cur.copy("COPY t_copy (id, v) FROM STDIN") as copy:
            for i in range(100_000):
                copy.write_row((i, f"row {i}"))
    count, first, last, seqs_ok = db.execute(
        """SELECT count(*) FILTER (WHERE d->>'type' = 'insert'),
                  min((d->'new'->>'id')::int), max((d->'new'->>'id')::int),
                  bool_and((d->>'seq')::int = (d->'new'->>'id')::int) FILTER (WHERE d->>'type' = 'insert')
           FROM (SELECT data::jsonb AS d FROM pg_logical_slot_get_changes(%s, NULL, NULL)) s""",
        (slot.name,)).fetchone()
    assert (count, first, last, seqs_ok) == (100_000, 0, 99_999, True)


def test_rolled_back_savepoint_and_aborted_transaction_are_absent(db, slot):
    fresh_table(db, "t_sp", "id int PRIMARY KEY")
    with connect() as c:
        c.autocommit = False
        c.execute("INSERT INTO t_sp VALUES (1)")
        c.execute("SAVEPOINT s1")
        c.execute("INSERT INTO t_sp VALUES (2)")
        c.execute("ROLLBACK TO SAVEPOINT s1")
        c.execute("SAVEPOINT s2")
        c.execute("INSERT INTO t_sp VALUES (3)")
        c.execute("RELEASE SAVEPOINT s2")
        c.commit()
        c.execute("INSERT INTO t_sp VALUES (4)")
        c.rollback()
    events = slot.get()
    assert [r["new"]["id"] for r in rows(events)] == [1, 3]
    assert [r["seq"] for r in rows(events)] == [0, 1]
    assert [e["type"] for e in events] == ["begin", "insert", "insert", "commit"]


def test_alter_table_between_writes(db, slot):
    fresh_table(db, "t_alter", "id int PRIMARY KEY, a text")
    db.execute("INSERT INTO t_alter VALUES (1, 'x')")
    db.execute("ALTER TABLE t_alter ADD COLUMN b int DEFAULT 7")
    db.execute("INSERT INTO t_alter VALUES (2, 'y', 8)")
    db.execute("UPDATE t_alter SET a = 'z' WHERE id = 1")
    db.execute("ALTER TABLE t_alter DROP COLUMN a")
    db.execute("INSERT INTO t_alter VALUES (3, 9)")
    news = [r["new"] for r in rows(slot.get())]
    assert news == [{"id": 1, "a": "x"}, {"id": 2, "a": "y", "b": 8}, {"id": 1, "a": "z", "b": 7}, {"id": 3, "b": 9}]


def test_toast_values_changed_and_unchanged(db, slot):
    fresh_table(db, "t_toast", "id int PRIMARY KEY, big text, small int")
    db.execute("ALTER TABLE t_toast ALTER COLUMN big SET STORAGE EXTERNAL")
    big = "".join(chr(ord("a") + (i * 7919) % 26) for i in range(1_048_576))
    db.execute("INSERT INTO t_toast VALUES (1, %s, 1)", (big,))
    db.execute("UPDATE t_toast SET small = 2 WHERE id = 1")
    db.execute("UPDATE t_toast SET big = %s WHERE id = 1", (big[::-1],))
    ins, unchanged, changed = rows(slot.get())
    assert ins["new"]["big"] == big and "unchanged_toast" not in ins
    assert unchanged["unchanged_toast"] == ["big"] and "big" not in unchanged["new"]
    assert unchanged["new"] == {"id": 1, "small": 2}
    assert changed["new"]["big"] == big[::-1] and "unchanged_toast" not in changed


def test_common_types(db, slot):
    db.execute("DROP TABLE IF EXISTS t_types; DROP TYPE IF EXISTS mood; DROP DOMAIN IF EXISTS posint")
    db.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    db.execute("CREATE DOMAIN posint AS int CHECK (VALUE > 0)")
    db.execute("""CREATE TABLE t_types (
        id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, n numeric, f4 float4, f8 float8, f8nan float8,
        f8inf float8, b bool, t text, vc varchar(10), ba bytea, u uuid, d date, ts timestamptz,
        j json, jb jsonb, ia int[], ta text[], na numeric[], m2 int[], mood mood, dom posint,
        ja jsonb[], nul text)""")
    db.execute("""INSERT INTO t_types VALUES (1, -32768, 2147483647, 9223372036854775807,
        123456789012345678901234567890.000000001, 0.1, 1.0000000000000002, 'NaN', '-Infinity',
        true, E'quote " back \\\\ nl \n tab \t é', 'short', '\\x00ff', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
        '2026-11-21', '2026-11-21 15:00:00.123456+00', '{"a": [1, 2],
        "b": null}', '{"z": 1, "a": {"x": "y"}}', '{1,NULL,3}', '{"x","y z",NULL}', '{1.5,NaN}',
        '{{1,2},{3,4}}', 'happy', 5, ARRAY['{"k":1}'::jsonb], NULL)""")
    (ins,) = rows(slot.get())
    n = ins["new"]
    assert n["i2"] == -32768 and n["i4"] == 2147483647 and n["i8"] == 9223372036854775807
    assert n["n"] == "123456789012345678901234567890.000000001"
    assert n["f4"] == 0.1 and n["f8"] == 1.0000000000000002
    assert n["f8nan"] == "NaN" and n["f8inf"] == "-Infinity"
    assert n["b"] is True
    assert n["t"] == 'quote " back \\ nl \n tab \t é'
    assert n["vc"] == "short" and n["ba"] == "\\x00ff"
    assert n["u"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert n["d"] == "2026-11-21"
    assert n["ts"].startswith("2026-11-21 ") and ".123456" in n["ts"]
    assert n["j"] == {"a": [1, 2], "b": None}
    assert n["jb"] == {"z": 1, "a": {"x": "y"}}
    assert n["ia"] == [1, None, 3] and n["ta"] == ["x", "y z", None] and n["na"] == ["1.5", "NaN"]
    assert n["m2"] == [[1, 2], [3, 4]]
    assert n["mood"] == "happy" and n["dom"] == 5
    assert n["ja"] == [{"k": 1}] and n["nul"] is None


def test_event_ids_strictly_increase_across_concurrent_writers(db, slot):
    fresh_table(db, "t_conc", "w int, i int, PRIMARY KEY (w, i)")
    errors = []

    def writer(w):
        try:
            with connect() as c:
                for i in range(250):
                    c.execute("INSERT INTO t_conc VALUES (%s, %s)", (w, i))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    events = slot.peek(include_old=True)
    # Only the writers' transactions: the relay worker may commit its own (a version checkpoint) meanwhile.
    ours = {e["xid"] for e in events if e.get("table") == "t_conc"}
    commits = [e["event_id"] for e in events if e["type"] == "commit" and e["xid"] in ours]
    assert len(commits) == 1000
    assert all(a < b for a, b in zip(commits, commits[1:])), "event ids strictly increase"
    # The same ids for another slot and after re-decoding.
    again = [e["event_id"] for e in slot.peek(include_messages=False) if e["type"] == "commit" and e["xid"] in ours]
    assert again == commits
    inserted = sorted((r["new"]["w"], r["new"]["i"]) for r in rows(events) if r["table"] == "t_conc")
    assert inserted == [(w, i) for w in range(4) for i in range(250)]


def test_metadata_set_twice_merges_on_commit(db, slot):
    fresh_table(db, "t_meta", "id int PRIMARY KEY")
    with connect() as c:
        c.autocommit = False
        c.execute("SELECT changerelay.set_metadata('{\"user\":\"ann\",\"req\":\"r1\"}')")
        c.execute("INSERT INTO t_meta VALUES (1)")
        c.execute("SELECT changerelay.set_metadata('{\"user\":\"bob\",\"why\":\"fix\"}')")
        c.execute("INSERT INTO t_meta VALUES (2)")
        c.commit()
    events = slot.get(tables="public.t_meta")  # other transactions (the worker's) produce nothing
    types = [e["type"] for e in events]
    assert types == ["begin", "metadata", "insert", "metadata", "insert", "commit"]
    assert events[1]["metadata"] == {"user": "ann", "req": "r1"}
    assert events[3]["metadata"] == {"user": "bob", "why": "fix"}
    assert events[-1]["metadata"] == {"user": "bob", "req": "r1", "why": "fix"}
    assert events[-1]["changes"] == 2


def test_messages_transactional_and_not(db, slot):
    db.execute("SELECT pg_logical_emit_message(false, 'app.ping', 'hello')")
    with connect() as c:
        c.autocommit = False
        c.execute("SELECT pg_logical_emit_message(true, 'app.tx', '\\xff00'::bytea)")
        c.commit()
    events = slot.peek()
    ping = next(e for e in events if e.get("prefix") == "app.ping")
    assert ping == {"type": "message", "transactional": False, "lsn": ping["lsn"], "prefix": "app.ping", "content": "hello"}
    tx = next(e for e in events if e.get("prefix") == "app.tx")
    assert tx["transactional"] is True and tx["content"] is None and tx["content_bytea"] == "\\xff00"
    assert tx["event_id"] > 0
    assert [e["type"] for e in slot.get(include_messages=False)] == []


def test_options_tables_and_include_transaction(db, slot):
    db.execute("CREATE SCHEMA IF NOT EXISTS other")
    fresh_table(db, "t_inc", "id int PRIMARY KEY")
    fresh_table(db, "other.t_exc", "id int PRIMARY KEY")
    fresh_table(db, "other.settings", "id int PRIMARY KEY")
    with connect() as c:
        c.autocommit = False
        c.execute("INSERT INTO other.t_exc VALUES (1)")
        c.execute("INSERT INTO t_inc VALUES (1)")
        c.execute("INSERT INTO other.settings VALUES (1)")
        c.commit()
    db.execute("INSERT INTO other.t_exc VALUES (2)")  # a transaction with nothing included
    events = slot.peek(tables="public.*, *.settings")
    assert [(e["type"], e.get("table")) for e in events] == [
        ("begin", None), ("insert", "t_inc"), ("insert", "settings"), ("commit", None)]
    # seq counts every change, so the same change has the same (event_id, seq) in every stream
    assert [e["seq"] for e in rows(events)] == [1, 2]
    assert events[-1]["changes"] == 2
    bare = slot.peek(include_transaction=False, tables="other.t_exc")
    assert [(e["type"], e["new"]["id"]) for e in bare] == [("insert", 1), ("insert", 2)]


@pytest.mark.parametrize("opts,message", [
    ({"fromat": "json"}, 'option "fromat" is not recognized'),
    ({"format": "xml"}, 'invalid value "xml" for option "format"'),
    ({"include_old": "maybe"}, 'invalid value "maybe" for option "include_old"'),
    ({"include_transaction": "2"}, 'option "include_transaction"'),
    ({"tables": "nodot"}, 'invalid value for option "tables"'),
    ({"tables": "a.b.c"}, 'invalid value for option "tables"'),
])
def test_bad_options_are_rejected_and_the_slot_stays_usable(db, slot, opts, message):
    fresh_table(db, "t_opts", "id int PRIMARY KEY")
    db.execute("INSERT INTO t_opts VALUES (1)")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        slot.peek(**opts)
    assert message in str(err.value)
    assert err.value.diag.message_hint
    assert [e["type"] for e in slot.get()] == ["begin", "insert", "commit"]


def test_duplicate_option_is_rejected(db, slot):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="more than once"):
        db.execute("SELECT * FROM pg_logical_slot_peek_changes(%s, NULL, NULL, 'include_old', 'true', 'include_old', 'false')",
                   (slot.name,))
    db.execute("SELECT * FROM pg_logical_slot_peek_changes(%s, NULL, NULL)", (slot.name,))


def test_binary_format_needs_the_binary_functions(db, slot):
    with pytest.raises(psycopg.errors.FeatureNotSupported, match="binary output"):
        slot.peek(format="binary")


def test_json_and_binary_agree_through_decode(db, slot):
    fresh_table(db, "t_agree", "id int PRIMARY KEY, v text, f float8, j jsonb, a int[]")
    db.execute("ALTER TABLE t_agree REPLICA IDENTITY FULL")
    with connect() as c:
        c.autocommit = False
        c.execute("SELECT changerelay.set_metadata('{\"k\":\"v\"}')")
        c.execute("INSERT INTO t_agree SELECT g, 'v' || g, g / 3.0, jsonb_build_object('g', g), ARRAY[g, g+1] FROM generate_series(1, 50) g")
        c.commit()
    db.execute("UPDATE t_agree SET v = NULL, f = 'NaN' WHERE id % 7 = 0")
    db.execute("DELETE FROM t_agree WHERE id > 45")
    db.execute("TRUNCATE t_agree")
    db.execute("SELECT pg_logical_emit_message(false, 'p', 'c')")
    # Both reads stop at the same LSN: a transaction of another session committed between them must not count.
    end = db.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
    texts = slot.peek_raw(upto=end)
    frames = slot.peek_binary(upto=end)
    assert len(texts) == len(frames) > 50
    decoded = [db.execute("SELECT changerelay.decode(%s)", (f,)).fetchone()[0] for f in frames]
    assert decoded == [json.loads(t) for t in texts]
    assert sum(map(len, frames)) < sum(len(t.encode()) for t in texts)


def test_values_written_without_output_functions_read_as_postgres_writes_them(db, slot):
    """numeric, jsonb, date, timestamp, timestamptz and uuid are written from their stored form, not by their
    output functions: every value's text must be what Postgres prints (DateStyle ISO, TimeZone UTC), in both
    formats, whatever the decoding session's own settings."""
    fresh_table(db, "t_typed", "id int PRIMARY KEY, n numeric, jb jsonb, d date, ts timestamp, tz timestamptz, "
                               "u uuid, na numeric[], tza timestamptz[]")
    db.execute("""INSERT INTO t_typed
        SELECT g,
               CASE WHEN g % 11 = 0 THEN 'NaN'::numeric WHEN g % 13 = 0 THEN 'Infinity' WHEN g % 17 = 0 THEN '-Infinity'
                    ELSE round(((random() - 0.5) * 10 ^ (g % 40 - 20))::numeric, g % 25) END,
               CASE g % 5
                 WHEN 0 THEN jsonb_build_object('g', g, 'neg', -g / 7.0, 's', E'q"b\\\n\t\x01é', 'a', jsonb_build_array(g, NULL, true, false, '{}'::jsonb, '[]'::jsonb))
                 WHEN 1 THEN (SELECT jsonb_agg(x * 1.5) FROM generate_series(1, g % 90) x)
                 WHEN 2 THEN to_jsonb('scalar ' || g)
                 WHEN 3 THEN to_jsonb(g * 1000000000000.000001)
                 ELSE (SELECT jsonb_object_agg('k' || x, jsonb_build_object('n', x, 'deep', jsonb_build_array(jsonb_build_array(x)))) FROM generate_series(1, g % 40) x) END,
               CASE WHEN g = 1 THEN 'infinity'::date WHEN g = 2 THEN '-infinity' WHEN g = 3 THEN '0044-03-15 BC'
                    ELSE date '2000-01-01' + (g * 7919 % 2000000 - 1000000) END,
               CASE WHEN g = 1 THEN 'infinity'::timestamp WHEN g = 2 THEN '-infinity'
                    ELSE timestamp '2000-01-01' + (g * 104729 % 1000000 - 500000) * interval '1 day 00:00:01.000123' END,
               CASE WHEN g = 1 THEN '-infinity'::timestamptz WHEN g = 4 THEN '4713-01-01 00:00:00+00 BC'
                    ELSE timestamptz '1970-01-01 00:00:00+00' + g * interval '12345 s 6789 us' * g END,
               md5(g::text)::uuid,
               ARRAY[g / 3.0, -g, 'NaN'],
               ARRAY[timestamptz '2026-01-01 12:00:00+05' + g * interval '1 us', NULL]
        FROM generate_series(1, 400) g""")
    db.execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'")
    expected = {r[0]: r[1:] for r in db.execute(
        "SELECT id, n::text, jb::text, d::text, ts::text, tz::text, u::text, "
        "       ARRAY(SELECT x::text FROM unnest(na) x), ARRAY(SELECT x::text FROM unnest(tza) x) FROM t_typed").fetchall()}
    # The decoding session's own settings must not change a value's text.
    db.execute("SET TimeZone = 'America/New_York'; SET DateStyle = 'SQL, DMY'")
    end = db.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
    texts = slot.peek_raw(upto=end)
    frames = slot.peek_binary(upto=end)
    db.execute("RESET TimeZone; RESET DateStyle")
    changes = [json.loads(t) for t in texts if json.loads(t).get("table") == "t_typed"]
    assert len(changes) == 400
    for text in texts:
        change = json.loads(text)
        if change.get("table") != "t_typed":
            continue
        new = change["new"]
        n, jb, d, ts, tz, u, na, tza = expected[new["id"]]
        assert new["n"] == n and new["d"] == d and new["ts"] == ts and new["tz"] == tz and new["u"] == u, new
        # jsonb is embedded exactly as jsonb_out writes it.
        assert f'"jb":{jb}' in text, (jb, text)
        assert new["na"] == na and new["tza"] == tza, (new["na"], na, new["tza"], tza)
    decoded = [db.execute("SELECT changerelay.decode(%s)::text", (f,)).fetchone()[0] for f in frames]
    assert [json.loads(x) for x in decoded] == [json.loads(t) for t in texts]


def test_decode_rejects_garbage(db):
    for frame in (b"", b"\x01", b"\x02abc", b"\x01\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff"):
        with pytest.raises(psycopg.errors.InvalidBinaryRepresentation):
            db.execute("SELECT changerelay.decode(%s)", (frame,))
    assert db.execute("SELECT changerelay.decode(NULL) IS NULL").fetchone()[0]


def test_pg_recvlogical_receives_the_stream(db):
    name = "t_recvlogical"
    db.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (name,))
    base = ["pg_recvlogical", "-h", "127.0.0.1", "-p", str(PORT), "-U", "postgres", "-d", "postgres", "-S", name]
    subprocess.run(base + ["--create-slot", "--plugin=pg_changerelay"], check=True, timeout=30)
    try:
        fresh_table(db, "t_recv", "id int PRIMARY KEY, v text")
        db.execute("INSERT INTO t_recv SELECT g, 'x' FROM generate_series(1, 3) g")
        db.execute("UPDATE t_recv SET v = 'y' WHERE id = 2")
        end = db.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]
        out = subprocess.run(base + ["--start", "-o", "include_old", "-o", "tables=public.t_recv",
                                     "--endpos", end, "-f", "-", "--no-loop"],
                             check=True, timeout=60, capture_output=True, text=True).stdout
        events = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert [e["type"] for e in events] == ["begin", "insert", "insert", "insert", "commit", "begin", "update", "commit"]
        assert events[6]["new"] == {"id": 2, "v": "y"}
        bad = subprocess.run(base + ["--start", "-o", "nonsense=1", "--endpos", end, "-f", "-", "--no-loop"],
                             timeout=60, capture_output=True, text=True)
        assert bad.returncode != 0 and 'option "nonsense" is not recognized' in bad.stderr
    finally:
        db.execute("SELECT pg_drop_replication_slot(%s)", (name,))
