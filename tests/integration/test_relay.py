"""The relay worker and its shared-memory version maps, against a real cluster."""
import os
import subprocess
import time
import uuid

import psycopg
import pytest

from conftest import DATA, PG, ROOT, WORK, Slot, connect, extra_port

CLUSTER = os.path.join(ROOT, "scripts", "cluster.sh")


def wait_until(fn, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except psycopg.OperationalError as e:  # server restarting
            last = e
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


def version(db, label, ident=None):
    return db.execute("SELECT changerelay.version(%s, %s)", (label, ident)).fetchone()[0]


def commit_ids(slot, table):
    """Event ids of the commits that touched `table`, read from a side slot, in order."""
    return [e["event_id"] for e in slot.get(tables=f"public.{table}") if e["type"] == "commit"]


def fresh_label():
    return "l_" + uuid.uuid4().hex[:10]


@pytest.fixture
def tracked(db):
    """A fresh table tracked under a fresh label: (table, label)."""
    table, label = "rt_" + uuid.uuid4().hex[:10], fresh_label()
    db.execute(f"CREATE TABLE {table} (name text PRIMARY KEY, value text)")
    db.execute("SELECT changerelay.track(%s, %s)", (table, label))
    yield table, label
    with connect() as c:  # the test may have restarted the server
        c.execute(f"DROP TABLE IF EXISTS {table}")


def test_worker_is_visible_and_streaming(db):
    row = db.execute("""SELECT backend_type, application_name FROM pg_stat_activity
                        WHERE backend_type = 'pg_changerelay relay'""").fetchone()
    assert row == ("pg_changerelay relay", "pg_changerelay relay")
    st = wait_until(lambda: (s := db.execute("SELECT changerelay.status()").fetchone()[0])["worker"]["state"] == "streaming" and s,
                    what="streaming")
    assert st["slot"]["name"] == "changerelay" and st["versions_loaded"] is True
    assert st["tracked_rows"]["bytes_per_row"] == 64 and st["tracked_rows"]["capacity"] > 0
    assert isinstance(st["worker"]["pid"], int)


def test_versions_move_with_each_commit_and_match_its_event_id(db, tracked):
    table, label = tracked
    side = Slot(db)
    try:
        db.execute(f"INSERT INTO {table} VALUES ('WAFCONFIG', 'on'), ('other', 'x')")
        (e1,) = commit_ids(side, table)
        wait_until(lambda: version(db, label, "WAFCONFIG") == e1, what="insert version")
        assert version(db, label) == e1 and version(db, label, "other") == e1
        assert version(db, label, "never-seen") is None

        db.execute(f"UPDATE {table} SET value = 'off' WHERE name = 'WAFCONFIG'")
        (e2,) = commit_ids(side, table)
        wait_until(lambda: version(db, label, "WAFCONFIG") == e2, what="update version")
        assert e2 > e1 and version(db, label, "other") == e1 and version(db, label) == e2

        db.execute(f"DELETE FROM {table} WHERE name = 'other'")
        (e3,) = commit_ids(side, table)
        wait_until(lambda: version(db, label, "other") == e3, what="delete version")
        assert version(db, label, "WAFCONFIG") == e2

        db.execute(f"UPDATE {table} SET name = 'RENAMED' WHERE name = 'WAFCONFIG'")
        (e4,) = commit_ids(side, table)
        wait_until(lambda: version(db, label, "RENAMED") == e4, what="key change")
        assert version(db, label, "WAFCONFIG") == e4, "the old identifier moves too"

        db.execute(f"TRUNCATE {table}")
        (e5,) = commit_ids(side, table)
        wait_until(lambda: version(db, label) == e5, what="truncate")
        assert version(db, label, "RENAMED") == e5 and version(db, label, "other") == e5

        vm = db.execute("SELECT changerelay.version_map(%s)", (label,)).fetchone()[0]
        assert vm["label"] == label
        assert vm["data"]["all"]["v"] == e5 and isinstance(vm["data"]["all"]["ts"], int)
        assert {k: v["v"] for k, v in vm["data"].items()} == {"all": e5, "RENAMED": e5, "WAFCONFIG": e5, "other": e5}
        rows = db.execute("SELECT identifier, v FROM changerelay.versions(%s)", (label,)).fetchall()
        assert rows[0] == ("all", e5) and len(rows) == 4
    finally:
        side.drop()


def test_ts_is_the_commit_time(db, tracked):
    """`ts` is the commit record's time (as test_decoding prints it), in milliseconds. (Compared with
    clock_timestamp() read before and after, it once came out a millisecond after the later reading on CI.)"""
    table, label = tracked
    side = Slot(db, plugin="test_decoding")
    try:
        xid = db.execute(f"INSERT INTO {table} VALUES ('a', '1') RETURNING txid_current()").fetchone()[0]
        upto = db.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        at = next(d for d in side.peek_raw(upto=upto, **{"include-timestamp": True})
                  if d.startswith(f"COMMIT {xid} (at "))
        commit_ms = db.execute("SELECT floor(extract(epoch FROM %s::timestamptz) * 1000)::bigint",
                               (at.split("(at ", 1)[1].rstrip(")"),)).fetchone()[0]
    finally:
        side.drop()
    # The change's commit time, as the history has it; the row's version carries the same time once the
    # worker has loaded (while it starts, readers get the floor, stamped with the time of the read).
    (committed,) = wait_until(lambda: db.execute("SELECT ts FROM changerelay.changes(NULL, %s)", ([label],)).fetchone(),
                              what="the change in history")
    assert committed == commit_ms
    ts_of_a = "SELECT ts FROM changerelay.versions(%s) WHERE identifier = 'a'"
    wait_until(lambda: db.execute(ts_of_a, (label,)).fetchone() == (committed,), what="the version's time")


def test_several_tables_share_a_label_and_untrack_stops_movement(db):
    label = fresh_label()
    a, b = "rt_a_" + uuid.uuid4().hex[:8], "rt_b_" + uuid.uuid4().hex[:8]
    db.execute(f"CREATE TABLE {a} (id int PRIMARY KEY); CREATE TABLE {b} (code text PRIMARY KEY, n int)")
    try:
        db.execute("SELECT changerelay.track(%s, %s)", (a, label))
        db.execute("SELECT changerelay.track(%s, %s, 'n')", (b, label)) if False else \
            db.execute("SELECT changerelay.track(%s, %s)", (b, label))
        tracked = db.execute("SELECT table_name, identifier FROM changerelay.tracked() WHERE label = %s ORDER BY 1",
                             (label,)).fetchall()
        assert tracked == sorted([(a, "id"), (b, "code")])
        db.execute(f"INSERT INTO {a} VALUES (1)")
        v1 = wait_until(lambda: version(db, label, "1"), what="table a")
        db.execute(f"INSERT INTO {b} VALUES ('x', 1)")
        v2 = wait_until(lambda: version(db, label, "x"), what="table b")
        assert v2 > v1 and version(db, label) == v2
        db.execute("SELECT changerelay.untrack(%s)", (b,))
        v_untrack = wait_until(lambda: (v := version(db, label)) > v2 and v, what="untrack moves all")
        db.execute(f"INSERT INTO {b} VALUES ('y', 2)")
        db.execute(f"INSERT INTO {a} VALUES (2)")
        v3 = wait_until(lambda: version(db, label, "2"), what="table a still tracked")
        assert version(db, label, "y") is None, "untracked table no longer moves versions"
        assert version(db, label) == v3 > v_untrack
    finally:
        db.execute(f"DROP TABLE {a}, {b}")


def test_tracking_and_writing_in_one_transaction(db):
    label, table = fresh_label(), "rt_" + uuid.uuid4().hex[:10]
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
    try:
        with connect() as c:
            c.autocommit = False
            c.execute(f"INSERT INTO {table} VALUES (1)")   # before tracking: not filed
            c.execute("SELECT changerelay.track(%s, %s)", (table, label))
            c.execute(f"INSERT INTO {table} VALUES (2)")   # after tracking, same transaction: filed
            c.commit()
        v = wait_until(lambda: version(db, label, "2"), what="same-transaction tracking")
        assert version(db, label, "1") is None
        assert version(db, label) == v
    finally:
        db.execute(f"DROP TABLE {table}")


def test_identifier_column_and_table_without_key(db):
    label = fresh_label()
    t1, t2 = "rt_i_" + uuid.uuid4().hex[:8], "rt_n_" + uuid.uuid4().hex[:8]
    db.execute(f"CREATE TABLE {t1} (id int PRIMARY KEY, slug text UNIQUE)")
    db.execute(f"ALTER TABLE {t1} REPLICA IDENTITY FULL")
    db.execute(f"CREATE TABLE {t2} (a int)")
    try:
        db.execute("SELECT changerelay.track(%s, %s, 'slug')", (t1, label))
        db.execute("SELECT changerelay.track(%s, %s)", (t2, label + "_n"))
        db.execute(f"INSERT INTO {t1} VALUES (1, 'home')")
        wait_until(lambda: version(db, label, "home"), what="slug identifier")
        db.execute(f"UPDATE {t1} SET slug = 'start' WHERE id = 1")
        v = wait_until(lambda: version(db, label, "start"), what="slug renamed")
        assert version(db, label, "home") == v
        db.execute(f"DELETE FROM {t1}")
        vd = wait_until(lambda: (x := version(db, label, "start")) > v and x, what="delete by slug")
        assert version(db, label) == vd
        db.execute(f"INSERT INTO {t2} VALUES (1)")
        vn = wait_until(lambda: (x := version(db, label + "_n")) > vd and x, what="keyless table moves all")
        assert db.execute("SELECT count(*) FROM changerelay.versions(%s)", (label + "_n",)).fetchone()[0] == 1
        assert vn > vd
    finally:
        db.execute(f"DROP TABLE {t1}, {t2}")


@pytest.mark.parametrize("sql,sqlstate,message", [
    ("SELECT changerelay.track('no_such_table')", "42P01", 'relation "no_such_table" does not exist'),
    ("SELECT changerelay.track('rt_unlogged')", "55000", 'is an unlogged table'),
    ("SELECT changerelay.track('rt_plain', 'bad label!')", "22023", 'invalid label "bad label!"'),
    ("SELECT changerelay.track('rt_plain', 'ok', 'nope')", "42703", 'column "nope" of relation "rt_plain" does not exist'),
    ("SELECT changerelay.track('rt_plain', 'ok', 'v')", "22023", 'is not part of the replica identity'),
    ("SELECT changerelay.track('rt_view')", "42809", 'is not a table'),
    ("SELECT changerelay.untrack('rt_plain')", "42704", 'is not tracked'),
    ("SELECT changerelay.version('no_such_label')", "42704", 'label "no_such_label" is not tracked'),
    ("SELECT changerelay.version_map('no_such_label')", "42704", 'label "no_such_label" is not tracked'),
    ("SELECT changerelay.track(NULL)", "22004", 'must not be NULL'),
])
def test_bad_input_errors_cleanly(db, sql, sqlstate, message):
    db.execute("DROP TABLE IF EXISTS rt_plain, rt_unlogged CASCADE; DROP VIEW IF EXISTS rt_view")
    db.execute("CREATE TABLE rt_plain (id int PRIMARY KEY, v text); CREATE UNLOGGED TABLE rt_unlogged (id int PRIMARY KEY)")
    db.execute("CREATE VIEW rt_view AS SELECT 1 AS x")
    with pytest.raises(psycopg.Error) as err:
        db.execute(sql)
    assert err.value.sqlstate == sqlstate, err.value
    assert message in str(err.value)
    if sqlstate not in ("42P01",):
        assert err.value.diag.message_hint, "every error of ours carries a hint"
    assert db.execute("SELECT 1").fetchone() == (1,)


def test_tracking_twice_and_temporary_tables(db):
    db.execute("DROP TABLE IF EXISTS rt_twice")
    db.execute("CREATE TABLE rt_twice (id int PRIMARY KEY)")
    db.execute("SELECT changerelay.track('rt_twice')")
    try:
        with pytest.raises(psycopg.errors.DuplicateObject, match='already tracked under label "rt_twice"'):
            db.execute("SELECT changerelay.track('rt_twice', 'other')")
        db.execute("CREATE TEMP TABLE rt_temp (id int)")
        with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="is a temporary table"):
            db.execute("SELECT changerelay.track('rt_temp')")
    finally:
        db.execute("SELECT changerelay.untrack('rt_twice'); DROP TABLE rt_twice")


def test_only_superusers_track_by_default(db):
    db.execute("DROP ROLE IF EXISTS rt_app; CREATE ROLE rt_app LOGIN")
    try:
        with connect(user="rt_app") as c:
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                c.execute("SELECT changerelay.track('rt_plain')")
    finally:
        db.execute("DROP ROLE rt_app")


def worker_pid(db):
    return db.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_changerelay relay'").fetchone()


def test_versions_survive_sigterm_and_immediate_restart(db, tracked):
    table, label = tracked
    db.execute(f"INSERT INTO {table} SELECT 'k' || g, 'v' FROM generate_series(1, 50) g")
    wait_until(lambda: version(db, label, "k50"), what="initial versions")
    before = dict(db.execute("SELECT identifier, v FROM changerelay.versions(%s)", (label,)).fetchall())

    (pid,) = worker_pid(db)
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    db.execute(f"UPDATE {table} SET value = 'w' WHERE name = 'k1'")   # while the worker is down
    new_pid = wait_until(lambda: (r := worker_pid(db)) and r[0] != pid and r[0], what="worker restart")
    assert new_pid != pid
    v_k1 = wait_until(lambda: (v := version(db, label, "k1")) > before["k1"] and v, what="change made while down")
    after = dict(db.execute("SELECT identifier, v FROM changerelay.versions(%s)", (label,)).fetchall())
    assert all(after[k] >= v for k, v in before.items())

    assert DATA, "PGCR_DATA must point at the test cluster"
    subprocess.run([CLUSTER, "restart-immediate", DATA], check=True, timeout=120)
    with connect() as c2:
        # Right after the restart, before or after the worker loaded: never older.
        got = dict(c2.execute("SELECT identifier, v FROM changerelay.versions(%s)", (label,)).fetchall())
        assert all(got.get(k, 0) >= v for k, v in after.items()), (got, after)
        assert version(c2, label, "k1") >= v_k1
        c2.execute(f"UPDATE {table} SET value = 'z' WHERE name = 'k2'")
        wait_until(lambda: version(c2, label, "k2") > after["k2"], what="moves after restart")
        st = c2.execute("SELECT changerelay.status()").fetchone()[0]
        assert st["versions_loaded"] is True


def test_versions_never_go_back_across_an_immediate_restart_before_a_checkpoint(db):
    """The worker writes versions at checkpoints (every 10 s). Rows changed right before a crash-like restart,
    history on and off: afterwards every version read is at least what was read before (the labels' floors are
    raised to the end of WAL), and new changes move them past that."""
    suffix = uuid.uuid4().hex[:8]
    tables = {f"rv_h_{suffix}": True, f"rv_v_{suffix}": False}
    for table, history in tables.items():
        db.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, n int)")
        db.execute("SELECT changerelay.track(%s, %s, history => %s)", (table, table, history))
        db.execute(f"INSERT INTO {table} SELECT 'k' || g, 0 FROM generate_series(1, 20) g")
    for table in tables:
        wait_until(lambda t=table: version(db, t, "k20"), what="initial versions")
    time.sleep(11)  # past a checkpoint
    for table in tables:
        db.execute(f"UPDATE {table} SET n = 1 WHERE id IN ('k1', 'k2')")
        db.execute(f"INSERT INTO {table} VALUES ('new', 1)")
    for table in tables:
        wait_until(lambda t=table: version(db, t, "new"), what="versions of the last changes")
    before = {t: {k: version(db, t, k) for k in ("k1", "k2", "k3", "new", None)} for t in tables}
    subprocess.run([CLUSTER, "restart-immediate", DATA], check=True, timeout=120)
    with connect() as c2:
        for _ in range(2):  # right after the restart (perhaps before the worker loaded), and once it has
            for table, seen in before.items():
                for k, v in seen.items():
                    got = version(c2, table, k)
                    assert got is not None and got >= v, (table, k, got, v)
            wait_until(lambda: c2.execute("SELECT changerelay.status()->>'versions_loaded'").fetchone()[0] == "true",
                       what="versions loaded")
        for table in tables:
            floor = version(c2, table, "k3")
            c2.execute(f"UPDATE {table} SET n = 2 WHERE id = 'k3'")
            wait_until(lambda t=table, f=floor: version(c2, t, "k3") > f, what="moves after the restart")
            c2.execute("SELECT changerelay.untrack(%s)", (table,))
            c2.execute(f"DROP TABLE {table}")


def test_disabled_worker_says_so(db, tracked):
    table, label = tracked
    try:
        db.execute("ALTER SYSTEM SET changerelay.enabled = off")
        db.execute("SELECT pg_reload_conf()")
        wait_until(lambda: db.execute("SELECT changerelay.status()->'worker'->>'state'").fetchone()[0] == "disabled",
                   what="disabled state")
        db.execute(f"INSERT INTO {table} VALUES ('while_off', '1')")
        time.sleep(0.3)
        assert version(db, label, "while_off") is None
    finally:
        db.execute("ALTER SYSTEM RESET changerelay.enabled")
        db.execute("SELECT pg_reload_conf()")
    wait_until(lambda: version(db, label, "while_off"), what="catch up after re-enabling")


class ExtraCluster:
    """A cluster of its own in this major's work directory (or of major `pg`), on `port`."""

    def __init__(self, name, port, extra_conf, encoding="UTF8", pg=None):
        self.dir = os.path.join(WORK, name)
        self.port = port
        self.env = {**os.environ, "PG": str(pg or PG)}
        self.start_env = {**self.env, "EXTRA_CONF": extra_conf, "INITDB_ENCODING": encoding}
        subprocess.run([CLUSTER, "stop", self.dir], check=False, env=self.env)
        subprocess.run(["rm", "-rf", self.dir], check=True)
        subprocess.run([CLUSTER, "start", self.dir, str(port)], check=True, timeout=120, env=self.start_env)

    def restart(self):
        """A clean stop (the worker writes its versions first), then a start with the same settings."""
        subprocess.run([CLUSTER, "stop", self.dir], check=True, timeout=120, env=self.env)
        subprocess.run([CLUSTER, "start", self.dir, str(self.port)], check=True, timeout=120, env=self.start_env)

    def connect(self, dbname="postgres", user="postgres"):
        return psycopg.connect(f"host=127.0.0.1 port={self.port} user={user} dbname={dbname}", autocommit=True)

    def log(self):
        with open(os.path.join(self.dir, "server.log"), errors="replace") as f:
            return f.read()

    def stop(self):
        subprocess.run([CLUSTER, "stop", self.dir], check=False, timeout=120, env=self.env)
        # Keep the server log for post-mortems, drop the data.
        subprocess.run(["cp", os.path.join(self.dir, "server.log"), self.dir + ".log"], check=False)
        subprocess.run(["rm", "-rf", self.dir], check=False)


def test_small_map_never_reports_an_older_version():
    cluster = ExtraCluster("test-cluster-small", extra_port("small"), "changerelay.max_tracked_rows = 100")
    try:
        with cluster.connect() as c:
            c.execute("CREATE EXTENSION pg_changerelay")
            c.execute("CREATE TABLE items (id int PRIMARY KEY, n int)")
            c.execute("SELECT changerelay.track('items', 'items')")
            side = Slot(c)
            truth = {}
            for batch in range(10):
                c.execute("INSERT INTO items SELECT g, 0 FROM generate_series(%s::int, %s::int) g", (batch * 100, batch * 100 + 99))
            for k in range(0, 1000, 7):
                c.execute("UPDATE items SET n = n + 1 WHERE id = %s", (k,))
            for e in side.get(tables="public.items"):
                if e["type"] in ("insert", "update"):
                    truth[str(e["new"]["id"])] = e["event_id"]
            side.drop()
            assert len(truth) == 1000
            last = max(truth.values())
            wait_until(lambda: version(c, "items") == last, what="worker caught up")
            got = dict(c.execute("""SELECT g::text, changerelay.version('items', g::text)
                                    FROM generate_series(0, 999) g""").fetchall())
            older = {k: (got[k], v) for k, v in truth.items() if got[k] is None or got[k] < v}
            assert not older, f"{len(older)} rows reported older than the truth"
            st = c.execute("SELECT changerelay.status()->'tracked_rows'").fetchone()[0]
            assert st["capacity"] == 100 and st["used"] <= 100 and st["evictions"] > 0
            size = c.execute("SELECT size FROM pg_shmem_allocations WHERE name = 'pg_changerelay'").fetchone()[0]
            assert size < 200_000, "1024 labels and 100 rows stay small"
    finally:
        cluster.stop()


def test_the_version_log_is_compacted_to_what_shared_memory_holds_and_no_version_goes_back():
    """Row versions go to the version log at checkpoints, in entries of at most 20,000 rows. Once it has grown by
    300,000 rows the log is compacted: each row once, at most as many as shared memory holds (7/8 of
    changerelay.max_tracked_rows), the newest, the older ones dropped into their label's floor, all packed (nothing
    is written into row_versions). 330,000 rows inserted in 11 transactions with room for 175,000: the log comes down
    to 175,000 rows in entries of at most 20,000, and neither then nor after a clean restart (versions loaded from the
    compacted log) does any row's version go back."""
    cluster = ExtraCluster("test-cluster-fold", extra_port("fold"), "changerelay.max_tracked_rows = 200000")
    try:
        with cluster.connect() as c:
            c.execute("CREATE EXTENSION pg_changerelay")
            c.execute("CREATE TABLE items (id int PRIMARY KEY, n int)")
            c.execute("SELECT changerelay.track('items', 'items', history => false)")

            def read_versions():
                rows = dict(c.execute("SELECT identifier, v FROM changerelay.versions('items')").fetchall())
                floor = c.execute("SELECT changerelay.version('items', 'not a row')").fetchone()[0]
                return rows, floor

            def log():
                return c.execute("""SELECT count(*), coalesce(sum(rows), 0), coalesce(max(rows), 0)
                                    FROM changerelay.version_log""").fetchone()

            seen, versions_seen = [], []
            for k in range(11):
                c.execute("INSERT INTO items SELECT g, 0 FROM generate_series(%s::int, %s::int) g",
                          (k * 30_000 + 1, (k + 1) * 30_000))
                wait_until(lambda: c.execute("SELECT changerelay.version('items', %s)",
                                             (str((k + 1) * 30_000),)).fetchone()[0], what="the last row applied")
                seen.append(log())
                versions_seen.append(read_versions())

            def compacted():
                seen.append(log())
                return seen[-1][1] == 175_000

            wait_until(compacted, timeout=90, what="the version log compacted to 175,000 rows")
            assert max(s[2] for s in seen) <= 20_000, seen
            assert max(s[1] for s in seen) > 300_000, "it grew past its bound first"
            assert c.execute("SELECT count(*) FROM changerelay.row_versions").fetchone()[0] == 0
            versions_seen.append(read_versions())
        cluster.restart()
        with cluster.connect() as c:
            wait_until(lambda: c.execute("SELECT changerelay.status()->>'versions_loaded'").fetchone()[0] == "true",
                       what="versions loaded")
            rows, floor = read_versions()
            assert floor is not None and len(rows) > 100_000, (floor, len(rows))
            # The newest transactions' rows are kept (those of one transaction share its version; of the oldest
            # transaction kept, part is dropped into the floor).
            kept = set(rows) - {"all"}
            assert {str(i) for i in range(180_001, 330_001)} <= kept <= {str(i) for i in range(150_001, 330_001)}
            for before, before_floor in versions_seen:
                for ident in (str(i) for i in range(1, 330_001)):
                    was = before.get(ident, before_floor)
                    now = rows.get(ident, floor)
                    assert was is None or now >= was, (ident, was, now)
    finally:
        cluster.stop()


def test_without_preloading_functions_say_how_to_fix_it():
    cluster = ExtraCluster("test-cluster-nopreload", extra_port("nopreload"), "shared_preload_libraries = ''")
    try:
        with cluster.connect() as c:
            c.execute("CREATE EXTENSION pg_changerelay")
            c.execute("CREATE TABLE t (id int PRIMARY KEY)")
            for sql in ("SELECT changerelay.track('t')", "SELECT changerelay.version('x')",
                        "SELECT changerelay.status()", "SELECT * FROM changerelay.tracked()"):
                with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as err:
                    c.execute(sql)
                assert "shared_preload_libraries" in str(err.value)
                assert "shared_preload_libraries" in err.value.diag.message_hint
            # The output plugin works without preloading.
            s = Slot(c)
            c.execute("INSERT INTO t VALUES (1)")
            assert [e["type"] for e in s.get()] == ["begin", "insert", "commit"]
            s.drop()
    finally:
        cluster.stop()


def test_ddl_on_a_tracked_table_while_streaming(db, tracked):
    """The worker keeps one decoding context; schema changes between writes must still decode."""
    table, label = tracked
    db.execute(f"INSERT INTO {table} VALUES ('a', '1')")
    v1 = wait_until(lambda: version(db, label, "a"), what="before DDL")
    db.execute(f"ALTER TABLE {table} ADD COLUMN extra int DEFAULT 5")
    db.execute(f"INSERT INTO {table} VALUES ('b', '2', 7)")
    v2 = wait_until(lambda: version(db, label, "b"), what="after ADD COLUMN")
    db.execute(f"ALTER TABLE {table} DROP COLUMN value")
    db.execute(f"UPDATE {table} SET extra = 8 WHERE name = 'a'")
    v3 = wait_until(lambda: (v := version(db, label, "a")) > v1 and v, what="after DROP COLUMN")
    db.execute(f"ALTER TABLE {table} RENAME COLUMN extra TO renamed")
    db.execute(f"ALTER TABLE {table} ALTER COLUMN renamed TYPE bigint")
    db.execute(f"DELETE FROM {table} WHERE name = 'b'")
    v4 = wait_until(lambda: (v := version(db, label, "b")) > v2 and v, what="after type change")
    assert v1 < v2 < v3 < v4 == version(db, label)
    st = db.execute("SELECT changerelay.status()").fetchone()[0]
    assert st["worker"]["state"] == "streaming"
