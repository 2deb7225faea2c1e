"""The cluster `make test-clients` started (PGCR_CLIENTS_PORT, its endpoint at +1000), and helpers: tracked
tables, tokens, the relay worker's restart, waiting for conditions."""
import base64
import os
import sys
import time
import uuid
import urllib.request
import urllib.error

import psycopg
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the changerelay package

PORT = int(os.environ.get("PGCR_CLIENTS_PORT", "5488"))
EP = PORT + 1000
ENDPOINT = f"http://127.0.0.1:{EP}"
DSN = f"host=127.0.0.1 port={PORT} user=postgres dbname=postgres"


def connect():
    return psycopg.connect(DSN, autocommit=True)


def wait_until(fn, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except (psycopg.OperationalError, OSError) as e:
            last = e
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}; last value {last!r}")


def http_status(path, token=None):
    req = urllib.request.Request(ENDPOINT + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="session")
def db():
    with connect() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_changerelay")
        wait_until(lambda: http_status("/health") == 200, timeout=30, what=f"the endpoint on {EP}")
        yield conn


@pytest.fixture
def tracked(db):
    """A fresh table (id text PRIMARY KEY, v text) tracked under a fresh label: (table, label)."""
    suffix = uuid.uuid4().hex[:10]
    table, label = f"py_{suffix}", f"pl_{suffix}"
    db.execute(f"CREATE TABLE {table} (id text PRIMARY KEY, v text)")
    db.execute("SELECT changerelay.track(%s, %s)", (table, label))
    yield table, label
    with connect() as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")


@pytest.fixture
def token(db):
    """token(labels, rows=False) -> secret, once the endpoint accepts it."""
    made = []

    def make(labels, rows=False):
        name = "pt_" + uuid.uuid4().hex[:12]
        secret = db.execute("SELECT changerelay.create_token(%s, %s, %s)", (name, labels, rows)).fetchone()[0]
        made.append(name)
        wait_until(lambda: http_status("/status", secret) == 200, what="the new token to reach the endpoint")
        return secret

    yield make
    with connect() as c:
        for name in made:
            c.execute("SELECT changerelay.revoke_token(name) FROM changerelay.tokens() WHERE name = %s", (name,))


def worker_pid(db):
    row = db.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_changerelay relay'").fetchone()
    return row and row[0]


def restart_worker(db, while_down=None):
    """pg_terminate_backend() of the relay worker; returns once a new one serves the endpoint again."""
    pid = wait_until(lambda: worker_pid(db), what="the relay worker")
    db.execute("SELECT pg_terminate_backend(%s)", (pid,))
    if while_down:
        while_down()
    wait_until(lambda: (p := worker_pid(db)) and p != pid, timeout=30, what="a new relay worker")
    wait_until(lambda: http_status("/health") == 200, timeout=30, what="the endpoint back")


def version(db, label, identifier=None):
    return db.execute("SELECT changerelay.version(%s, %s)", (label, identifier)).fetchone()[0]


def current_cursor(db):
    return db.execute("SELECT changerelay.current_cursor()").fetchone()[0]


def history(db, since, label):
    """(cursor, id) of changerelay.changes() for one label after `since`, in commit order."""
    return db.execute("SELECT cursor, new->>'id' FROM changerelay.changes(%s, %s, 10000)",
                      (since, [label])).fetchall()


def applied(db, since, label, n):
    """Waits for n changes of `label` after `since` in the history; the event id (the version) of the last."""
    rows = wait_until(lambda: (r := db.execute("SELECT event_id FROM changerelay.changes(%s, %s, 10000)",
                                               (since, [label])).fetchall()) and len(r) >= n and r,
                      what=f"{n} changes of {label}")
    return rows[-1][0]


def insert(db, table, first, last):
    """Rows first..last, one transaction each."""
    for i in range(first, last + 1):
        db.execute(f"INSERT INTO {table} VALUES (%s, 'x')", (str(i),))


def forge(cursor, system_id):
    """The cursor with another cluster's system id (and a valid checksum)."""
    raw = bytearray(base64.urlsafe_b64decode(cursor[4:] + "=" * (-len(cursor[4:]) % 4)))
    raw[1:9] = system_id.to_bytes(8, "big")
    a = b = 0
    for x in raw[:-2]:
        a = (a + x) % 255
        b = (b + a) % 255
    raw[-2:] = ((b << 8) | a).to_bytes(2, "big")
    return "cr1_" + base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
