"""The asyncio client (changerelay.Relay) against a real cluster: a change feed across a worker restart,
resync from a cursor of another cluster, and the loader semantics. Blocking database calls run in threads so
the client keeps working meanwhile."""
import asyncio
import time

from changerelay import Backoff, ChangeFeed, Relay

from conftest import ENDPOINT, applied, current_cursor, forge, history, insert, restart_worker, version


async def until(fn, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Recorder:
    """A relay with its events recorded."""

    def __init__(self, relay):
        self.relay = relay
        self.changes, self.closes, self.errors, self.resyncs = [], [], [], []
        relay.on("change", self.changes.append)
        relay.on("close", self.closes.append)
        relay.on("error", self.errors.append)
        relay.on("resync", self.resyncs.append)


def test_changes_across_a_worker_restart_nothing_missed_or_repeated(db, tracked, token):
    table, label = tracked
    secret = token([label], rows=True)
    start = current_cursor(db)

    async def run():
        relay = Relay(ENDPOINT, secret, changes=ChangeFeed([label], cursor=start), backoff=Backoff(0.1, 1.0))
        r = Recorder(relay)
        async with relay:
            await asyncio.wait_for(relay.ready(), 10)
            await asyncio.to_thread(insert, db, table, 1, 15)
            await until(lambda: len(r.changes) >= 15, what="15 changes")
            await asyncio.to_thread(restart_worker, db, lambda: insert(db, table, 16, 30))
            await asyncio.to_thread(insert, db, table, 31, 45)
            await until(lambda: len(r.changes) >= 45, what="45 changes")
            # A last change: anything repeated would have come before it.
            await asyncio.to_thread(insert, db, table, 46, 46)
            await until(lambda: len(r.changes) >= 46, what="46 changes")
            await asyncio.sleep(0.2)
            return r, relay.cursor, relay.connections

    r, cursor, connections = asyncio.run(run())
    assert [c["new"]["id"] for c in r.changes] == [str(i) for i in range(1, 47)], "each exactly once, in order"
    truth = history(db, start, label)
    assert [c["cursor"] for c in r.changes] == [c for c, _ in truth]
    assert cursor == truth[-1][0]
    assert connections >= 2
    assert any(c.code == 1001 and c.retry_in is not None for c in r.closes), r.closes
    assert r.errors == [] and r.resyncs == []


def test_a_cursor_of_another_cluster_resyncs_from_now(db, tracked, token):
    table, label = tracked
    secret = token([label], rows=True)
    foreign = forge(current_cursor(db), 12345)

    async def run():
        relay = Relay(ENDPOINT, secret, changes=ChangeFeed([label], cursor=foreign))
        r = Recorder(relay)
        async with relay:
            await until(lambda: r.resyncs, what="a resync")
            await until(lambda: relay.cursor is not None, what="the feed subscribed again from now")
            await asyncio.wait_for(relay.ready(), 10)
            await asyncio.to_thread(insert, db, table, 1, 1)
            await until(lambda: r.changes, what="the change after the resync")
            return r

    r = asyncio.run(run())
    assert r.resyncs[0]["reason"] == "cursor_foreign" and r.resyncs[0]["labels"] == [label]
    assert [c["new"]["id"] for c in r.changes] == ["1"]


def test_loaders_run_at_start_and_on_increase_not_on_repeats_never_overlapping(db, tracked, token):
    table, label = tracked
    db.execute(f"INSERT INTO {table} VALUES ('k1', 'a'), ('k2', 'b')")
    secret = token([label], rows=False)
    runs = {"all": [], "k1": []}
    active = {"all": 0, "k1": 0}
    overlap = {"all": 0, "k1": 0}

    def loader(key):
        async def load(v):
            active[key] += 1
            overlap[key] = max(overlap[key], active[key])
            run = {"v": v.v, "started": time.monotonic(), "ended": None}
            runs[key].append(run)
            await asyncio.sleep(0.3)
            run["ended"] = time.monotonic()
            active[key] -= 1
            return v.v
        return load

    def settled(key, n, v=None):
        rs = runs[key]
        return len(rs) >= n and all(r["ended"] for r in rs) and (v is None or rs[-1]["v"] == v)

    async def run():
        relay = Relay(ENDPOINT, secret, backoff=Backoff(0.1, 1.0))
        errors = []
        relay.on("error", errors.append)
        async with relay:
            whole = relay.loader(label, loader("all"))
            row = relay.loader(label, loader("k1"), identifier="k1")
            assert await asyncio.wait_for(whole.ready(), 10) == version(db, label)
            assert await asyncio.wait_for(row.ready(), 10) == version(db, label, "k1")
            assert len(runs["all"]) == len(runs["k1"]) == 1, "once each at start"

            since = current_cursor(db)
            db.execute(f"UPDATE {table} SET v = 'B' WHERE id = 'k2'")
            v2 = await asyncio.to_thread(applied, db, since, label, 1)
            await until(lambda: settled("all", 2, v2), what="all's second run")
            await asyncio.sleep(0.3)
            assert len(runs["k1"]) == 1, "k1's version did not move"

            # A burst of five k1 versions while its loader is busy: coalesced, the newest last.
            since = current_cursor(db)
            await asyncio.to_thread(lambda: [db.execute(f"UPDATE {table} SET v = 'a{i}' WHERE id = 'k1'")
                                             for i in range(5)])
            final = await asyncio.to_thread(applied, db, since, label, 5)
            await until(lambda: settled("k1", 2, final), what="k1 at its newest version")
            assert row.value == final and row.version.v == final
            assert len(runs["k1"]) - 1 in (1, 2), f"five versions coalesced into {len(runs['k1']) - 1} runs"
            await until(lambda: settled("all", 3, final), what="all at its newest version")

            # Repeats: after a worker restart the same versions arrive again; nothing runs.
            before = {k: len(v) for k, v in runs.items()}
            connections = relay.connections
            await asyncio.to_thread(restart_worker, db)
            await until(lambda: relay.connections > connections, what="a reconnection")
            await asyncio.wait_for(relay.ready(), 10)
            await asyncio.sleep(0.6)
            assert {k: len(v) for k, v in runs.items()} == before, "no run for repeated versions"

            since = current_cursor(db)
            db.execute(f"UPDATE {table} SET v = 'z' WHERE id = 'k1'")
            v3 = await asyncio.to_thread(applied, db, since, label, 1)
            await until(lambda: settled("k1", before["k1"] + 1, v3), what="k1 after the restart")
            return errors

    errors = asyncio.run(run())
    for key, rs in runs.items():
        vs = [r["v"] for r in rs]
        assert vs == sorted(set(vs)), f"{key}: versions only grow, never twice: {vs}"
        assert overlap[key] == 1, f"{key}: never two runs at once"
        assert all(b["started"] >= a["ended"] for a, b in zip(rs, rs[1:])), key
    assert errors == []
