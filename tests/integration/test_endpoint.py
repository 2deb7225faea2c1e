"""The relay worker's WebSocket/HTTP/SSE endpoint (README: "The endpoint"), driven by clients nobody here wrote:
the `websockets` library for WebSocket, curl for HTTP, long-poll and Server-Sent Events, and a raw socket
where a misbehaving client is the point. Everything runs on 127.0.0.1 with a timeout."""
import asyncio
import base64
import json
import random
import re
import select
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid

import psycopg
import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import PORT, connect, extra_port
from test_history import forge
from test_relay import ExtraCluster, wait_until

EP = PORT + 1000  # changerelay.port of the test clusters: the server's port + 1000

# ---------------------------------------------------------------------------------------------------------------
# HTTP through curl
# ---------------------------------------------------------------------------------------------------------------


class Resp:
    def __init__(self, raw):
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else None
        self.headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            self.headers[k.strip().lower()] = v.strip()
        self.body = body.decode()

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status_line} {self.headers} {self.body[:300]!r}>"


def curl_args(path, headers=(), token=None, port=EP, max_time=10, method=None, stream=False):
    args = ["curl", "-s", "-i", "--noproxy", "*", "--max-time", str(max_time)]
    if stream:
        args.append("-N")
    if method:
        args += ["-X", method]
    if token:
        args += ["-H", f"Authorization: Bearer {token}"]
    for h in headers:
        args += ["-H", h]
    return args + [f"http://127.0.0.1:{port}{path}"]


def http(path, headers=(), token=None, port=EP, max_time=10, method=None):
    out = subprocess.run(curl_args(path, headers, token, port, max_time, method), capture_output=True,
                         timeout=max_time + 5)
    return Resp(out.stdout)


class Background:
    """A curl running in the background; `ended_at` is when it exited (time.monotonic())."""

    def __init__(self, path, **kw):
        self.proc = subprocess.Popen(curl_args(path, **kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.ended_at = None
        self.out = b""
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self):
        self.out, _ = self.proc.communicate()
        self.ended_at = time.monotonic()

    def result(self, timeout=15):
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.proc.kill()
            raise AssertionError("curl did not finish in time")
        return Resp(self.out)


def sse_events(body):
    """Parses an event stream into a list of dicts (`id`, `event`, `data`, `retry`), one per event."""
    events = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        ev = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                k, _, v = line.partition(":")
                ev[k] = v[1:] if v.startswith(" ") else v
        if ev:
            events.append(ev)
    return events


def metrics(port=EP):
    r = http("/metrics", port=port)
    assert r.status == 200, r
    values = {}
    for line in r.body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


# ---------------------------------------------------------------------------------------------------------------
# WebSocket through the websockets library
# ---------------------------------------------------------------------------------------------------------------


def ws_open(secret=None, port=EP, query="", **kw):
    headers = {"Authorization": f"Bearer {secret}"} if secret else None
    return ws_connect(f"ws://127.0.0.1:{port}/ws{query}", additional_headers=headers, open_timeout=5,
                      close_timeout=2, compression=None, proxy=None, **kw)


async def recv(ws, timeout=5.0):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def send(ws, msg):
    await ws.send(msg if isinstance(msg, str) else json.dumps(msg))


async def subscribe(ws, **cmd):
    await send(ws, {"op": "subscribe", **cmd})
    first = await recv(ws)
    assert first["type"] == "subscribed", first
    return first


async def next_change(ws, deadline):
    """The next change message, skipping checkpoints; None when the deadline passes."""
    while (left := deadline - time.monotonic()) > 0:
        try:
            m = await recv(ws, left)
        except asyncio.TimeoutError:
            return None
        if m["type"] == "change":
            return m
        assert m["type"] == "checkpoint", m
    return None


async def closed_code(ws, timeout=5.0):
    """Reads until the connection closes (within `timeout` in all); returns (close code or None when no close
    frame came, messages read meanwhile)."""
    got = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            got.append(json.loads(await asyncio.wait_for(ws.recv(), max(0.0, deadline - time.monotonic()))))
    except ConnectionClosed as e:
        return (e.rcvd.code if e.rcvd else None), got
    except asyncio.TimeoutError:
        raise AssertionError(f"still open after {timeout} s; read {len(got)} messages") from None


# ---------------------------------------------------------------------------------------------------------------
# Database side
# ---------------------------------------------------------------------------------------------------------------


def cursor_pos(cursor):
    """(event_id, pos) of a cr1_ cursor: version(1) system_id(8) timeline(4) event_id(8) pos(4) check(2)."""
    raw = base64.urlsafe_b64decode(cursor[4:] + "=" * (-len(cursor[4:]) % 4))
    return int.from_bytes(raw[13:21], "big"), int.from_bytes(raw[21:25], "big")


def current_cursor(db):
    return db.execute("SELECT changerelay.current_cursor()").fetchone()[0]


def history(db, since, label):
    """changerelay.changes() after `since` for one label, as the endpoint's change objects look."""
    rows = db.execute("""SELECT cursor, event_id, seq, op, identifier, key, new, old, metadata
                         FROM changerelay.changes(%s, %s, 10000)""", (since, [label])).fetchall()
    return [dict(zip(("cursor", "event_id", "seq", "op", "identifier", "key", "new", "old", "metadata"), r))
            for r in rows]


def version(db, label, ident=None):
    return db.execute("SELECT changerelay.version(%s, %s)", (label, ident)).fetchone()[0]


def version_map(db, label):
    return db.execute("SELECT changerelay.version_map(%s)", (label,)).fetchone()[0]


def new_table(db, ddl="id int PRIMARY KEY, v text"):
    table, label = "ep_" + uuid.uuid4().hex[:10], "el_" + uuid.uuid4().hex[:10]
    db.execute(f"CREATE TABLE {table} ({ddl})")
    db.execute("SELECT changerelay.track(%s, %s)", (table, label))
    return table, label


def streaming(port=EP):
    r = http("/health", port=port)
    return r.status == 200 and r


@pytest.fixture(scope="module", autouse=True)
def endpoint_up(admin):
    wait_until(streaming, timeout=30, what=f"the endpoint on {EP} reporting 200 /health")


@pytest.fixture
def tracked(db):
    table, label = new_table(db)
    yield table, label
    db.execute(f"DROP TABLE IF EXISTS {table}")


@pytest.fixture
def tokens(db):
    """make(labels, rows=False) -> (name, secret): a token, usable once it returns, revoked afterwards."""
    made = []

    def make(labels, rows=False):
        name = "tk_" + uuid.uuid4().hex[:12]
        secret = db.execute("SELECT changerelay.create_token(%s, %s, %s)", (name, labels, rows)).fetchone()[0]
        made.append(name)
        # The worker reloads tokens after the commit: wait until the endpoint knows it.
        wait_until(lambda: http(f"/versions/{labels[0]}", token=secret).status != 401, timeout=5,
                   what="the new token to reach the endpoint")
        return name, secret

    yield make
    for name in made:
        drop_token(db, name)


def drop_token(db, name):
    """Cleanup: revoke the token unless the test already did."""
    if db.execute("SELECT count(*) FROM changerelay.tokens() WHERE name = %s", (name,)).fetchone()[0]:
        db.execute("SELECT changerelay.revoke_token(%s)", (name,))


# ---------------------------------------------------------------------------------------------------------------
# WebSocket: versions and changes
# ---------------------------------------------------------------------------------------------------------------


def test_ws_versions_full_map_then_deltas_of_moved_entries(db, tracked, tokens):
    """A versions subscription first gets exactly changerelay.version_map(label), then after an UPDATE of one
    row a delta holding only `all` and that row's identifier, with the versions and ts the database has."""
    table, label = tracked
    db.execute(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    wait_until(lambda: version(db, label, "3"), what="initial versions")
    _, secret = tokens([label])

    async def run():
        async with ws_open(secret) as ws:
            sub = await subscribe(ws, labels=[label], versions=True)
            assert sub["labels"] == [label]
            vmap = await recv(ws)
            assert vmap == version_map(db, label)
            assert set(vmap["data"]) == {"all", "1", "2", "3"}

            db.execute(f"UPDATE {table} SET v = 'B' WHERE id = 2")
            delta = await recv(ws)
            (ev,) = [c["event_id"] for c in history(db, None, label) if c["op"] == "update"]
            assert version(db, label) == ev
            now = {i: {"v": v, "ts": ts} for i, v, ts in
                   db.execute("SELECT identifier, v, ts FROM changerelay.versions(%s)", (label,)).fetchall()}
            assert delta == {"label": label, "data": {"all": now["all"], "2": now["2"]}}
            assert delta["data"]["all"]["v"] == ev > vmap["data"]["all"]["v"]
            # Merging the delta into the map gives the database's map.
            merged = {**vmap["data"], **delta["data"]}
            assert merged == version_map(db, label)["data"]

            # After unsubscribe, writes send nothing more.
            await send(ws, {"op": "unsubscribe", "labels": [label]})
            assert await recv(ws) == {"type": "unsubscribed", "labels": [label]}
            db.execute(f"UPDATE {table} SET v = 'C' WHERE id = 3")
            wait_until(lambda: version(db, label) > ev, what="version moved")
            with pytest.raises(asyncio.TimeoutError):
                print("unexpected:", await recv(ws, 0.5))

    asyncio.run(run())


def test_ws_changes_resume_from_cursor_exactly_once_in_commit_order(db, tracked, tokens):
    """While a writer commits numbered rows (single- and multi-row transactions, some rolled back), a client
    reads changes from a cursor, disconnects cleanly, resumes from its last cursor, is cut abruptly, resumes
    again: it sees every committed row exactly once, in commit order, never a rolled-back one, and exactly what
    changerelay.changes() returns (cursors, event ids, seq)."""
    table, label = tracked
    _, secret = tokens([label], rows=True)
    start = current_cursor(db)
    committed, txns = [], []
    writer_done = threading.Event()

    def writer():
        rnd = random.Random(7)
        n = 0
        try:
            with connect() as c:
                c.autocommit = False
                for _ in range(260):
                    kind = rnd.choice(["one", "one", "many", "rollback"])
                    rows = list(range(n + 1, n + 1 + (1 if kind == "one" else rnd.randint(2, 5))))
                    n = rows[-1]
                    for r in rows:
                        c.execute(f"INSERT INTO {table} VALUES (%s, %s)", (r, f"row {r}"))
                    if kind == "rollback":
                        c.rollback()
                    else:
                        c.commit()
                        committed.extend(rows)
                        txns.append(rows)
                    time.sleep(0.004)
        finally:
            writer_done.set()

    seen = []  # change messages in the order received

    async def read(since, until, abort=False):
        async with ws_open(secret) as ws:
            sub = await subscribe(ws, labels=[label], versions=False, changes=True, since=since)
            assert sub["cursor"] == since
            deadline = time.monotonic() + 20
            while not until():
                m = await next_change(ws, min(deadline, time.monotonic() + 0.2))
                if m is None:
                    assert time.monotonic() < deadline, f"stalled after {len(seen)} changes; {len(committed)} committed"
                    continue
                seen.append(m)
            if abort:
                ws.transport.abort()  # no close handshake: the server finds a dead socket

    async def run():
        await read(start, lambda: len(seen) >= 150)
        await asyncio.sleep(0.3)  # the writer goes on while nobody listens
        await read(seen[-1]["cursor"], lambda: len(seen) >= 300, abort=True)
        await asyncio.sleep(0.3)
        await read(seen[-1]["cursor"], lambda: writer_done.is_set() and len(seen) >= len(committed))
        # Nothing more arrives (no duplicates at the end).
        async with ws_open(secret) as ws:
            await subscribe(ws, labels=[label], versions=False, changes=True, since=seen[-1]["cursor"])
            assert await next_change(ws, time.monotonic() + 0.5) is None

    th = threading.Thread(target=writer)
    th.start()
    try:
        asyncio.run(run())
    finally:
        th.join(30)
    assert len(committed) > 300 and len(txns) > 150
    numbers = [m["new"]["id"] for m in seen]
    assert numbers == committed, "every committed row exactly once, in commit order"
    positions = [(m["event_id"], m["seq"]) for m in seen]
    assert positions == sorted(set(positions))
    assert [cursor_pos(m["cursor"]) for m in seen] == sorted({cursor_pos(m["cursor"]) for m in seen})
    by_txn = {}
    for m in seen:
        by_txn.setdefault(m["event_id"], []).append((m["seq"], m["new"]["id"]))
    assert [[n for _, n in rows] for rows in by_txn.values()] == txns
    assert all([s for s, _ in rows] == list(range(len(rows))) for rows in by_txn.values())
    truth = history(db, start, label)
    assert [(m["cursor"], m["event_id"], m["seq"], m["op"], m["identifier"], m["key"], m["new"], m["old"])
            for m in seen] == \
           [(t["cursor"], t["event_id"], t["seq"], t["op"], t["identifier"], t["key"], t["new"], t["old"])
            for t in truth]
    assert all(m["label"] == label and m["table"] == f"public.{table}" for m in seen)


def test_tenant_filter_on_websocket_and_long_poll(db, tokens):
    """A `filter` on a WebSocket subscription and on /changes delivers exactly the changes
    changerelay.changes() returns for that filter: inserts and updates by the new row, deletes by the old row."""
    table, label = new_table(db, "id int PRIMARY KEY, tenant text, v text")
    db.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    try:
        _, secret = tokens([label], rows=True)
        start = current_cursor(db)
        flt = {"tenant": ["t1", "t2"]}

        async def run():
            async with ws_open(secret) as ws:
                await subscribe(ws, labels=[label], versions=False, changes=True, filter=flt)
                db.execute(f"INSERT INTO {table} VALUES (1, 't1', 'a'), (2, 't2', 'b'), (3, 't3', 'c')")
                db.execute(f"UPDATE {table} SET v = 'z'")
                db.execute(f"UPDATE {table} SET tenant = 't3' WHERE id = 2")
                db.execute(f"DELETE FROM {table} WHERE id IN (1, 3)")
                got, deadline = [], time.monotonic() + 5
                while len(got) < 5 and (m := await next_change(ws, deadline)):
                    got.append(m)
                assert await next_change(ws, time.monotonic() + 0.5) is None, "nothing beyond the filter"
                return got

        got = asyncio.run(run())
        truth = [dict(zip(("cursor", "op", "identifier"), r)) for r in db.execute(
            "SELECT cursor, op, identifier FROM changerelay.changes(%s, %s, 100, %s)",
            (start, [label], psycopg.types.json.Jsonb(flt))).fetchall()]
        expected = [("insert", "1"), ("insert", "2"), ("update", "1"), ("update", "2"), ("delete", "1")]
        assert [(t["op"], t["identifier"]) for t in truth] == expected
        assert [(m["cursor"], m["op"], m["identifier"]) for m in got] == \
               [(t["cursor"], t["op"], t["identifier"]) for t in truth]
        q = urllib.parse.quote(json.dumps(flt))
        r = http(f"/changes?labels={label}&since={start}&filter={q}&wait=1s", token=secret)
        assert r.status == 200, r
        assert [c["cursor"] for c in r.json()["changes"]] == [t["cursor"] for t in truth]
    finally:
        db.execute(f"DROP TABLE {table}")


# ---------------------------------------------------------------------------------------------------------------
# SSE and long-poll
# ---------------------------------------------------------------------------------------------------------------


def test_sse_resumes_after_last_event_id(db, tracked, tokens):
    """An SSE stream opened with `Last-Event-ID: <cursor of change 1>` (and an older `since`, which the header
    beats) delivers changes 2 and 3 from history, then live change 4, each with its cursor as id."""
    table, label = tracked
    _, secret = tokens([label], rows=True)
    start = current_cursor(db)
    for i in (1, 2, 3):
        db.execute(f"INSERT INTO {table} VALUES ({i}, 'v{i}')")
    wait_until(lambda: len(history(db, start, label)) == 3, what="three changes")
    c1 = history(db, start, label)[0]["cursor"]
    bg = Background(f"/events?labels={label}&since={start}", token=secret, headers=[f"Last-Event-ID: {c1}"],
                    max_time=2.5, stream=True)
    time.sleep(1.0)
    db.execute(f"INSERT INTO {table} VALUES (4, 'v4')")
    r = bg.result()
    assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream"), r
    events = sse_events(r.body)
    assert events[0] == {"retry": "2000"}
    changes = [e for e in events[1:] if e.get("event") == "change"]
    assert all(e.get("event") in ("change", "checkpoint") for e in events[1:]), events
    truth = history(db, start, label)[1:]
    assert [e["id"] for e in changes] == [t["cursor"] for t in truth]
    data = [json.loads(e["data"]) for e in changes]
    assert [d["new"]["id"] for d in data] == [2, 3, 4]
    assert [(d["cursor"], d["event_id"], d["type"]) for d in data] == [(t["cursor"], t["event_id"], "change")
                                                                        for t in truth]


def test_long_poll_immediate_wakes_on_commit_and_times_out_with_cursor(db, tracked, tokens):
    """/changes answers at once when changes exist after `since`; with nothing new, wait=5s returns shortly
    after a commit (well before the 5 s); wait=1s without commits returns [] after about 1 s with a cursor
    that is not before `since`, and polling from it yields exactly the next change."""
    table, label = tracked
    _, secret = tokens([label], rows=True)
    start = current_cursor(db)
    db.execute(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')")
    wait_until(lambda: len(history(db, start, label)) == 2, what="two changes")

    t0 = time.monotonic()
    r = http(f"/changes?labels={label}&since={start}&wait=5s", token=secret)
    took = time.monotonic() - t0
    assert r.status == 200, r
    body = r.json()
    truth = history(db, start, label)
    assert [c["cursor"] for c in body["changes"]] == [t["cursor"] for t in truth]
    assert [c["new"] for c in body["changes"]] == [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}]
    assert cursor_pos(body["cursor"]) >= cursor_pos(truth[-1]["cursor"])
    assert took < 1.0, f"answered after {took:.2f} s although changes were there"

    # Nothing new: wait=5s, a commit after 1 s wakes it.
    since = body["cursor"]
    bg = Background(f"/changes?labels={label}&since={since}&wait=5s", token=secret)
    time.sleep(1.0)
    assert bg.ended_at is None, "returned before anything was committed"
    db.execute(f"INSERT INTO {table} VALUES (3, 'c')")
    committed = time.monotonic()
    r = bg.result()
    woke = bg.ended_at - committed
    print(f"long-poll answered {woke * 1000:.0f} ms after the commit")
    assert r.status == 200, r
    assert [c["new"]["id"] for c in r.json()["changes"]] == [3]
    assert woke < 1.5, f"answered {woke:.2f} s after the commit"

    # Nothing new, no commit: wait=1s ends empty with a cursor to continue from.
    since = r.json()["cursor"]
    t0 = time.monotonic()
    r = http(f"/changes?labels={label}&since={since}&wait=1s", token=secret)
    took = time.monotonic() - t0
    assert r.status == 200, r
    assert r.json()["changes"] == []
    assert 0.9 <= took < 2.5, f"wait=1s took {took:.2f} s"
    cont = r.json()["cursor"]
    assert cont.startswith("cr1_") and len(cont) == 40
    assert cursor_pos(cont) >= cursor_pos(since)
    db.execute(f"INSERT INTO {table} VALUES (4, 'd')")
    r = http(f"/changes?labels={label}&since={cont}&wait=5s", token=secret)
    assert [c["new"]["id"] for c in r.json()["changes"]] == [4]
    assert cursor_pos(r.json()["cursor"]) >= cursor_pos(history(db, start, label)[-1]["cursor"])
    # Polling on from there: nothing lost, nothing repeated.
    db.execute(f"INSERT INTO {table} VALUES (5, 'e')")
    r = http(f"/changes?labels={label}&since={r.json()['cursor']}&wait=5s", token=secret)
    assert [c["new"]["id"] for c in r.json()["changes"]] == [5]


def test_long_poll_cursor_covers_what_was_read(db, tracked, tokens):
    """README: the long-poll answer's `cursor` is the last change's cursor when `max` cut the answer short
    (here inside a two-row transaction), otherwise the point the read reached: at or past the last change, and
    resuming from it yields exactly the next change."""
    table, label = tracked
    _, secret = tokens([label], rows=True)
    start = current_cursor(db)
    db.execute(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')")
    wait_until(lambda: len(history(db, start, label)) == 2, what="two changes")
    truth = history(db, start, label)
    r = http(f"/changes?labels={label}&since={start}&max=1&wait=1s", token=secret).json()
    assert r["cursor"] == truth[0]["cursor"], "max=1 inside a two-row transaction"
    r = http(f"/changes?labels={label}&since={r['cursor']}&max=1&wait=1s", token=secret).json()
    assert [c["new"]["id"] for c in r["changes"]] == [2]
    r = http(f"/changes?labels={label}&since={start}&wait=1s", token=secret).json()
    got = {"history": r["cursor"]}
    bg = Background(f"/changes?labels={label}&since={r['cursor']}&wait=5s", token=secret)
    time.sleep(0.5)
    db.execute(f"INSERT INTO {table} VALUES (3, 'c')")
    live = bg.result().json()
    got["live"] = live["cursor"]
    truth = history(db, start, label)
    assert [c["new"]["id"] for c in live["changes"]] == [3], "resuming from the history cursor: the next change"
    assert cursor_pos(truth[1]["cursor"]) <= cursor_pos(got["history"]) < cursor_pos(truth[2]["cursor"])
    assert cursor_pos(got["live"]) >= cursor_pos(truth[2]["cursor"])
    r = http(f"/changes?labels={label}&since={got['live']}&wait=1s", token=secret).json()
    assert r["changes"] == [], "nothing after the live answer's cursor"


def test_idle_subscription_gets_a_checkpoint_past_other_labels_commits(db, tokens):
    """A change subscription left idle while another label commits gets a `checkpoint` (within about two
    checkpoint periods of 5 s) whose cursor is past that commit; resuming from it yields exactly the next
    change of its own label."""
    mine, label = new_table(db)
    other, _ = new_table(db)
    try:
        _, secret = tokens([label], rows=True)

        async def run():
            async with ws_open(secret) as ws:
                sub = await subscribe(ws, labels=[label], versions=False, changes=True)
                db.execute(f"INSERT INTO {other} VALUES (1, 'elsewhere')")
                moved = cursor_pos(current_cursor(db))
                deadline = time.monotonic() + 11
                while True:
                    m = await recv(ws, max(0.0, deadline - time.monotonic()))
                    assert m["type"] == "checkpoint", m
                    if cursor_pos(m["cursor"]) >= moved:
                        break
                assert cursor_pos(m["cursor"]) >= cursor_pos(sub["cursor"])
                return m["cursor"]

        checkpoint = asyncio.run(run())
        db.execute(f"INSERT INTO {mine} VALUES (7, 'next')")
        r = http(f"/changes?labels={label}&since={checkpoint}&wait=5s", token=secret)
        assert [c["new"]["id"] for c in r.json()["changes"]] == [7], r
    finally:
        db.execute(f"DROP TABLE {mine}, {other}")


def test_foreign_cursor_gets_resync(db, tracked, tokens):
    """A cursor of another cluster gets 410 `resync` `cursor_foreign` from /changes, an `event: resync` that
    ends the SSE stream, and a `resync` message on the WebSocket, whose connection stays usable."""
    table, label = tracked
    _, secret = tokens([label], rows=True)
    foreign = forge(current_cursor(db), 12345)
    r = http(f"/changes?labels={label}&since={foreign}&wait=1s", token=secret)
    assert r.status == 410, r
    assert (r.json()["type"], r.json()["reason"]) == ("resync", "cursor_foreign") and r.json()["message"]
    bg = Background(f"/events?labels={label}&since={foreign}", token=secret, max_time=5, stream=True)
    r = bg.result()
    assert bg.proc.returncode == 0, "the server ended the stream"
    events = sse_events(r.body)
    assert [e.get("event") for e in events] == [None, "resync"], events
    assert json.loads(events[1]["data"])["reason"] == "cursor_foreign"

    async def run():
        async with ws_open(secret) as ws:
            await subscribe(ws, labels=[label], versions=False, changes=True, since=foreign)
            m = await recv(ws)
            assert (m["type"], m["reason"], m["labels"]) == ("resync", "cursor_foreign", [label]), m
            await subscribe(ws, labels=[label], versions=False, changes=True, since=None)
            db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
            m = await next_change(ws, time.monotonic() + 5)
            assert m is not None and m["new"]["id"] == 1

    asyncio.run(run())


# ---------------------------------------------------------------------------------------------------------------
# /versions, tokens
# ---------------------------------------------------------------------------------------------------------------


def test_versions_etag_304_and_new_etag_after_a_write(db, tracked, tokens):
    """/versions/{label} returns the version map with ETag "<all.v>"; If-None-Match with it gets 304; after a
    write the old ETag gets 200 with a new ETag equal to the new all.v."""
    table, label = tracked
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    v1 = wait_until(lambda: version(db, label, "1"), what="version")
    _, secret = tokens([label])
    r = http(f"/versions/{label}", token=secret)
    assert r.status == 200, r
    assert r.json() == version_map(db, label)
    assert r.headers["etag"] == f'"{v1}"' and r.headers["cache-control"] == "no-cache"
    r304 = http(f"/versions/{label}", token=secret, headers=[f'If-None-Match: "{v1}"'])
    assert r304.status == 304 and r304.body == "", r304
    assert r304.headers["etag"] == f'"{v1}"'

    db.execute(f"UPDATE {table} SET v = 'b' WHERE id = 1")
    v2 = wait_until(lambda: (v := version(db, label)) > v1 and v, what="version moved")
    r = http(f"/versions/{label}", token=secret, headers=[f'If-None-Match: "{v1}"'])
    assert r.status == 200, r
    assert r.headers["etag"] == f'"{v2}"' and r.json()["data"]["all"]["v"] == v2
    assert r.json() == version_map(db, label)
    assert http(f"/versions/{label}", token=secret, headers=[f'If-None-Match: "{v2}"']).status == 304


def test_token_scoping_versions_only_other_labels_missing_and_wrong(db, tokens):
    """A versions-only token reads versions but not changes (/changes and /events 403, WebSocket error
    `forbidden`); no token reads a label outside its list (403 / `forbidden` naming the label); a missing or
    unknown token gets 401 with WWW-Authenticate; `?token=` works for HTTP and WebSocket."""
    t1, mine = new_table(db)
    t2, other = new_table(db)
    try:
        _, vonly = tokens([mine])
        _, rows = tokens([mine], rows=True)

        assert http(f"/versions/{mine}", token=vonly).status == 200
        r = http(f"/changes?labels={mine}&wait=0s", token=vonly)
        assert r.status == 403 and r.json()["code"] == "forbidden", r
        r = http(f"/events?labels={mine}", token=vonly, max_time=3)
        assert r.status == 403 and r.json()["code"] == "forbidden", r
        for tok in (vonly, rows):
            r = http(f"/versions/{other}", token=tok)
            assert r.status == 403 and r.json()["code"] == "forbidden", r
        r = http(f"/changes?labels={other}&wait=0s", token=rows)
        assert r.status == 403 and r.json()["code"] == "forbidden", r
        r = http(f"/changes?labels={mine},{other}&wait=0s", token=rows)
        assert r.status == 403 and r.json()["code"] == "forbidden", r
        assert http(f"/changes?labels={mine}&wait=0s", token=rows).status == 200

        failures = metrics()["changerelay_endpoint_auth_failures_total"]
        for r in (http(f"/versions/{mine}"), http(f"/versions/{mine}", token="crt_" + "x" * 43),
                  http(f"/changes?labels={mine}&wait=0s", token=vonly + "x"),
                  http(f"/versions/{mine}?token=nope")):
            assert r.status == 401, r
            assert r.headers["www-authenticate"] == 'Bearer realm="changerelay"'
        assert metrics()["changerelay_endpoint_auth_failures_total"] >= failures + 4
        # ?token= in the query
        assert http(f"/versions/{mine}?token={vonly}").status == 200
        r = http(f"/changes?labels={mine}&wait=0s&token={rows}")
        assert r.status == 200 and r.json()["changes"] == [], r

        async def run():
            for secret in (None, "crt_wrong"):
                with pytest.raises(InvalidStatus) as e:
                    async with ws_open(secret):
                        pass
                assert e.value.response.status_code == 401
            async with ws_open(vonly) as ws:
                await send(ws, {"op": "subscribe", "labels": [mine], "versions": False, "changes": True})
                e = await recv(ws)
                assert e["type"] == "error" and e["code"] == "forbidden", e
                await send(ws, {"op": "subscribe", "labels": [other], "versions": True})
                e = await recv(ws)
                assert (e["type"], e["code"], e["label"]) == ("error", "forbidden", other), e
                await subscribe(ws, labels=[mine], versions=True)
                assert await recv(ws) == version_map(db, mine)
            async with ws_open(query=f"?token={rows}") as ws:
                await subscribe(ws, labels=[mine], versions=False, changes=True)
                db.execute(f"INSERT INTO {t1} VALUES (1, 'x')")
                m = await next_change(ws, time.monotonic() + 5)
                assert m is not None and m["new"] == {"id": 1, "v": "x"}

        asyncio.run(run())
    finally:
        db.execute(f"DROP TABLE {t1}, {t2}")


def test_revoking_a_token_closes_its_connections_within_a_second(db, tracked, tokens):
    """revoke_token() ends the token's live connections within a second of its commit: a WebSocket closes
    with 4003 "token revoked", an SSE stream ends, a waiting long-poll answers 401."""
    table, label = tracked
    name, secret = tokens([label], rows=True)
    sse = Background(f"/events?labels={label}", token=secret, max_time=10, stream=True)
    poll = Background(f"/changes?labels={label}&wait=10s", token=secret, max_time=15)

    async def run():
        async with ws_open(secret) as ws:
            await subscribe(ws, labels=[label], versions=True, changes=True)
            assert (await recv(ws))["label"] == label  # the version map
            await asyncio.sleep(0.5)  # the SSE stream and the long-poll are in place
            db.execute("SELECT changerelay.revoke_token(%s)", (name,))
            revoked = time.monotonic()
            code, got = await closed_code(ws, timeout=5)
            closed = time.monotonic() - revoked
            return revoked, closed, code, ws.close_reason, got

    revoked, closed, code, reason, got = asyncio.run(run())
    print(f"WebSocket closed {closed * 1000:.0f} ms after the revoke committed")
    assert [m for m in got if m["type"] != "checkpoint"] == [] and code == 4003 and reason == "token revoked"
    assert closed < 1.0, f"closed {closed:.2f} s after the revoke"
    r = poll.result()
    assert r.status == 401, r
    assert poll.ended_at - revoked < 1.0
    s = sse.result()
    assert s.status == 200 and sse.ended_at - revoked < 1.0, (s, sse.ended_at - revoked)
    assert sse.proc.returncode == 0, "the server ended the stream (curl did not hit --max-time)"
    assert http(f"/versions/{label}", token=secret).status == 401


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scoped(admin):
    """A tracked label and a rows token for it that also lists a label nobody tracks."""
    table, label = new_table(admin)
    name = "tk_" + uuid.uuid4().hex[:12]
    secret = admin.execute("SELECT changerelay.create_token(%s, %s, true)",
                           (name, [label, "el_untracked"])).fetchone()[0]
    wait_until(lambda: http(f"/versions/{label}", token=secret).status == 200, what="token live")
    yield label, secret
    drop_token(admin, name)
    admin.execute(f"DROP TABLE {table}")


UPGRADE = ["Upgrade: websocket", "Connection: Upgrade"]
KEY = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.parametrize("method,path,headers,status,code", [
    ("GET", "/ws", [], 426, "upgrade_required"),
    ("GET", "/ws", UPGRADE + ["Sec-WebSocket-Version: 13"], 400, "bad_request"),            # no key
    ("GET", "/ws", UPGRADE + ["Sec-WebSocket-Key: short", "Sec-WebSocket-Version: 13"], 400, "bad_request"),
    ("GET", "/ws", UPGRADE + [KEY, "Sec-WebSocket-Version: 8"], 400, "bad_request"),
    ("GET", "/ws", ["Upgrade: websocket", "Connection: keep-alive", KEY, "Sec-WebSocket-Version: 13"], 400,
     "bad_request"),
    ("POST", "/health", [], 405, "method_not_allowed"),
    ("DELETE", "/versions/{label}", [], 405, "method_not_allowed"),
    ("GET", "/nope", [], 404, "not_found"),
    ("GET", "/versions/el_untracked", [], 404, "unknown_label"),
    ("GET", "/changes?labels=el_untracked&wait=0s", [], 404, "unknown_label"),
    ("GET", "/changes?labels={label}&since=cr1_garbage&wait=0s", [], 400, "bad_request"),
    ("GET", "/changes?labels={label}&since=nonsense&wait=0s", [], 400, "bad_request"),
    ("GET", "/events?labels={label}&since=cr1_garbage", [], 400, "bad_request"),
    ("GET", "/changes?labels={label}&wait=forever", [], 400, "bad_request"),
    ("GET", "/changes?labels={label}&max=0&wait=0s", [], 400, "bad_request"),
    ("GET", "/changes?labels={label}&filter=%7Bbad&wait=0s", [], 400, "bad_request"),
    ("GET", "/changes?labels=bad%20label!&wait=0s", [], 400, "bad_request"),
])
def test_bad_http_requests_get_clear_statuses(scoped, method, path, headers, status, code):
    """Each malformed or misdirected request gets its documented status and JSON error code, and the server
    keeps serving (/health 200 afterwards)."""
    label, secret = scoped
    r = http(path.format(label=label), headers=headers, token=secret, method=method)
    assert r.status == status, r
    assert r.json()["code"] == code, r
    if status == 405:
        assert r.headers["allow"] == "GET"
    if status == 426:
        assert r.headers["upgrade"].lower() == "websocket"
    assert http("/health").status == 200


def test_ws_bad_commands_get_errors_and_the_connection_stays_open(db, scoped):
    """Invalid JSON, non-objects, unknown ops, unknown labels and malformed cursors each get an `error` with
    its code; afterwards the same connection subscribes normally."""
    label, secret = scoped

    async def run():
        async with ws_open(secret) as ws:
            cases = [
                ("{not json", "bad_json", None),
                ("[1, 2]", "bad_json", None),
                ({"labels": [label]}, "bad_json", None),
                ({"op": "subscribe", "labels": label}, "bad_json", None),
                ({"op": "subscribe", "labels": [label], "versions": "yes"}, "bad_json", None),
                ({"op": "frobnicate", "labels": [label]}, "unknown_op", None),
                ({"op": "subscribe", "labels": ["el_untracked"]}, "unknown_label", "el_untracked"),
                ({"op": "subscribe", "labels": [label], "changes": True, "since": "cr1_garbage"}, "bad_cursor", None),
                ({"op": "subscribe", "labels": [label], "changes": True, "since": 42}, "bad_cursor", None),
                ({"op": "subscribe", "labels": [label], "changes": True, "filter": "x"}, "bad_filter", None),
            ]
            for msg, code, bad_label in cases:
                await send(ws, msg)
                e = await recv(ws)
                assert e["type"] == "error" and e["code"] == code, (msg, e)
                assert e.get("label") == bad_label, (msg, e)
                assert e["message"], e
            await subscribe(ws, labels=[label], versions=True)
            assert await recv(ws) == version_map(db, label)

    asyncio.run(run())
    assert http("/health").status == 200


def test_ws_oversized_message_closes_1009_and_binary_closes_1003(scoped):
    """A text message over 64 KiB gets `error too_large` then close 1009; a binary message gets close 1003;
    the server keeps serving."""
    label, secret = scoped

    async def run():
        async with ws_open(secret) as ws:
            await send(ws, json.dumps({"op": "subscribe", "labels": [label], "pad": "x" * (65 << 10)}))
            code, got = await closed_code(ws)
            assert code == 1009 and [m["code"] for m in got] == ["too_large"], (code, got)
        async with ws_open(secret) as ws:
            await ws.send(b'{"op":"subscribe"}')
            code, got = await closed_code(ws)
            assert code == 1003 and got == [], (code, got)
        async with ws_open(secret) as ws:  # just under the limit is fine (a plain error, no close)
            await send(ws, json.dumps({"op": "x", "pad": "x" * (60 << 10)}))
            assert (await recv(ws))["code"] == "unknown_op"

    asyncio.run(run())
    assert http("/health").status == 200


def test_request_head_dribbled_one_byte_a_second_gets_408():
    """A client sending its request head one byte a second gets 408 once the 5 s header timeout passes."""
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", EP), timeout=5) as s:
        t0 = time.monotonic()
        answer = b""
        for byte in request:
            try:
                s.send(bytes([byte]))
            except OSError:
                break
            if select.select([s], [], [], 1.0)[0]:
                answer = s.recv(4096)
                break
            if time.monotonic() - t0 > 12:
                break
        took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert 4.0 <= took < 7.0, f"408 after {took:.1f} s"
    assert http("/health").status == 200


# ---------------------------------------------------------------------------------------------------------------
# Health and metrics
# ---------------------------------------------------------------------------------------------------------------


def test_health_503_while_disabled_and_200_again(db, tracked, tokens):
    """/health is 200 with the worker's state while it streams (counting an open WebSocket and reporting the
    last applied event id), 503 "unavailable" once changerelay.enabled is off, 200 again once it is back on."""
    table, label = tracked
    _, secret = tokens([label])
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    ev = wait_until(lambda: version(db, label), what="version")

    async def with_client():
        async with ws_open(secret) as ws:
            await subscribe(ws, labels=[label], versions=True)
            await recv(ws)
            return http("/health")

    r = asyncio.run(with_client())
    assert r.status == 200 and r.headers["content-type"] == "application/json", r
    h = r.json()
    assert (h["status"], h["state"], h["consuming"]) == ("ok", "streaming", True)
    assert h["last_event_id"] >= ev and isinstance(h["lag_bytes"], int) and h["clients"] >= 2
    assert http("/health-check").status == 200
    try:
        db.execute("ALTER SYSTEM SET changerelay.enabled = off")
        db.execute("SELECT pg_reload_conf()")
        r = wait_until(lambda: (x := http("/health")).status == 503 and x, timeout=10, what="503")
        h = r.json()
        assert (h["status"], h["consuming"]) == ("unavailable", False), h
        assert http("/health-check").status == 503
        assert metrics()["changerelay_worker_consuming"] == 0
    finally:
        db.execute("ALTER SYSTEM RESET changerelay.enabled")
        db.execute("SELECT pg_reload_conf()")
    r = wait_until(lambda: (x := http("/health")).status == 200 and x, timeout=10, what="200 again")
    assert r.json()["status"] == "ok"
    assert metrics()["changerelay_worker_consuming"] == 1


def test_status_reports_the_endpoint(db):
    """changerelay.status() says the endpoint listens, and on which port."""
    ep = db.execute("SELECT changerelay.status()->'endpoint'").fetchone()[0]
    assert ep == {"port": EP, "state": "listening", "restarts": 0}, ep


def test_worker_sigterm_closes_websockets_with_1001_within_a_second(db, tracked, tokens):
    """pg_terminate_backend() on the relay worker: every open WebSocket gets close 1001 within a second; the
    postmaster restarts the worker and the endpoint serves again, and the client resumes from its cursor
    with nothing lost."""
    table, label = tracked
    _, secret = tokens([label], rows=True)
    since = current_cursor(db)

    async def until_closed():
        async with ws_open(secret) as ws:
            await subscribe(ws, labels=[label], versions=False, changes=True, since=since)
            pid = db.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_changerelay relay'"
                             ).fetchone()[0]
            t0 = time.monotonic()
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
            code, _ = await closed_code(ws, timeout=5)
            return code, time.monotonic() - t0

    code, took = asyncio.run(until_closed())
    assert code == 1001, code
    assert took < 1.0, f"closed after {took:.3f} s"
    db.execute(f"INSERT INTO {table} VALUES (1, 'after restart')")
    wait_until(streaming, timeout=30, what="the endpoint back after the worker restarted")

    async def resumed():
        async with ws_open(secret) as ws:
            await subscribe(ws, labels=[label], versions=False, changes=True, since=since)
            return await next_change(ws, time.monotonic() + 10)

    m = asyncio.run(resumed())
    assert m and m["new"] == {"id": 1, "v": "after restart"}, m


METRICS = {
    "changerelay_endpoint_clients": "gauge",
    "changerelay_endpoint_messages_sent_total": "counter",
    "changerelay_endpoint_bytes_sent_total": "counter",
    "changerelay_endpoint_slow_client_disconnects_total": "counter",
    "changerelay_endpoint_auth_failures_total": "counter",
    "changerelay_endpoint_rejected_connections_total": "counter",
    "changerelay_worker_lag_bytes": "gauge",
    "changerelay_worker_last_event_id": "gauge",
    "changerelay_worker_consuming": "gauge",
}


def test_metrics_has_documented_names_with_numeric_values(db, tracked):
    """/metrics is Prometheus text with every documented metric, its TYPE and a numeric value; counters move
    (responses sent, auth failures) and last_event_id follows the worker."""
    table, label = tracked
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    ev = wait_until(lambda: version(db, label), what="version")
    r = http("/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4"), r
    for name, kind in METRICS.items():
        assert f"# TYPE {name} {kind}\n" in r.body, name
        assert re.search(rf"^{name} -?[0-9.e+]+$", r.body, re.M), name
    before = metrics()
    assert http(f"/versions/{label}").status == 401
    after = metrics()
    assert after["changerelay_endpoint_auth_failures_total"] == before["changerelay_endpoint_auth_failures_total"] + 1
    assert after["changerelay_endpoint_messages_sent_total"] >= before["changerelay_endpoint_messages_sent_total"] + 2
    assert after["changerelay_endpoint_bytes_sent_total"] > before["changerelay_endpoint_bytes_sent_total"]
    assert after["changerelay_endpoint_clients"] >= 1
    assert after["changerelay_worker_last_event_id"] >= ev and after["changerelay_worker_consuming"] == 1


# ---------------------------------------------------------------------------------------------------------------
# An extra cluster: auth = trust, a 256 kB client_buffer, max_clients = 4
# ---------------------------------------------------------------------------------------------------------------

EXTRA_PORT = extra_port("endpoint")
EXTRA_EP = EXTRA_PORT + 1000


@pytest.fixture(scope="module")
def extra():
    cluster = ExtraCluster("test-cluster-endpoint", EXTRA_PORT,
                           "changerelay.auth = trust\nchangerelay.client_buffer = 256\nchangerelay.max_clients = 4")
    try:
        with cluster.connect() as c:
            c.execute("CREATE EXTENSION pg_changerelay")
            wait_until(lambda: streaming(EXTRA_EP), timeout=30, what="extra cluster's endpoint")
            yield c
    finally:
        cluster.stop()


def test_slow_client_is_cut_while_a_fast_one_gets_everything(extra):
    """With client_buffer = 256 kB, a WebSocket client that stops reading while ~6 MB of changes are written is
    cut (close 4001 or a dead connection when it reads again), while a client reading the same label gets every
    change in order; changerelay_endpoint_slow_client_disconnects_total counts the cut."""
    table, label = new_table(extra, "id int PRIMARY KEY, pad text")
    start = current_cursor(extra)
    # ~12 kB per transaction keeps every live batch (even a few transactions the worker reads at once) well
    # under the 256 kB bound, so the fast client is never cut; 6 MB in all is more than the slow client's
    # socket buffers can hide (the server's send buffer grows to 4 MB).
    n_txns, per_txn, pad = 500, 6, "p" * 2000
    cut_before = metrics(EXTRA_EP)["changerelay_endpoint_slow_client_disconnects_total"]
    done = threading.Event()

    def writer():
        try:
            with psycopg.connect(f"host=127.0.0.1 port={EXTRA_PORT} user=postgres dbname=postgres",
                                 autocommit=True) as c:
                for t in range(n_txns):
                    c.execute(f"INSERT INTO {table} SELECT g, %s FROM generate_series(%s::int, %s::int) g",
                              (pad, t * per_txn, (t + 1) * per_txn - 1))
                    time.sleep(0.003)
        finally:
            done.set()

    async def run():
        # The slow client: a tiny receive buffer and a 1-message library queue, so it stalls quickly.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", EXTRA_EP))
        sock.setblocking(False)
        slow = await ws_connect(f"ws://127.0.0.1:{EXTRA_EP}/ws", sock=sock, max_queue=1, open_timeout=5,
                                close_timeout=2, compression=None, proxy=None, ping_interval=None)
        try:
            async with ws_open(port=EXTRA_EP, ping_interval=None) as fast:
                for ws in (slow, fast):
                    await subscribe(ws, labels=[label], versions=False, changes=True)
                th = threading.Thread(target=writer)
                th.start()
                got = []
                deadline = time.monotonic() + 30
                while len(got) < n_txns * per_txn:
                    m = await next_change(fast, deadline)
                    assert m is not None, f"fast client stalled after {len(got)} changes"
                    got.append(m)
                th.join(30)
                assert done.is_set()
            # Let the slow client read now: what it gets ends with the cut.
            code, slow_got = await closed_code(slow, timeout=10)
            return got, code, slow_got
        finally:
            await slow.close()

    got, code, slow_got = asyncio.run(run())
    changes = [m for m in slow_got if m["type"] == "change"]
    print(f"slow client: {len(changes)} changes, then close code {code}")
    assert code in (4001, None, 1006), code
    assert len(changes) < n_txns * per_txn
    assert [m["new"]["id"] for m in changes] == list(range(len(changes))), "what it got was in order"
    assert [m["new"]["id"] for m in got] == list(range(n_txns * per_txn))
    assert [m["cursor"] for m in got] == [t["cursor"] for t in history(extra, start, label)]
    assert metrics(EXTRA_EP)["changerelay_endpoint_slow_client_disconnects_total"] >= cut_before + 1


def test_trust_mode_needs_no_token(extra):
    """With changerelay.auth = trust (loopback only), /versions, /changes (default: every known label) and the
    WebSocket serve without any token."""
    table, label = new_table(extra)
    extra.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    wait_until(lambda: version(extra, label), what="version")
    r = http(f"/versions/{label}", port=EXTRA_EP)
    assert r.status == 200 and r.json() == version_map(extra, label), r
    start = current_cursor(extra)
    extra.execute(f"INSERT INTO {table} VALUES (2, 'b')")
    r = http(f"/changes?since={start}&wait=5s", port=EXTRA_EP)
    assert r.status == 200 and [c["new"]["id"] for c in r.json()["changes"]] == [2], r

    async def run():
        async with ws_open(port=EXTRA_EP) as ws:
            await subscribe(ws, labels=[label], versions=False, changes=True, since=start)
            m = await next_change(ws, time.monotonic() + 5)
            assert m["new"] == {"id": 2, "v": "b"}

    asyncio.run(run())


def test_too_many_clients_get_503_with_retry_after(extra):
    """Beyond changerelay.max_clients (4 here) a connection gets 503 too_many_clients with Retry-After: 1,
    counted in changerelay_endpoint_rejected_connections_total; once clients leave, requests are served."""
    before = metrics(EXTRA_EP)["changerelay_endpoint_rejected_connections_total"]

    async def run():
        open_ = [await ws_open(port=EXTRA_EP).__aenter__() for _ in range(4)]
        try:
            with pytest.raises(InvalidStatus) as e:
                async with ws_open(port=EXTRA_EP):
                    pass
            resp = e.value.response
            assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
            assert json.loads(resp.body)["code"] == "too_many_clients"
            r = http("/health", port=EXTRA_EP)
            assert r.status == 503 and r.json()["code"] == "too_many_clients", r
        finally:
            for ws in open_:
                await ws.close()

    asyncio.run(run())
    wait_until(lambda: http("/health", port=EXTRA_EP).status == 200, timeout=5, what="served again")
    assert metrics(EXTRA_EP)["changerelay_endpoint_rejected_connections_total"] >= before + 2
