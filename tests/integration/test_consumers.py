"""Durable consumers: competing readers share one consumer without overlap, a lease not acknowledged comes
back after its visibility timeout, every change is acknowledged exactly once, and retention keeps what a
consumer has not acknowledged up to changerelay.max_consumer_lag."""
import threading
import time
import uuid

import psycopg
import pytest

from conftest import connect
from test_relay import wait_until

N = 2000


def numbered(db):
    table, label = "c_" + uuid.uuid4().hex[:10], "cl_" + uuid.uuid4().hex[:8]
    db.execute(f"CREATE TABLE {table} (n int PRIMARY KEY, tenant text)")
    db.execute("SELECT changerelay.track(%s, %s)", (table, label))
    return table, label


def consumer(db, name):
    cols = [c.name for c in db.execute("SELECT * FROM changerelay.consumers() LIMIT 0").description]
    row = db.execute("SELECT * FROM changerelay.consumers() WHERE name = %s", (name,)).fetchone()
    return dict(zip(cols, row)) if row else None


def consume(conn, name, n=50, visibility="2 seconds"):
    return conn.execute("SELECT lease, cursor, new FROM changerelay.consume(%s, %s, %s)",
                        (name, n, visibility)).fetchall()


def test_two_competing_readers_and_a_crash_between_consume_and_ack(db):
    table, label = numbered(db)
    name = "c_" + uuid.uuid4().hex[:8]
    db.execute("SELECT changerelay.create_consumer(%s, ARRAY[%s])", (name, label))
    for first in range(1, N + 1, 100):
        db.execute(f"INSERT INTO {table} SELECT g, 't' FROM generate_series(%s::int, %s::int) g", (first, first + 99))
    acked = {"a": [], "b": []}
    crashed, refused, errors = [], [], []
    stop = threading.Event()

    def reader(who):
        conn = connect()
        batches = 0
        try:
            while not stop.is_set():
                rows = consume(conn, name)
                if not rows:
                    time.sleep(0.05)
                    continue
                batches += 1
                if who == "a" and batches == 3:
                    # Crash between consume and ack: the connection goes away, the lease is never acknowledged.
                    crashed.extend(r[2]["n"] for r in rows)
                    conn.close()
                    conn = connect()
                    continue
                if who == "a" and batches == 6:
                    # Too slow: the lease expires and goes to the other reader; the late ack is refused.
                    time.sleep(3)
                    try:
                        conn.execute("SELECT changerelay.ack(%s, %s, %s)", (name, rows[-1][1], rows[-1][0]))
                        errors.append("a late ack was accepted")
                    except psycopg.errors.ObjectNotInPrerequisiteState as e:
                        refused.append(str(e))
                    continue
                conn.execute("SELECT changerelay.ack(%s, %s, %s)", (name, rows[-1][1], rows[-1][0]))
                acked[who].extend(r[2]["n"] for r in rows)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=reader, args=(w,), daemon=True) for w in "ab"]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(acked["a"]) + len(acked["b"]) >= N or errors, timeout=120, what="all acknowledged")
        time.sleep(2.5)  # a stray redelivery would show up by now
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    every = acked["a"] + acked["b"]
    assert len(every) == len(set(every)), f"{len(every) - len(set(every))} changes acknowledged twice"
    assert sorted(every) == list(range(1, N + 1))
    assert crashed and set(crashed) <= set(acked["b"]) | set(acked["a"]), "the crashed lease was delivered again"
    assert refused and "lease" in refused[0]
    assert acked["a"] and acked["b"], "both readers took part"
    c = consumer(db, name)
    assert c["leases"] == 0 and c["lag_bytes"] >= 0 and not c["lagging"]
    assert consume(db, name) == [], "nothing left"
    db.execute("SELECT changerelay.drop_consumer(%s)", (name,))


def test_partial_ack_filter_and_errors(db):
    table, label = numbered(db)
    name = "c_" + uuid.uuid4().hex[:8]
    db.execute("SELECT changerelay.create_consumer(%s, ARRAY[%s], '{\"tenant\": \"t1\"}')", (name, label))
    db.execute(f"INSERT INTO {table} SELECT g, CASE WHEN g % 2 = 0 THEN 't1' ELSE 't2' END "
               "FROM generate_series(1, 20) g")
    rows = wait_until(lambda: consume(db, name, 4, "1 minute"), what="a lease")
    assert [r[2]["n"] for r in rows] == [2, 4, 6, 8], "only the filter's tenant"
    db.execute("SELECT changerelay.ack(%s, %s)", (name, rows[1][1]))
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="not in a lease"):
        db.execute("SELECT changerelay.ack(%s, %s)", (name, rows[1][1]))
    rest = consume(db, name, 100, "1 minute")
    assert [r[2]["n"] for r in rest] == [10, 12, 14, 16, 18, 20], "the unacknowledged rest stays leased"
    db.execute("SELECT changerelay.ack(%s, %s, %s)", (name, rest[-1][1], rest[-1][0]))
    db.execute("SELECT changerelay.ack(%s, %s, %s)", (name, rows[-1][1], rows[-1][0]))
    assert consumer(db, name)["leases"] == 0
    for sql, args, error, text in [
        ("SELECT * FROM changerelay.consume('nope')", (), psycopg.errors.UndefinedObject, "does not exist"),
        ("SELECT * FROM changerelay.consume(%s, 0)", (name,), psycopg.errors.InvalidParameterValue, "max_events"),
        ("SELECT * FROM changerelay.consume(%s, 1, '0 s')", (name,), psycopg.errors.InvalidParameterValue, "visibility"),
        ("SELECT changerelay.ack(%s, 'nope')", (name,), psycopg.errors.InvalidParameterValue, "invalid cursor"),
        ("SELECT changerelay.create_consumer(%s, ARRAY[%s])", (name, label), psycopg.errors.DuplicateObject, "exists"),
        ("SELECT changerelay.create_consumer('c_x', ARRAY['no_such'])", (), psycopg.errors.UndefinedObject, "not tracked"),
        ("SELECT changerelay.create_consumer('c_x', ARRAY[%s], '[1]')", (label,), psycopg.errors.InvalidParameterValue,
         "invalid filter"),
        ("SELECT changerelay.drop_consumer('nope')", (), psycopg.errors.UndefinedObject, "does not exist"),
    ]:
        with pytest.raises(error) as e:
            db.execute(sql, args)
        assert text in str(e.value) and e.value.diag.message_hint, sql
    db.execute("DROP ROLE IF EXISTS c_other; CREATE ROLE c_other LOGIN")
    try:
        with connect(user="c_other") as r:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for consumer"):
                r.execute("SELECT * FROM changerelay.consume(%s)", (name,))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                r.execute("SELECT changerelay.create_consumer('c_y', ARRAY[%s])", (label,))
            assert r.execute("SELECT count(*) FROM changerelay.consumers()").fetchone() == (0,)
    finally:
        db.execute("DROP ROLE c_other")
    db.execute("SELECT changerelay.drop_consumer(%s)", (name,))


def test_retention_keeps_what_a_consumer_needs_up_to_max_consumer_lag(db):
    table, label = numbered(db)
    keep, drop = "c_keep_" + uuid.uuid4().hex[:6], "c_lag_" + uuid.uuid4().hex[:6]
    db.execute("SELECT changerelay.create_consumer(%s, ARRAY[%s])", (keep, label))
    db.execute(f"INSERT INTO {table} VALUES (1, 't')")
    try:
        db.execute("ALTER SYSTEM SET changerelay.history_retention = '1s'")
        db.execute("ALTER SYSTEM SET changerelay.max_consumer_lag = '1h'")
        db.execute("SELECT pg_reload_conf()")
        time.sleep(1.5)
        db.execute(f"INSERT INTO {table} VALUES (2, 't')")  # wakes the worker, which prunes
        time.sleep(1.5)
        db.execute(f"INSERT INTO {table} VALUES (3, 't')")
        # Consumed once the third is applied: a read before it would lease the first ones for a minute.
        from test_history import changes
        wait_until(lambda: any((r[6] or {}).get("n") == 3 for r in changes(db, None, [label])), timeout=60,
                   what="the third change applied")
        rows = consume(db, keep, 10, "1 minute")
        assert [r[2]["n"] for r in rows] == [1, 2, 3], "retention did not prune what the consumer needs"
        db.execute("SELECT changerelay.ack(%s, %s)", (keep, rows[-1][1]))
        db.execute("SELECT changerelay.create_consumer(%s, ARRAY[%s])", (drop, label))
        db.execute(f"INSERT INTO {table} VALUES (4, 't')")
        db.execute("ALTER SYSTEM SET changerelay.max_consumer_lag = '1s'")
        db.execute("SELECT pg_reload_conf()")
        time.sleep(1.5)

        def lagging():
            db.execute(f"INSERT INTO {table} VALUES ((SELECT max(n) + 1 FROM {table}), 't')")
            return consumer(db, drop)["lagging"]
        wait_until(lagging, timeout=30, what="the consumer marked lagging")
        assert drop in db.execute("SELECT changerelay.status()->'consumers'->'lagging'").fetchone()[0]
        with pytest.raises(psycopg.errors.SnapshotTooOld, match="max_consumer_lag") as e:
            consume(db, drop)
        assert "create it again" in e.value.diag.message_hint
    finally:
        db.execute("ALTER SYSTEM RESET changerelay.history_retention")
        db.execute("ALTER SYSTEM RESET changerelay.max_consumer_lag")
        db.execute("SELECT pg_reload_conf()")
        db.execute(f"INSERT INTO {table} VALUES ((SELECT max(n) + 1 FROM {table}), 't')")
        for n in (keep, drop):  # `drop` exists only if the test got that far
            db.execute("SELECT changerelay.drop_consumer(name) FROM changerelay.consumers() WHERE name = %s", (n,))
