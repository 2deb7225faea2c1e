"""A blocking follower of ``changerelay.watch()`` over a psycopg connection: the README's SQL client loop, with
the cursor kept, reconnection after the server restarted, and resync when the cursor cannot be served.

    with psycopg.connect(dsn, autocommit=True) as conn:
        watcher = Watcher(conn, ["parameters"], since=load_cursor())
        for change in watcher:            # blocks; changes in commit order, each once
            apply(change)
            save_cursor(watcher.cursor)   # the position after `change`

Changes have the shape of the endpoint's change objects (``protocol.Change``).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, List, Optional

import psycopg
from psycopg.types.json import Jsonb

from .backoff import Backoff
from .protocol import Change, Filter

_COLUMNS = ("cursor", "event_id", "seq", "ts", "xid", "label", "table", "op", "identifier", "key", "new", "old",
            "metadata")


class ResyncRequired(Exception):
    """The cursor cannot be served (history pruned, another cluster, restored server): reload the state derived
    from changes, then go on from :meth:`Watcher.reset`. Raised only without an ``on_resync`` callback."""

    def __init__(self, error: psycopg.Error):
        super().__init__(str(error))
        self.error = error


class Watcher:
    """Follows changes of ``labels`` (None: every label the role may read) from ``since`` (None: from now).

    Each call of ``watch()`` waits up to ``timeout`` seconds. ``on_resync(error)``, when given, is called when
    the cursor cannot be served, after which the watcher goes on from the current position; without it,
    :class:`ResyncRequired` is raised. When the connection breaks, ``reconnect()`` (if given) must return a new
    autocommit connection; the watcher retries it with backoff and resumes from its cursor.
    """

    def __init__(self, conn: psycopg.Connection, labels: Optional[List[str]] = None, *,
                 since: Optional[str] = None, timeout: float = 30.0, max_events: int = 1000,
                 filter: Optional[Filter] = None, on_resync: Optional[Callable[[psycopg.Error], Any]] = None,
                 reconnect: Optional[Callable[[], psycopg.Connection]] = None, backoff: Optional[Backoff] = None):
        if not conn.autocommit:
            raise ValueError("Watcher needs an autocommit connection: each watch() is a transaction of its own")
        self.conn = conn
        self.labels = labels
        self.cursor = since
        self.timeout = timeout
        self.max_events = max_events
        self.filter = filter
        self.on_resync = on_resync
        self.reconnect = reconnect
        self.backoff = backoff or Backoff()
        self._stopped = False

    def reset(self) -> None:
        """Goes on from the current position (after a resync)."""
        self.cursor = self.conn.execute("SELECT changerelay.current_cursor()").fetchone()[0]

    def stop(self) -> None:
        """Ends the iteration after the current ``watch()`` call returns."""
        self._stopped = True

    def poll(self) -> List[Change]:
        """One ``watch()`` call: the changes after the cursor (possibly none after ``timeout``); the cursor then
        stands after the last of them."""
        changes = self._watch()
        if changes:
            self.cursor = changes[-1]["cursor"]
        return changes

    def __iter__(self) -> Iterator[Change]:
        """Every change, forever (until :meth:`stop`); ``cursor`` is the position after the change just
        yielded."""
        while not self._stopped:
            for change in self._watch():
                self.cursor = change["cursor"]
                yield change

    def _watch(self) -> List[Change]:
        if self.cursor is None:
            # "From now" is the current position, so nothing committed between two calls is missed.
            self.reset()
        try:
            rows = self.conn.execute(
                "SELECT cursor, event_id, seq, ts, xid, label, table_name, op, identifier, key, new, old, metadata "
                "FROM changerelay.watch(%s, %s, make_interval(secs => %s), %s, %s)",
                (self.cursor, self.labels, self.timeout, self.max_events,
                 Jsonb(self.filter) if self.filter is not None else None)).fetchall()
        except psycopg.errors.SnapshotTooOld as e:
            if self.on_resync is None:
                raise ResyncRequired(e) from e
            self.on_resync(e)
            self.reset()
            return []
        except psycopg.OperationalError:
            if self.reconnect is None:
                raise
            self._reconnect()
            return []
        self.backoff.reset()
        return [dict(zip(_COLUMNS, r), type="change") for r in rows]  # type: ignore[misc]

    def _reconnect(self) -> None:
        while not self._stopped:
            time.sleep(self.backoff.next())
            try:
                conn = self.reconnect()  # type: ignore[misc]
            except psycopg.OperationalError:
                continue
            if not conn.autocommit:
                raise ValueError("reconnect() must return an autocommit connection")
            self.conn = conn
            return
