"""Change history, cursors, changes() and watch(), against a real cluster."""
import base64
import os
import random
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from conftest import connect, extra_port
from test_relay import CLUSTER, ExtraCluster, wait_until


def fresh(db, ddl="id int PRIMARY KEY, tenant text, v text", full=False):
    table, label = "h_" + uuid.uuid4().hex[:10], "hl_" + uuid.uuid4().hex[:8]
    db.execute(f"CREATE TABLE {table} ({ddl})")
    if full:
        db.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    db.execute("SELECT changerelay.track(%s, %s)", (table, label))
    return table, label


def changes(db, since=None, labels=None, max_events=1000, filter=None):
    return db.execute(
        "SELECT cursor, event_id, seq, op, identifier, key, new, old, metadata, label, table_name "
        "FROM changerelay.changes(%s, %s, %s, %s)",
        (since, labels, max_events, psycopg.types.json.Jsonb(filter) if filter is not None else None)).fetchall()


def caught_up(db, label, n, since=None):
    return wait_until(lambda: len(rows := changes(db, since, [label])) >= n and rows, what=f"{n} changes of {label}")


def test_changes_in_commit_order_with_resumable_cursors(db):
    table, label = fresh(db)
    start = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    db.execute(f"INSERT INTO {table} VALUES (1, 't1', 'a'), (2, 't1', 'b')")
    db.execute(f"UPDATE {table} SET v = 'c' WHERE id = 1")
    db.execute(f"DELETE FROM {table} WHERE id = 2")
    rows = caught_up(db, label, 4, start)
    assert [(r[3], r[4]) for r in rows] == [("insert", "1"), ("insert", "2"), ("update", "1"), ("delete", "2")]
    assert [r[2] for r in rows] == [0, 1, 0, 0]
    assert rows[0][1] == rows[1][1] < rows[2][1] < rows[3][1]
    assert rows[0][6] == {"id": 1, "tenant": "t1", "v": "a"} and rows[3][5] == {"id": 2}
    assert all(r[9] == label and r[10] == f"public.{table}" for r in rows)
    # Each row's cursor is the position after it: resuming yields exactly the rest.
    for i, r in enumerate(rows):
        assert [x[0] for x in changes(db, r[0], [label])] == [x[0] for x in rows[i + 1:]]
    assert [x[0] for x in changes(db, start, [label], max_events=2)] == [rows[0][0], rows[1][0]]
    assert len(changes(db, None, [label])) == 4, "NULL since: from the oldest retained"


def test_metadata_on_every_change_of_its_transaction(db):
    table, label = fresh(db)
    start = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    with connect() as c:
        c.autocommit = False
        c.execute("SELECT changerelay.set_metadata('{\"actor\":\"ann\",\"req\":\"r1\"}')")
        c.execute(f"INSERT INTO {table} VALUES (1, 't', 'a')")
        c.execute("SELECT changerelay.set_metadata('{\"actor\":\"bob\"}')")
        c.execute(f"INSERT INTO {table} VALUES (2, 't', 'b')")
        c.commit()
    db.execute(f"INSERT INTO {table} VALUES (3, 't', 'c')")
    rows = caught_up(db, label, 3, start)
    assert [r[8] for r in rows] == [{"actor": "bob", "req": "r1"}, {"actor": "bob", "req": "r1"}, None]


def test_watch_wakes_on_commit_and_times_out_empty(db):
    table, label = fresh(db)
    cur = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    t0 = time.monotonic()
    empty = db.execute("SELECT * FROM changerelay.watch(%s, %s, '300 milliseconds')", (cur, [label])).fetchall()
    assert empty == [] and 0.25 < time.monotonic() - t0 < 5
    result = {}

    def watcher():
        with connect() as w:
            result["rows"] = w.execute("SELECT cursor, identifier FROM changerelay.watch(%s, %s, '20 seconds')",
                                       (cur, [label])).fetchall()
            result["at"] = time.monotonic()

    th = threading.Thread(target=watcher)
    th.start()
    time.sleep(0.3)
    db.execute(f"INSERT INTO {table} VALUES (1, 't', 'x')")
    committed = time.monotonic()
    th.join(20)
    assert [r[1] for r in result["rows"]] == ["1"], "watch resumed from the same cursor after its timeout"
    woke_ms = (result["at"] - committed) * 1000
    print(f"watch woke {woke_ms:.1f} ms after the commit returned")
    assert woke_ms < 5000, "woke long before its 20 s timeout"


def test_watch_from_now_and_many_idle_watchers(db):
    table, label = fresh(db)
    db.execute(f"INSERT INTO {table} VALUES (1, 't', 'old')")
    caught_up(db, label, 1)
    out = []

    def watcher():
        with connect() as w:
            out.append(w.execute("SELECT identifier FROM changerelay.watch(NULL, %s, '20 seconds')", ([label],)).fetchall())

    threads = [threading.Thread(target=watcher) for _ in range(20)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    # Idle watchers sleep on a condition variable: no CPU while waiting.
    cpu = db.execute("""SELECT count(*) FROM pg_stat_activity
                        WHERE query LIKE '%changerelay.watch(NULL%' AND state = 'active' AND wait_event = 'Extension'""").fetchone()[0]
    assert cpu == 20, f"{cpu} watchers waiting on the Extension wait event"
    db.execute(f"INSERT INTO {table} VALUES (2, 't', 'new')")
    for t in threads:
        t.join(20)
    assert out == [[("2",)]] * 20, "NULL since means from now: the old row is not returned"


def test_statement_timeout_and_cancel_interrupt_watch(db):
    table, label = fresh(db)
    with connect() as w:
        w.execute("SET statement_timeout = '200ms'")
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            w.execute("SELECT * FROM changerelay.watch(NULL, %s, '30 seconds')", ([label],))
        assert time.monotonic() - t0 < 5
        w.execute("RESET statement_timeout")
        pid = w.execute("SELECT pg_backend_pid()").fetchone()[0]
        threading.Timer(0.3, lambda: db.execute("SELECT pg_cancel_backend(%s)", (pid,))).start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            w.execute("SELECT * FROM changerelay.watch(NULL, %s, '30 seconds')", ([label],))
        assert w.execute("SELECT 1").fetchone() == (1,), "the session stays usable"


def forge(cursor, system_id=None):
    raw = bytearray(base64.urlsafe_b64decode(cursor[4:] + "=" * (-len(cursor[4:]) % 4)))
    if system_id is not None:
        raw[1:9] = system_id.to_bytes(8, "big")
    a = b = 0
    for x in raw[:-2]:
        a = (a + x) % 255
        b = (b + a) % 255
    raw[-2:] = ((b << 8) | a).to_bytes(2, "big")
    return "cr1_" + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")


def test_cursor_errors(db):
    cur = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    assert forge(cur) == cur
    for bad in ("", "nope", "cr1_AAAA", cur[:-1], cur[:-2] + ("A" if cur[-2] != "A" else "B") + cur[-1]):
        with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
            db.execute("SELECT * FROM changerelay.changes(%s)", (bad,))
        assert "invalid cursor" in str(err.value)
    with pytest.raises(psycopg.errors.SnapshotTooOld) as err:
        db.execute("SELECT * FROM changerelay.changes(%s)", (forge(cur, 12345),))
    assert "another cluster" in str(err.value) and "current_cursor()" in err.value.diag.message_hint
    for sql in ("SELECT * FROM changerelay.watch(%s, NULL, '1 second')", "SELECT * FROM changerelay.changes(%s)"):
        with pytest.raises(psycopg.errors.SnapshotTooOld):
            db.execute(sql, (forge(cur, 1),))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="invalid filter"):
        db.execute("SELECT * FROM changerelay.changes(NULL, NULL, 10, '[1]')")
    with pytest.raises(psycopg.errors.UndefinedObject, match="is not tracked"):
        db.execute("SELECT * FROM changerelay.changes(NULL, ARRAY['no_such_label'])")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="max_events"):
        db.execute("SELECT * FROM changerelay.changes(NULL, NULL, 0)")


def test_tenant_filter_including_deletes(db):
    table, label = fresh(db, full=True)
    start = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    db.execute(f"INSERT INTO {table} VALUES (1, 't1', 'a'), (2, 't2', 'b'), (3, 't3', 'c')")
    db.execute(f"UPDATE {table} SET v = 'z'")
    db.execute(f"DELETE FROM {table} WHERE id IN (1, 2)")
    caught_up(db, label, 8, start)
    t1 = changes(db, start, [label], filter={"tenant": "t1"})
    assert [(r[3], r[4]) for r in t1] == [("insert", "1"), ("update", "1"), ("delete", "1")]
    both = changes(db, start, [label], filter={"tenant": ["t1", "t2"]})
    assert sorted({r[4] for r in both}) == ["1", "2"] and len(both) == 6
    assert changes(db, start, [label], filter={"tenant": "nobody"}) == []
    by_id = changes(db, start, [label], filter={"id": 3})
    assert [r[3] for r in by_id] == ["insert", "update"]


def test_privileges_follow_table_select(db):
    a, la = fresh(db)
    b, lb = fresh(db)
    start = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    db.execute(f"INSERT INTO {a} VALUES (1, 't', 'a'); INSERT INTO {b} VALUES (1, 't', 'b')")
    caught_up(db, lb, 1, start)
    db.execute("DROP ROLE IF EXISTS h_reader; CREATE ROLE h_reader LOGIN")
    db.execute(f"GRANT SELECT ON {a} TO h_reader")
    try:
        with connect(user="h_reader") as r:
            assert len(changes(r, start, [la])) == 1
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as err:
                changes(r, start, [lb])
            assert f'permission denied for label "{lb}"' in str(err.value) and err.value.diag.message_hint
            mine = changes(r, start, None)
            assert {x[9] for x in mine} == {la}, "labels NULL: only tables the role can read"
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                r.execute("SELECT * FROM changerelay.watch(%s, %s, '1 second')", (start, [lb]))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                r.execute("INSERT INTO changerelay.history SELECT * FROM changerelay.history LIMIT 0")
    finally:
        db.execute(f"REVOKE ALL ON {a} FROM h_reader; DROP ROLE h_reader")


def test_retention_prunes_and_expires_old_cursors(db):
    table, label = fresh(db)
    old = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    db.execute(f"INSERT INTO {table} VALUES (1, 't', 'a')")
    caught_up(db, label, 1, old)
    fresh_cursor = None
    try:
        db.execute("ALTER SYSTEM SET changerelay.history_retention = '1s'")
        db.execute("SELECT pg_reload_conf()")
        time.sleep(1.2)
        db.execute(f"INSERT INTO {table} VALUES (2, 't', 'b')")   # wakes the worker, which prunes
        wait_until(lambda: db.execute("SELECT count(*) FROM changerelay.changes(NULL, %s) WHERE identifier = '1'",
                                      ([label],)).fetchone()[0] == 0, what="pruning")
        with pytest.raises(psycopg.errors.SnapshotTooOld) as err:
            db.execute("SELECT * FROM changerelay.changes(%s)", (old,))
        assert "retention" in str(err.value) and "current_cursor()" in err.value.diag.message_hint
        fresh_cursor = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
        db.execute("SELECT * FROM changerelay.changes(%s)", (fresh_cursor,))
    finally:
        db.execute("ALTER SYSTEM RESET changerelay.history_retention")
        db.execute("SELECT pg_reload_conf()")
        # The worker reloads settings at the top of its loop: once it has
        # applied a later write, the short retention is gone.
        db.execute(f"INSERT INTO {table} VALUES (3, 't', 'c')")
        wait_until(lambda: changes(db, fresh_cursor, [label]), what="worker past the reload")


def test_exactly_once_in_commit_order_through_faults():
    """Numbered rows from concurrent writers, some aborted; the worker killed, the server
    crash-restarted and the client disconnected meanwhile. The client sees exactly the
    committed numbers, once each, in commit order. Runs on a cluster of its own."""
    cluster = ExtraCluster("test-cluster-faults", extra_port("faults"), os.environ.get("PGCR_FAULT_CONF", ""))
    try:
        run_exactly_once(cluster)
    finally:
        cluster.stop()


def run_exactly_once(cluster):
    DATA = cluster.dir

    def connect():
        return cluster.connect()

    db = connect()
    db.execute("CREATE EXTENSION pg_changerelay")
    wait_until(lambda: db.execute("SELECT changerelay.status()->'worker'->>'state'").fetchone()[0] == "streaming",
               what="worker streaming")
    table, label = fresh(db, "n int PRIMARY KEY, w int")
    start = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    stop = threading.Event()
    counter = iter(range(1, 10**9))
    lock = threading.Lock()
    errors = []

    def writer(w):
        rng = random.Random(w)
        conn = None
        while not stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect()
                with lock:
                    nums = [next(counter) for _ in range(rng.randint(1, 3))]
                with conn.transaction():
                    for n in nums:
                        conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (n, w))
                    if rng.random() < 0.15:
                        raise psycopg.Rollback()
                time.sleep(rng.random() * 0.01)
            except (psycopg.OperationalError, psycopg.Rollback):
                # The server went away mid-transaction (or mid-rollback).
                conn = None
                time.sleep(0.1)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return

    seen, positions = [], []
    cursor = {"c": start}

    def follow(conn):
        rows = conn.execute("SELECT cursor, event_id, new FROM changerelay.changes(%s, %s, 500)",
                            (cursor["c"], [label])).fetchall()
        for c, e, new in rows:
            seen.append(new["n"])
            positions.append(c)
        if rows:
            cursor["c"] = rows[-1][0]

    writers = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(4)]
    for t in writers:
        t.start()
    client = None
    t0 = time.monotonic()
    phase = 0
    try:
        while time.monotonic() - t0 < 8:
            time.sleep(0.05)
            if client is None or client.closed:
                try:
                    client = connect()
                except psycopg.OperationalError:
                    client = None
                    time.sleep(0.2)
                    continue
            try:
                follow(client)
            except psycopg.OperationalError:
                client = None
                continue
            elapsed = time.monotonic() - t0
            if phase == 0 and elapsed > 1.5:
                pid = client.execute(
                    "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_changerelay relay'").fetchone()
                if pid:
                    client.execute("SELECT pg_terminate_backend(%s)", (pid[0],))
                phase = 1
            elif phase == 1 and elapsed > 3.5:
                subprocess.run([CLUSTER, "restart-immediate", DATA], check=True, timeout=120)
                client = None
                phase = 2
            elif phase == 2 and elapsed > 5:
                client.close()             # the client goes away while writes continue
                client = None
                time.sleep(1.5)
                phase = 3
    finally:
        stop.set()
        for t in writers:
            t.join(30)
    assert not errors, errors
    wait_until(lambda: connect(), what="server up")
    with connect() as c:
        committed = sorted(n for (n,) in c.execute(f"SELECT n FROM {table}").fetchall())
        deadline = time.monotonic() + 60
        while len(seen) < len(committed) and time.monotonic() < deadline:
            follow(c)
            time.sleep(0.05)
        follow(c)
        attempted = next(counter) - 1
    assert phase == 3
    assert len(committed) > 100 and len(committed) < attempted, "some transactions were rolled back"
    assert len(seen) == len(set(seen)), "no change seen twice"
    missing = sorted(set(committed) - set(seen))
    if missing:
        with connect() as c:
            info = c.execute("""SELECT min(event_id), max(event_id), count(*) FROM changerelay.history
                                WHERE label = %s AND (new->>'n')::int = ANY(%s)""", (label, missing)).fetchone()
            horizon = c.execute("SELECT event_id FROM changerelay.history_horizon").fetchone()
            seen_events = [int.from_bytes(base64.urlsafe_b64decode(p[4:] + "=" * (-len(p[4:]) % 4))[13:21], "big")
                           for p in positions]
            around = [e for e in seen_events if info[0] and info[0] - 10**6 < e < info[1] + 10**6][:5]
            print(f"DIAG missing={len(missing)} in-history(min,max,count)={info} horizon={horizon} "
                  f"seen-near={around} seen-range=({min(seen_events)},{max(seen_events)})")
    assert sorted(seen) == committed, f"missing {sorted(set(committed) - set(seen))[:10]}, extra {sorted(set(seen) - set(committed))[:10]}"
    order = [base64.urlsafe_b64decode(p[4:] + "=" * (-len(p[4:]) % 4))[13:25] for p in positions]
    assert order == sorted(order) and len(set(order)) == len(order), "strictly increasing (event_id, pos)"
    # The worker's history writes must be whole: every heap row in every index. (Before the worker
    # cleared PROC_IN_LOGICAL_DECODING, readers hinted its open transactions as aborted.)
    with connect() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS amcheck")
        for (index,) in c.execute("""SELECT indexrelid::regclass::text FROM pg_index JOIN pg_class i ON i.oid = indexrelid
                                    JOIN pg_am a ON a.oid = i.relam
                                   WHERE indrelid = 'changerelay.history'::regclass AND amname = 'btree'""").fetchall():
            c.execute("SELECT bt_index_check(%s::regclass, true)", (index,))


def test_chunks_of_interleaved_tables_read_back_in_commit_order(db):
    """Two tables under two labels changed in the same transactions (their history is packed per table and
    batch, so the chunks overlap): read one change at a time from every cursor, in commit order, nothing twice."""
    a, la = fresh(db)
    b, lb = fresh(db)
    start = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    for i in range(1, 6):
        db.execute(f"BEGIN; INSERT INTO {a} VALUES ({i}, 't', 'a'); INSERT INTO {b} VALUES ({i}, 't', 'b'); "
                   f"INSERT INTO {a} VALUES ({i + 100}, 't', 'a'); COMMIT")
    whole = wait_until(lambda: len(r := changes(db, start, [la, lb])) == 15 and r, what="15 changes")
    assert [(r[9], r[4]) for r in whole[:3]] == [(la, "1"), (lb, "1"), (la, "101")]
    assert [(r[1], r[2]) for r in whole] == sorted((r[1], r[2]) for r in whole)
    one_by_one, cursor = [], start
    while page := changes(db, cursor, [la, lb], max_events=1):
        one_by_one += page
        cursor = page[-1][0]
    assert one_by_one == whole
    only_b = changes(db, whole[0][0], [lb], max_events=3)
    assert [r[4] for r in only_b] == ["1", "2", "3"]
    stored = db.execute("SELECT sum(changes) FROM changerelay.history WHERE label = ANY (%s)", ([la, lb],)).fetchone()
    assert stored[0] == 15


def test_a_label_tracked_for_versions_only_has_no_history(db):
    table = "h_" + uuid.uuid4().hex[:10]
    label = "hv_" + uuid.uuid4().hex[:8]
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v text)")
    db.execute("SELECT changerelay.track(%s, %s, history => false)", (table, label))
    start = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    db.execute(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')")
    db.execute(f"UPDATE {table} SET v = 'c' WHERE id = 1")
    # The insert and the update commit separately: row 1's version passes row 2's once the update is applied.
    versions = lambda: [db.execute("SELECT changerelay.version(%s, %s)", (label, i)).fetchone()[0]  # noqa: E731
                        for i in ("1", "2")]
    wait_until(lambda: (v := versions())[0] and v[1] and v[0] > v[1] > 0, what="both versions, the update's newer")
    assert db.execute("SELECT count(*) FROM changerelay.history WHERE label = %s", (label,)).fetchone()[0] == 0
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
        changes(db, start, [label])
    assert f'label "{label}" keeps no history' in str(err.value) and "version_map" in err.value.diag.message_hint
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
        db.execute("SELECT * FROM changerelay.watch(%s, %s, '1 second')", (start, [label]))
    assert all(r[9] != label for r in changes(db, start, None)), "labels NULL: no rows of it, no error"
    other = "h_" + uuid.uuid4().hex[:10]
    db.execute(f"CREATE TABLE {other} (id int PRIMARY KEY)")
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        db.execute("SELECT changerelay.track(%s, %s)", (other, label))
    assert "keeps versions only" in str(err.value) and "history => false" in err.value.diag.message_hint
    # Untracked and tracked again with history: from then on, its changes are history.
    db.execute("SELECT changerelay.untrack(%s)", (table,))
    db.execute("SELECT changerelay.track(%s, %s)", (table, label))
    db.execute(f"INSERT INTO {table} VALUES (3, 'd')")
    rows = wait_until(lambda: changes(db, start, [label]), what="history after tracking with history")
    assert [(r[3], r[4]) for r in rows] == [("insert", "3")]


def test_deletes_carry_the_last_image_of_their_row_so_filters_see_them(db):
    """REPLICA IDENTITY DEFAULT logs only the key of a deleted row; its history gets the row as last written
    (from the same batch or from stored history), so a tenant filter sees the tenant's deletes."""
    table, label = fresh(db)
    start = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    db.execute(f"INSERT INTO {table} VALUES (1, 't1', 'a'), (2, 't2', 'b'), (3, 't2', 'c')")
    db.execute(f"UPDATE {table} SET v = 'bb' WHERE id = 2")
    caught_up(db, label, 4, start)                      # written and applied: stored history from here on
    db.execute(f"DELETE FROM {table} WHERE id = 2")
    db.execute(f"BEGIN; INSERT INTO {table} VALUES (4, 't2', 'd'); DELETE FROM {table} WHERE id = 4; COMMIT")
    rows = caught_up(db, label, 7, start)
    deletes = [r for r in rows if r[3] == "delete"]
    assert [(r[4], r[5], r[7]) for r in deletes] == [
        ("2", {"id": 2}, {"id": 2, "tenant": "t2", "v": "bb"}),
        ("4", {"id": 4}, {"id": 4, "tenant": "t2", "v": "d"})]
    t2 = changes(db, start, [label], filter={"tenant": "t2"})
    assert [(r[3], r[4]) for r in t2] == [("insert", "2"), ("insert", "3"), ("update", "2"), ("delete", "2"),
                                          ("insert", "4"), ("delete", "4")]
    # A row written before its table was tracked has no image: the delete keeps its key only.
    other = "h_" + uuid.uuid4().hex[:10]
    db.execute(f"CREATE TABLE {other} (id int PRIMARY KEY, tenant text)")
    db.execute(f"INSERT INTO {other} VALUES (1, 't2')")
    lo = "hl_" + uuid.uuid4().hex[:8]
    db.execute("SELECT changerelay.track(%s, %s)", (other, lo))
    db.execute(f"DELETE FROM {other} WHERE id = 1")
    (row,) = caught_up(db, lo, 1, start)
    assert (row[3], row[5], row[7]) == ("delete", {"id": 1}, None)
def test_several_labels_merge_in_commit_order_page_by_page(db):
    """Each label is read through its own index and the labels are merged: pages of any size give every change of
    every asked label once, in commit order, and leave out the others."""
    (ta, la), (tb, lb), (tc, lc) = fresh(db), fresh(db), fresh(db)
    start = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    order = []
    for i in range(30):
        t, l = [(ta, la), (tb, lb), (tc, lc)][(i * 7) % 3]
        with connect() as c:
            c.autocommit = False
            c.execute(f"INSERT INTO {t} VALUES (%s, 't', 'x')", (i,))
            if i % 5 == 0:  # two labels in one transaction
                c.execute(f"INSERT INTO {tb if t != tb else ta} VALUES (%s, 't', 'y')", (1000 + i,))
            c.commit()
    wait_until(lambda: len(changes(db, start, [la, lb, lc])) >= 36, what="36 changes")
    everything = changes(db, start, [la, lb, lc])
    asked = [r for r in everything if r[9] in (la, lb)]
    for size in (1, 2, 3, 7, 1000):
        got, cur = [], start
        while page := changes(db, cur, [lb, la, la], max_events=size):
            got += page
            cur = page[-1][0]
        assert [r[0] for r in got] == [r[0] for r in asked], f"page size {size}"
    assert [(r[1], r[2]) for r in asked] == sorted((r[1], r[2]) for r in asked)
    assert {r[9] for r in asked} == {la, lb}


def test_history_text_does_not_follow_the_servers_time_zone(db):
    """Values still written by their output function (a tstzrange here) are in UTC in the history, as
    timestamptz is, whatever the server's TimeZone: the relay worker pins it. Before, a DBA's change of the
    server's time zone changed the text of history written after it."""
    table, label = fresh(db, "id int PRIMARY KEY, r tstzrange")
    start = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    try:
        db.execute("ALTER SYSTEM SET TimeZone = 'America/New_York'")
        db.execute("SELECT pg_reload_conf()")
        with connect() as other:
            wait_until(lambda: other.execute("SELECT current_setting('TimeZone')").fetchone()[0] == "America/New_York",
                       what="the new time zone in a new session")
        db.execute(f"INSERT INTO {table} VALUES (1, NULL)")  # a turn of the worker's loop after the reload
        caught_up(db, label, 1, start)
        db.execute(f"INSERT INTO {table} VALUES (2, '[2026-01-01 12:00+00, 2026-01-02 12:00+00)')")
        rows = caught_up(db, label, 2, start)
        assert rows[1][6]["r"] == '["2026-01-01 12:00:00+00","2026-01-02 12:00:00+00")', rows[1][6]
    finally:
        db.execute("ALTER SYSTEM RESET TimeZone")
        db.execute("SELECT pg_reload_conf()")
