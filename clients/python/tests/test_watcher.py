"""The blocking follower of changerelay.watch() (changerelay.Watcher) over psycopg, against a real cluster."""
import threading

import psycopg
import pytest

from changerelay import ResyncRequired, Watcher

from conftest import DSN, connect, current_cursor, forge, history, insert, restart_worker, wait_until


def test_follows_watch_across_a_worker_restart(db, tracked):
    table, label = tracked
    start = current_cursor(db)
    got = []
    with connect() as conn:
        watcher = Watcher(conn, [label], since=start, timeout=1.0)

        def consume():
            for change in watcher:
                got.append(change)
                if len(got) == 46:
                    watcher.stop()

        th = threading.Thread(target=consume, daemon=True)
        th.start()
        insert(db, table, 1, 15)
        wait_until(lambda: len(got) >= 15, what="15 changes")
        restart_worker(db, while_down=lambda: insert(db, table, 16, 30))
        insert(db, table, 31, 46)
        th.join(30)
        assert not th.is_alive(), f"{len(got)} changes"
    assert [c["new"]["id"] for c in got] == [str(i) for i in range(1, 47)]
    truth = history(db, start, label)
    assert [c["cursor"] for c in got] == [c for c, _ in truth]
    assert watcher.cursor == truth[-1][0]
    assert got[0]["type"] == "change" and got[0]["table"] == f"public.{table}" and got[0]["op"] == "insert"


def test_from_now_and_resync(db, tracked):
    table, label = tracked
    with connect() as conn:
        watcher = Watcher(conn, [label], timeout=0.2)
        assert watcher.poll() == [] and watcher.cursor is not None, "from now: the current position"
        insert(db, table, 1, 1)
        assert [c["new"]["id"] for c in wait_until(watcher.poll, what="the change")] == ["1"]

        stale = Watcher(conn, [label], since=forge(current_cursor(db), 12345), timeout=0.2)
        with pytest.raises(ResyncRequired) as e:
            stale.poll()
        assert isinstance(e.value.error, psycopg.errors.SnapshotTooOld)

        seen = []
        resyncing = Watcher(conn, [label], since=forge(current_cursor(db), 12345), timeout=0.2,
                            on_resync=seen.append)
        assert resyncing.poll() == [] and len(seen) == 1
        insert(db, table, 2, 2)
        assert [c["new"]["id"] for c in wait_until(resyncing.poll, what="the change after the resync")] == ["2"]

    with psycopg.connect(DSN) as not_autocommit, pytest.raises(ValueError):
        Watcher(not_autocommit, [label])
