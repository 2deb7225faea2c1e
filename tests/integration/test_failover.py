"""Failover (README: High availability), against a primary and a streaming standby on loopback
(scripts/cluster.sh standby/promote): exactly once across a kill -9 of the primary and a promotion (17+), the
publish gate with an asynchronous standby cut off (17+), explicit gaps for a dropped, invalidated or overtaken
slot and for a promotion without the slot (every major; on 15 the only kind of promotion), and a hot standby
answering reads with cursors valid on both servers. Bounded in rows (a few thousand) and time (seconds of
writes; waits for conditions)."""
import asyncio
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid

import psycopg
import pytest
from websockets.asyncio.client import connect as ws_connect

from conftest import PG, WORK, extra_port
from test_relay import CLUSTER, ExtraCluster, wait_until

PRIMARY, STANDBY, SINGLE = extra_port("ha_primary"), extra_port("ha_standby"), extra_port("ha_slot")
STANDBY_SLOT = f"standby_{STANDBY}"
FAILOVER_SLOTS = PG != "15"
needs_failover_slots = pytest.mark.skipif(not FAILOVER_SLOTS, reason=f"PostgreSQL {PG} has no failover slots")
TRUST = "changerelay.auth = trust"
# What the promoted standby must not inherit from its primary: it has no standby of its own.
ALONE = "synchronous_standby_names = ''\nchangerelay.standby_slots = ''"


def connect(port):
    return psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True,
                           connect_timeout=5)


class Standby(ExtraCluster):
    """A streaming standby of the cluster on `primary` (scripts/cluster.sh standby)."""

    def __init__(self, primary, extra_conf="", sync_slots=True):
        self.dir = os.path.join(WORK, "test-cluster-ha-standby")
        self.port = STANDBY
        self.env = {**os.environ, "PG": PG}
        subprocess.run([CLUSTER, "stop", self.dir], check=False, env=self.env)
        subprocess.run(["rm", "-rf", self.dir], check=True)
        subprocess.run([CLUSTER, "standby", self.dir, str(STANDBY), str(primary.port)], check=True, timeout=180,
                       env={**self.env, "EXTRA_CONF": extra_conf, "SYNC_SLOTS": "on" if sync_slots else "off"})

    def promote(self):
        subprocess.run([CLUSTER, "promote", self.dir], check=True, timeout=120, env=self.env)


def one(port, sql, args=None):
    with connect(port) as c:
        return c.execute(sql, args).fetchone()[0]


def status(port, path="ha"):
    return one(port, f"SELECT changerelay.status()->'{path}'")


def worker_pid(port):
    return one(port, "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_changerelay relay'")


def streaming(port):
    return wait_until(lambda: one(port, "SELECT changerelay.status()->'worker'->>'state'") == "streaming",
                      timeout=60, what=f"the relay on {port} streaming")


def setup_table(port):
    table, label = "ha_" + uuid.uuid4().hex[:8], "hl_" + uuid.uuid4().hex[:8]
    with connect(port) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS pg_changerelay")
        c.execute(f"CREATE TABLE {table} (n int PRIMARY KEY, w int)")
        c.execute("SELECT changerelay.track(%s, %s)", (table, label))
    streaming(port)
    return table, label


def wait_failover_ready(primary, standby):
    """Until the standby's copy of the relay's slot is sync-ready (PostgreSQL logs a standby snapshot every 15 s;
    asking for one makes the slot's catalog xmin move sooner)."""
    def ready():
        with connect(primary.port) as p:
            p.execute("SELECT pg_log_standby_snapshot()")
        time.sleep(0.2)
        return status(standby.port)["failover_ready"] is True
    wait_until(ready, timeout=90, what="the standby's synchronized slot sync-ready")


def caught_up(primary, standby):
    lsn = one(primary.port, "SELECT pg_current_wal_lsn()::text")
    wait_until(lambda: one(standby.port, "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)), timeout=30,
               what="the standby replayed the primary's WAL")


def kill_postmaster(cluster):
    """kill -9 of the postmaster only; waits until every process of the cluster is gone."""
    with open(os.path.join(cluster.dir, "postmaster.pid")) as f:
        pm = int(f.readline())

    def children():
        out = []
        for d in os.listdir("/proc"):
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pm and fields[0] != "Z":
                    out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
        return out

    procs = [pm] + children()
    os.kill(pm, signal.SIGKILL)

    def gone():
        for p in procs:
            try:
                with open(f"/proc/{p}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        return False
            except OSError:
                pass
        return True
    wait_until(gone, timeout=60, what="the killed primary's processes gone")


def warnings(cluster, text):
    return [line for line in cluster.log().splitlines() if "WARNING" in line and text in line]


# ---------------------------------------------------------------------------------------------------------------
# Writers and followers that move to the new primary
# ---------------------------------------------------------------------------------------------------------------


class Writers:
    """Four writers of numbered rows (1 to 3 per transaction, some rolled back) to whichever server `target`
    names; they reconnect when it goes away or refuses writes."""

    def __init__(self, table, target, n=4):
        self.table, self.target = table, target
        self.stop = threading.Event()
        self.counter = iter(range(1, 10**9))
        self.lock = threading.Lock()
        self.errors = []
        self.last = 0
        self.threads = [threading.Thread(target=self.run, args=(w,), daemon=True) for w in range(n)]
        for t in self.threads:
            t.start()

    def run(self, w):
        rng = random.Random(w)
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect(self.target["port"])
                with self.lock:
                    nums = [next(self.counter) for _ in range(rng.randint(1, 3))]
                    self.last = nums[-1]
                with conn.transaction():
                    for n in nums:
                        conn.execute(f"INSERT INTO {self.table} VALUES (%s, %s)", (n, w))
                    if rng.random() < 0.15:
                        raise psycopg.Rollback()
                time.sleep(rng.random() * 0.01)
            except psycopg.Rollback:
                pass
            except (psycopg.OperationalError, psycopg.errors.ReadOnlySqlTransaction):
                conn = None
                time.sleep(0.1)
            except Exception as e:  # noqa: BLE001
                self.errors.append(e)
                return

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        assert not self.errors, self.errors


class Follower:
    """Follows a label from a cursor on whichever server `target` names, through changes() or the endpoint
    (WebSocket). `seen`: the row numbers in the order received; `resyncs`: the 72000 errors (or resync messages)
    met; with `reload`, a resync reloads the state (the table) and continues from current_cursor()."""

    def __init__(self, kind, table, label, cursor, target, reload=False):
        self.kind, self.table, self.label, self.cursor, self.target, self.reload = \
            kind, table, label, cursor, target, reload
        self.seen, self.positions, self.resyncs, self.errors = [], [], [], []
        self.state = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run_sql if kind == "sql" else self.run_ws, daemon=True)
        self.thread.start()

    def got(self, n, cursor):
        self.seen.append(n)
        self.state.add(n)
        self.positions.append(cursor)
        self.cursor = cursor

    def resync(self, what):
        self.resyncs.append(what)
        if not self.reload:
            raise AssertionError(f"{self.kind} follower had to resync: {what}")
        with connect(self.target["port"]) as c:
            self.cursor = c.execute("SELECT changerelay.current_cursor()").fetchone()[0]
            self.state = {n for (n,) in c.execute(f"SELECT n FROM {self.table}").fetchall()}

    def run_sql(self):
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None or conn.closed:
                    conn = connect(self.target["port"])
                rows = conn.execute("SELECT cursor, new FROM changerelay.changes(%s, %s, 500)",
                                    (self.cursor, [self.label])).fetchall()
                for c, new in rows:
                    self.got(new["n"], c)
                time.sleep(0.02)
            except psycopg.errors.SnapshotTooOld as e:
                self.resync(str(e))
            except psycopg.OperationalError:
                conn = None
                time.sleep(0.2)
            except Exception as e:  # noqa: BLE001
                self.errors.append(e)
                return

    def run_ws(self):
        try:
            asyncio.run(self.ws_loop())
        except Exception as e:  # noqa: BLE001
            self.errors.append(e)

    async def ws_loop(self):
        while not self.stop.is_set():
            try:
                async with ws_connect(f"ws://127.0.0.1:{self.target['port'] + 1000}/ws", open_timeout=3,
                                      close_timeout=1, compression=None, proxy=None) as ws:
                    await ws.send(json.dumps({"op": "subscribe", "labels": [self.label], "since": self.cursor,
                                              "versions": False, "changes": True}))
                    while not self.stop.is_set():
                        try:
                            m = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
                        except asyncio.TimeoutError:
                            continue
                        if m["type"] == "change":
                            self.got(m["new"]["n"], m["cursor"])
                        elif m["type"] == "resync":
                            self.resync(m)
                            break
                        else:
                            assert m["type"] in ("subscribed", "checkpoint"), m
            except AssertionError:
                raise
            except Exception:  # noqa: BLE001  (refused, closed under us: the server went away)
                await asyncio.sleep(0.2)

    def finish(self):
        self.stop.set()
        self.thread.join(30)
        assert not self.errors, f"{self.kind} follower: {self.errors}"


def in_commit_order(positions):
    """(event_id, pos) of each cursor, as test_history does: strictly increasing."""
    import base64
    keys = [base64.urlsafe_b64decode(p[4:] + "=" * (-len(p[4:]) % 4))[13:25] for p in positions]
    return keys == sorted(keys) and len(set(keys)) == len(keys)


def table_rows(port, table):
    with connect(port) as c:
        return sorted(n for (n,) in c.execute(f"SELECT n FROM {table}").fetchall())


def rows_after(port, table, n):
    return one(port, f"SELECT count(*) FROM {table} WHERE n > %s", (n,))


def wait_followers(followers, port, table):
    want = set(table_rows(port, table))
    try:
        wait_until(lambda: all(f.state == want for f in followers), timeout=60,
                   what=f"followers at the new primary's {len(want)} rows")
    except AssertionError as e:
        diff = {f.kind: {"missing": sorted(want - f.state)[:20], "extra": sorted(f.state - want)[:20],
                         "resyncs": f.resyncs[:3], "errors": f.errors[:3]} for f in followers}
        raise AssertionError(f"{e}: {diff}") from None
    return want


# ---------------------------------------------------------------------------------------------------------------
# Synchronous standby: kill -9 of the primary, promotion, exactly once
# ---------------------------------------------------------------------------------------------------------------


@needs_failover_slots
def test_sync_standby_failover_is_exactly_once_in_commit_order():
    primary = ExtraCluster("test-cluster-ha-primary", PRIMARY,
                           f"{TRUST}\nsynchronous_standby_names = '{STANDBY_SLOT}'\n"
                           f"changerelay.standby_slots = '{STANDBY_SLOT}'")
    standby = None
    try:
        standby = Standby(primary, ALONE)
        table, label = setup_table(primary.port)
        wait_failover_ready(primary, standby)
        target = {"port": primary.port}
        start = one(primary.port, "SELECT changerelay.current_cursor()")
        writers = Writers(table, target)
        followers = [Follower("sql", table, label, start, target), Follower("ws", table, label, start, target)]
        wait_until(lambda: all(len(f.seen) > 200 for f in followers), timeout=30, what="followers under way")
        kill_postmaster(primary)
        target["port"] = standby.port   # read-only until promoted: the SQL follower goes on reading it
        standby.promote()
        streaming(standby.port)
        mark = writers.last
        wait_until(lambda: rows_after(standby.port, table, mark) > 200, timeout=30, what="writes on the new primary")
        writers.finish()
        committed = wait_followers(followers, standby.port, table)
        for f in followers:
            f.finish()
            assert len(f.seen) == len(set(f.seen)), f"{f.kind}: a change seen twice"
            assert set(f.seen) == committed, f"{f.kind}: missing {sorted(committed - set(f.seen))[:10]}"
            assert in_commit_order(f.positions), f"{f.kind}: not in commit order"
            assert not f.resyncs
        assert len(committed) > 300
        assert status(standby.port)["last_gap"] is None
        print(f"sync failover: {len(committed)} rows, followers saw {[len(f.seen) for f in followers]}")
    finally:
        if standby:
            standby.stop()
        primary.stop()


# ---------------------------------------------------------------------------------------------------------------
# Asynchronous standby cut off, then promoted: the publish gate
# ---------------------------------------------------------------------------------------------------------------


@needs_failover_slots
@pytest.mark.parametrize("gate", ["on", "off"])
def test_async_standby_cut_off_then_promoted(gate):
    """Gate on: nothing the cut-off standby lacks is ever shown, followers go on exactly once. Gate off: followers
    saw such changes, get the diverged-timeline error (SQL) / resync (endpoint), reload and end equal to the new
    primary."""
    primary = ExtraCluster("test-cluster-ha-primary", PRIMARY,
                           f"{TRUST}\nchangerelay.standby_slots = '{STANDBY_SLOT}'\nchangerelay.publish_gate = {gate}")
    standby = None
    try:
        standby = Standby(primary, ALONE)
        table, label = setup_table(primary.port)
        wait_failover_ready(primary, standby)
        target = {"port": primary.port}
        start = one(primary.port, "SELECT changerelay.current_cursor()")
        writers = Writers(table, target)
        followers = [Follower("sql", table, label, start, target, reload=gate == "off"),
                     Follower("ws", table, label, start, target, reload=gate == "off")]
        wait_until(lambda: all(len(f.seen) > 50 for f in followers), timeout=30, what="followers under way")
        with connect(standby.port) as s:
            s.execute("ALTER SYSTEM SET primary_conninfo = ''")
            s.execute("SELECT pg_reload_conf()")
            wait_until(lambda: s.execute("SELECT count(*) FROM pg_stat_wal_receiver").fetchone()[0] == 0,
                       what="the standby cut off")
        cut_at = writers.last
        wait_until(lambda: rows_after(primary.port, table, cut_at) > 300, timeout=30, what="writes after the cut")
        if gate == "off":
            wait_until(lambda: all(max(f.seen) > cut_at for f in followers), timeout=30,
                       what="followers seeing changes the standby lacks")
        else:
            time.sleep(0.5)
            assert all(max(f.seen) <= cut_at for f in followers), "the gate held back what the standby lacks"
        old_rows = set(table_rows(primary.port, table))
        kill_postmaster(primary)
        standby.promote()
        streaming(standby.port)
        lost = old_rows - set(table_rows(standby.port, table))
        assert lost, "the old primary committed rows the standby never got"
        target["port"] = standby.port
        mark = writers.last
        wait_until(lambda: rows_after(standby.port, table, mark) > 200, timeout=30, what="writes on the new primary")
        writers.finish()
        committed = wait_followers(followers, standby.port, table)
        print(f"async, gate {gate}: {len(committed)} rows on the new primary, {len(lost)} lost with the old one, "
              f"followers saw {[len(f.seen) for f in followers]}, resyncs {[len(f.resyncs) for f in followers]}")
        for f in followers:
            f.finish()
            if gate == "on":
                assert not (set(f.seen) & lost), f"{f.kind} saw changes the new primary lacks"
                assert not f.resyncs
                assert len(f.seen) == len(set(f.seen)) and set(f.seen) == committed
                assert in_commit_order(f.positions)
            else:
                assert f.resyncs, f"{f.kind}: no resync although it saw changes the new primary lacks"
                first = f.resyncs[0]
                if f.kind == "sql":
                    assert "timeline that diverged" in first, first
                else:
                    assert first["reason"] == "timeline_diverged", first
                assert f.state == committed
    finally:
        if standby:
            standby.stop()
        primary.stop()


# ---------------------------------------------------------------------------------------------------------------
# Explicit gaps on one server: slot dropped, invalidated, confirmed beyond the history
# ---------------------------------------------------------------------------------------------------------------


def release_slot(port):
    """Terminates the relay worker; returns once its slot is free (the postmaster restarts it 2 s later)."""
    with connect(port) as c:
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'pg_changerelay relay'")
        wait_until(lambda: c.execute("SELECT NOT active FROM pg_replication_slots WHERE slot_name = 'changerelay'")
                   .fetchone()[0], timeout=5, what="the slot released")


def check_explicit_gap(cluster, port, cursor, reason, message):
    """Old cursors get the gap's 72000 error, once logged, shown in status; no restart loop; new changes flow."""
    gap = wait_until(lambda: (g := status(port)["last_gap"]) and g["reason"] == reason and g, timeout=30,
                     what=f"a {reason} gap")
    with connect(port) as c:
        with pytest.raises(psycopg.errors.SnapshotTooOld) as err:
            c.execute("SELECT * FROM changerelay.changes(%s)", (cursor,))
        assert str(err.value).startswith(message), str(err.value)
        assert "current_cursor()" in err.value.diag.message_hint
        assert "history continues from event" in err.value.diag.message_detail
    assert len(warnings(cluster, "the change history has a gap")) == 1, warnings(cluster, "gap")
    pid = worker_pid(port)
    time.sleep(3)
    assert worker_pid(port) == pid, "no restart loop"
    return gap


def test_a_dropped_slot_is_an_explicit_gap():
    cluster = ExtraCluster("test-cluster-ha-slot", SINGLE, "")
    try:
        table, label = setup_table(cluster.port)
        with connect(cluster.port) as c:
            c.execute(f"INSERT INTO {table} VALUES (1, 0)")
            wait_until(lambda: c.execute("SELECT count(*) FROM changerelay.changes(NULL, %s)", ([label],))
                       .fetchone()[0] == 1, what="the first change")
            cursor = c.execute("SELECT changerelay.current_cursor()").fetchone()[0]
        release_slot(cluster.port)
        with connect(cluster.port) as c:
            c.execute("SELECT pg_drop_replication_slot('changerelay')")
            c.execute(f"INSERT INTO {table} VALUES (2, 0)")   # lost with the slot
        check_explicit_gap(cluster, cluster.port, cursor, "slot_missing",
                           "cursor predates a gap in the change history: the relay's replication slot was lost")
        with connect(cluster.port) as c:
            fresh = c.execute("SELECT changerelay.current_cursor()").fetchone()[0]
            c.execute(f"INSERT INTO {table} VALUES (3, 0)")
            wait_until(lambda: [r[0]["n"] for r in c.execute("SELECT new FROM changerelay.changes(%s, %s)",
                                                              (fresh, [label])).fetchall()] == [3],
                       what="changes after the gap")
            if FAILOVER_SLOTS:
                assert c.execute("SELECT failover FROM pg_replication_slots WHERE slot_name = 'changerelay'"
                                 ).fetchone()[0] is True, "the new slot is a failover slot"
    finally:
        cluster.stop()


def test_an_invalidated_slot_is_an_explicit_gap():
    cluster = ExtraCluster("test-cluster-ha-slot", SINGLE, "max_slot_wal_keep_size = '1MB'")
    try:
        table, label = setup_table(cluster.port)
        with connect(cluster.port) as c:
            c.execute(f"INSERT INTO {table} VALUES (1, 0)")
            wait_until(lambda: c.execute("SELECT count(*) FROM changerelay.changes(NULL, %s)", ([label],))
                       .fetchone()[0] == 1, what="the first change")
            cursor = c.execute("SELECT changerelay.current_cursor()").fetchone()[0]
            # The worker keeps its slot but decodes nothing: WAL piles up past max_slot_wal_keep_size.
            c.execute("ALTER SYSTEM SET changerelay.enabled = off")
            c.execute("SELECT pg_reload_conf()")
            wait_until(lambda: c.execute("SELECT changerelay.status()->'worker'->>'state'").fetchone()[0]
                       == "disabled", what="the worker disabled")

            def lost():
                c.execute(f"INSERT INTO {table} VALUES ((SELECT max(n) + 1 FROM {table}), 0)")
                c.execute("SELECT pg_switch_wal()")
                c.execute("CHECKPOINT")
                return c.execute("SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'changerelay'"
                                 ).fetchone()[0] == "lost"
            wait_until(lambda: lost() or time.sleep(0.2), timeout=60, what="the slot invalidated")
            c.execute("ALTER SYSTEM RESET changerelay.enabled")
            c.execute("SELECT pg_reload_conf()")
        gap = check_explicit_gap(cluster, cluster.port, cursor, "slot_invalidated",
                                 "cursor predates a gap in the change history: the relay's replication slot was "
                                 "invalidated")
        assert "invalidated" in gap["detail"]
        streaming(cluster.port)
    finally:
        cluster.stop()


def test_a_slot_confirmed_beyond_the_history_is_an_explicit_gap():
    cluster = ExtraCluster("test-cluster-ha-slot", SINGLE, "")
    try:
        table, label = setup_table(cluster.port)
        with connect(cluster.port) as c:
            c.execute(f"INSERT INTO {table} VALUES (1, 0)")
            wait_until(lambda: c.execute("SELECT count(*) FROM changerelay.changes(NULL, %s)", ([label],))
                       .fetchone()[0] == 1, what="the first change")
            cursor = c.execute("SELECT changerelay.current_cursor()").fetchone()[0]
        # While the worker is away, someone consumes a tracked change from its slot (as a synchronised slot
        # ahead of its standby's history would look after a failover).
        release_slot(cluster.port)
        with connect(cluster.port) as c:
            c.execute(f"INSERT INTO {table} VALUES (2, 0)")
            c.execute("SELECT pg_replication_slot_advance('changerelay', pg_current_wal_lsn())")
        check_explicit_gap(cluster, cluster.port, cursor, "slot_ahead_of_history",
                           "cursor predates a gap in the change history: the relay's replication slot was "
                           "confirmed beyond the history")
    finally:
        cluster.stop()


# ---------------------------------------------------------------------------------------------------------------
# Promotion without the slot (every major; PostgreSQL 15 has no failover slots at all)
# ---------------------------------------------------------------------------------------------------------------


def test_promotion_without_the_slot_is_an_explicit_resync():
    primary = ExtraCluster("test-cluster-ha-primary", PRIMARY, TRUST)
    standby = None
    try:
        standby = Standby(primary, ALONE, sync_slots=False)
        table, label = setup_table(primary.port)
        with connect(primary.port) as c:
            c.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 10) g")
            wait_until(lambda: c.execute("SELECT count(*) FROM changerelay.changes(NULL, %s)", ([label],))
                       .fetchone()[0] == 10, what="the changes relayed")
            cursor = c.execute("SELECT changerelay.current_cursor()").fetchone()[0]
        caught_up(primary, standby)
        subprocess.run([CLUSTER, "stop", primary.dir], check=True, timeout=120, env=primary.env)
        standby.promote()
        check_explicit_gap(standby, standby.port, cursor, "promoted_without_slot",
                           "cursor predates a gap in the change history: this server was promoted without the "
                           "relay's replication slot")
        ws = subprocess.run(["curl", "-s", "--noproxy", "*", "--max-time", "10",
                             f"http://127.0.0.1:{standby.port + 1000}/changes?labels={label}&since={cursor}&wait=0"],
                            capture_output=True, text=True, timeout=15)
        assert json.loads(ws.stdout)["reason"] == "history_gap", ws.stdout
        with connect(standby.port) as c:
            fresh = c.execute("SELECT changerelay.current_cursor()").fetchone()[0]
            c.execute(f"INSERT INTO {table} VALUES (11, 0)")
            wait_until(lambda: [r[0]["n"] for r in c.execute("SELECT new FROM changerelay.changes(%s, %s)",
                                                              (fresh, [label])).fetchall()] == [11],
                       what="changes after the promotion")
    finally:
        if standby:
            standby.stop()
        primary.stop()


# ---------------------------------------------------------------------------------------------------------------
# Hot standby: read-only answers, cursors valid on both servers
# ---------------------------------------------------------------------------------------------------------------


def test_a_hot_standby_answers_reads_with_cursors_valid_on_both():
    primary = ExtraCluster("test-cluster-ha-primary", PRIMARY, "")
    standby = None
    try:
        standby = Standby(primary, ALONE)
        table, label = setup_table(primary.port)
        p, s = connect(primary.port), connect(standby.port)
        start = p.execute("SELECT changerelay.current_cursor()").fetchone()[0]
        p.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 20) g")
        p.execute(f"UPDATE {table} SET w = 1 WHERE n = 7")
        wait_until(lambda: len(p.execute("SELECT * FROM changerelay.changes(%s, %s)", (start, [label])).fetchall())
                   == 21, what="the changes relayed")
        caught_up(primary, standby)
        read = "SELECT cursor, event_id, seq, op, identifier, new FROM changerelay.changes(%s, %s)"
        on_primary = p.execute(read, (start, [label])).fetchall()
        assert s.execute(read, (start, [label])).fetchall() == on_primary, "the same changes and cursors"
        middle = on_primary[9][0]
        assert s.execute(read, (middle, [label])).fetchall() == on_primary[10:]
        # Versions reach the standby with the primary's next version checkpoint (10 s while they move,
        # or once the worker is idle that long): equal then, and never behind what it showed before.
        for sql in ("SELECT changerelay.version_map(%s)", "SELECT changerelay.version(%s)"):
            wait_until(lambda: s.execute(sql, (label,)).fetchone() == p.execute(sql, (label,)).fetchone(),
                       timeout=40, what=f"{sql} on the standby equal to the primary's")
        assert s.execute("SELECT changerelay.version(%s, '7')", (label,)).fetchone()[0] == on_primary[-1][1]
        s_cursor = s.execute("SELECT changerelay.current_cursor()").fetchone()[0]
        assert p.execute(read, (s_cursor, [label])).fetchall() == [], "the standby's cursor works on the primary"
        assert status(standby.port)["role"] == "standby"
        # watch() on the standby wakes when replay brings a change.
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("rows", connect(standby.port).execute(
            "SELECT identifier FROM changerelay.watch(%s, %s, '20 seconds')", (s_cursor, [label])).fetchall()))
        t.start()
        time.sleep(0.3)
        p.execute(f"INSERT INTO {table} VALUES (100, 0)")
        committed = time.monotonic()
        t.join(25)
        assert out["rows"] == [("100",)]
        assert time.monotonic() - committed < 5
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            s.execute("SELECT changerelay.untrack(%s)", (table,))
    finally:
        if standby:
            standby.stop()
        primary.stop()
