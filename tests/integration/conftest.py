"""Shared fixtures: a real cluster started by `make test-integration`."""
import json
import os
import shlex
import subprocess
import uuid

import psycopg
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The major under test (make test-integration PG=...) and its cluster.
PG = os.environ.get("PG", "15")
PORT = int(os.environ.get("PGCR_PORT", "5498"))
DATA = os.environ.get("PGCR_DATA", "")
DSN = f"host=127.0.0.1 port={PORT} user=postgres dbname=postgres"
# Where this major's build and extra clusters live (a per-major cargo target directory).
WORK = os.environ.get("PGCR_WORK") or os.path.join(ROOT, "target", f"pg{PG}")
# Runs the client programs (pg_recvlogical, pg_config, ...) of the major under test: `[PGTOOL, "pg_recvlogical", ...]`.
PGTOOL = os.path.join(ROOT, "scripts", "pgtool.sh")
# The major's pg_config, as a path on its side (inside the root for 17 and 18), and where that side's files are
# seen from here: "" for 15, the root's directory for 17 and 18.
PG_CONFIG = f"/usr/lib/postgresql/{PG}/bin/pg_config"
SERVER_FS = "" if PG == "15" else subprocess.run([os.path.join(ROOT, "scripts", "root.sh"), "path", PG],
                                                 capture_output=True, text=True, check=True).stdout.strip()
# Builds and installs this tree for the major under test, as `make test-integration` does (set by the Makefile).
INSTALL = shlex.split(os.environ.get("PGCR_INSTALL", "")) or \
    ([] if PG == "15" else [os.path.join(ROOT, "scripts", "root.sh"), "run", PG]) + \
    ["env", f"CARGO_TARGET_DIR={WORK}", os.path.join(ROOT, "scripts", "install.sh"), "--debug", PG_CONFIG,
     "--no-default-features", "--features", f"pg{PG}"]

# The extra clusters some tests start listen at fixed offsets from PORT (and their endpoints, as every
# cluster's, at their port + 1000), so that one base (PGCR_PORT) moves them all.
PORT_OFFSETS = {"small": -2, "nopreload": -3, "faults": -4, "owner": -5, "sqlascii": -6, "upgrade": -7,
                "foreign": -8, "endpoint": -9, "tls": -12, "ha_primary": -13, "ha_standby": -14, "ha_slot": -15,
                "fold": -16, "latin1": -17, "syncgone": -18}


def extra_port(name):
    return PORT + PORT_OFFSETS[name]


def connect(**kw):
    return psycopg.connect(DSN, autocommit=True, **kw)


@pytest.fixture(scope="session")
def admin():
    with connect() as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_changerelay")
        yield conn


@pytest.fixture
def db(admin):
    with connect() as conn:
        yield conn


class Slot:
    """A logical slot using the pg_changerelay plugin, dropped after the test."""

    def __init__(self, conn, plugin="pg_changerelay", name=None):
        self.conn = conn
        self.name = name or "t_" + uuid.uuid4().hex[:12]
        conn.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (self.name, plugin))

    @staticmethod
    def _args(opts):
        flat = []
        for k, v in opts.items():
            flat += [k, str(v).lower() if isinstance(v, bool) else str(v)]
        return flat

    def peek_raw(self, upto=None, **opts):
        """The slot's output as text; `upto` (an LSN) bounds it, so that two reads see the same transactions."""
        return [r[0] for r in self.conn.execute(
            "SELECT data FROM pg_logical_slot_peek_changes(%s, %s::pg_lsn, NULL, VARIADIC %s::text[])",
            (self.name, upto, self._args(opts))).fetchall()]

    def peek(self, **opts):
        return without_relay_bookkeeping([json.loads(d) for d in self.peek_raw(**opts)])

    def get(self, **opts):
        rows = [r[0] for r in self.conn.execute(
            "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, VARIADIC %s::text[])",
            (self.name, self._args(opts))).fetchall()]
        return without_relay_bookkeeping([json.loads(d) for d in rows])

    def peek_binary(self, upto=None, **opts):
        opts = {"format": "binary", **opts}
        return [bytes(r[0]) for r in self.conn.execute(
            "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, %s::pg_lsn, NULL, VARIADIC %s::text[])",
            (self.name, upto, self._args(opts))).fetchall()]

    def drop(self):
        self.conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
            (self.name,))


def without_relay_bookkeeping(events):
    """Events minus the relay worker's own transactions (those whose changes are all to changerelay's tables: a
    version checkpoint for a table an earlier test tracked can commit inside any test's window)."""
    relay, other = set(), set()
    for e in events:
        xid = e.get("xid")
        if e["type"] in ("insert", "update", "delete"):
            (relay if e.get("schema") == "changerelay" else other).add(xid)
        elif e["type"] == "truncate":
            (relay if all(t.startswith("changerelay.") for t in e["tables"]) else other).add(xid)
        elif e["type"] not in ("begin", "commit"):
            other.add(xid)
    drop = relay - other
    return [e for e in events if e.get("xid") is None or e.get("xid") not in drop]


@pytest.fixture
def slot(db):
    s = Slot(db)
    yield s
    s.drop()


def rows(events, *types):
    types = types or ("insert", "update", "delete", "truncate")
    return [e for e in events if e["type"] in types]
