"""Sinks into real Redis Streams and NATS JetStream (Debian's redis-server and nats-server on loopback ports of
their own, persistence on): exactly once and in order through worker kills and broker restarts; bad input gives
clear errors or a visible state, and nothing is lost."""
import time
import uuid

import psycopg
import pytest

from brokers import Nats, Redis, broker_port
from conftest import connect
from test_relay import wait_until

N = 10_000
PER_TXN = 10


@pytest.fixture(scope="module")
def redis_broker():
    b = Redis(broker_port("redis"))
    yield b
    b.stop()


@pytest.fixture(scope="module")
def nats_broker():
    b = Nats(broker_port("nats"))
    yield b
    b.stop()


def numbered_table(db):
    table, label = "s_" + uuid.uuid4().hex[:10], "sl_" + uuid.uuid4().hex[:8]
    db.execute(f"CREATE TABLE {table} (n int PRIMARY KEY, pad text)")
    db.execute("SELECT changerelay.track(%s, %s)", (table, label))
    return table, label


def sink(db, name):
    rows = db.execute("SELECT * FROM changerelay.sinks() WHERE name = %s", (name,)).fetchall()
    if not rows:
        return None
    cols = [c.name for c in db.execute("SELECT * FROM changerelay.sinks() LIMIT 0").description]
    return dict(zip(cols, rows[0]))


def kill_worker(db):
    pid = db.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_changerelay relay'").fetchone()
    assert pid, "the relay worker runs"
    db.execute("SELECT pg_terminate_backend(%s)", (pid[0],))
    wait_until(lambda: db.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_changerelay relay'")
               .fetchone() not in (None, pid), timeout=30, what="the worker back")


def write_with_faults(db, table, broker):
    """N numbered rows, PER_TXN per transaction; the worker killed twice and the broker restarted once meanwhile."""
    faults = {N // PER_TXN // 5: "kill", N // PER_TXN // 2: "restart", 3 * N // PER_TXN // 4: "kill"}
    with connect() as w:
        for t in range(N // PER_TXN):
            first = t * PER_TXN + 1
            w.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(%s::int, %s::int) g", (first, first + PER_TXN - 1))
            fault = faults.get(t)
            if fault == "kill":
                kill_worker(db)
            elif fault == "restart":
                broker.restart()


def check_exactly_once(ids, numbers):
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "ids strictly increasing"
    dup = len(numbers) - len(set(numbers))
    assert dup == 0, f"{dup} changes delivered twice"
    assert sorted(numbers) == list(range(1, N + 1)), f"missing {sorted(set(range(1, N + 1)) - set(numbers))[:10]}"


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_10000_changes_exactly_once_through_worker_kills_and_a_broker_restart(db, kind, request):
    broker = request.getfixturevalue(f"{kind}_broker")
    table, label = numbered_table(db)
    name = f"t_{kind}_" + uuid.uuid4().hex[:6]
    db.execute("SELECT changerelay.create_sink(%s, %s, %s, ARRAY[%s])", (name, kind, broker.url, label))
    t0 = time.monotonic()
    try:
        write_with_faults(db, table, broker)
        if kind == "redis":
            read = lambda: broker.entries(f"changerelay:{label}")  # noqa: E731
        else:
            read = lambda: broker.messages(subject=f"changerelay.{label}")  # noqa: E731
        got = wait_until(lambda: len(r := read()) >= N and r, timeout=180, what=f"{N} changes in {kind}")
        elapsed = time.monotonic() - t0
        if kind == "redis":
            ids = [i for i, _ in got]
            numbers = [c["new"]["n"] for _, c in got]
            assert all(c["event_id"] == i[0] and c["seq"] == i[1] and c["cursor"].startswith("cr1_") for i, c in got)
        else:
            sysid = db.execute("SELECT system_identifier FROM pg_control_system()").fetchone()[0]
            ids = [tuple(int(x) for x in mid.split(":")[1:]) for _, mid, _ in got]
            assert all(mid.startswith(f"{sysid}:") for _, mid, _ in got)
            numbers = [c["new"]["n"] for _, _, c in got]
        check_exactly_once(ids, numbers)
        assert all(c["label"] == label and c["op"] == "insert" for c in (g[-1] for g in got))
        time.sleep(0.5)
        assert len(read()) == N, "nothing more arrives later"
        s = wait_until(lambda: (s := sink(db, name)) and s["lag_bytes"] == 0 and s["state"] == "streaming" and s,
                       timeout=30, what="the sink caught up in sinks()")
        # Counters are recorded every second: a worker killed meanwhile loses its last second of counts.
        assert s["changes_written"] > 0 and s["last_error"] is None
        print(f"{kind}: {N} changes through 2 worker kills and a broker restart in {elapsed:.1f} s; "
              f"duplicates rejected by the broker: {s['duplicates']}")
    finally:
        db.execute("SELECT changerelay.drop_sink(%s)", (name,))


def test_a_sink_starts_and_stops_without_a_restart_and_shows_in_status(db, redis_broker):
    table, label = numbered_table(db)
    name = "t_live_" + uuid.uuid4().hex[:6]
    db.execute("SELECT changerelay.create_sink(%s, 'redis', %s, ARRAY[%s], '{\"key_prefix\": \"cr-test:\"}')",
               (name, redis_broker.url, label))
    db.execute(f"INSERT INTO {table} VALUES (1, 'a')")
    got = wait_until(lambda: redis_broker.entries(f"cr-test:{label}"), what="the change in redis")
    assert [c["new"] for _, c in got] == [{"n": 1, "pad": "a"}]
    st = db.execute("SELECT changerelay.status()->'sinks'").fetchone()[0]
    assert st["count"] >= 1 and name not in st["lagging"]
    db.execute("SELECT changerelay.drop_sink(%s)", (name,))
    db.execute(f"INSERT INTO {table} VALUES (2, 'b')")
    wait_until(lambda: db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
               and len(db.execute("SELECT * FROM changerelay.changes(NULL, %s)", ([label],)).fetchall()) == 2,
               what="the second change applied")
    time.sleep(0.5)
    assert len(redis_broker.entries(f"cr-test:{label}")) == 1, "a dropped sink delivers nothing more"


def test_bad_input_gets_clear_errors(db):
    table, label = numbered_table(db)
    cases = [
        (("kafka", "kafka://127.0.0.1:1", [label]), psycopg.errors.InvalidParameterValue, "unknown sink kind"),
        (("redis", "http://127.0.0.1:1", [label]), psycopg.errors.InvalidParameterValue, "invalid redis URL"),
        (("redis", "redis://127.0.0.1:notaport", [label]), psycopg.errors.InvalidParameterValue, "invalid redis URL"),
        (("nats", "nats://", [label]), psycopg.errors.InvalidParameterValue, "invalid nats URL"),
        (("redis", "redis://127.0.0.1:1", ["no_such_label"]), psycopg.errors.UndefinedObject, "is not tracked"),
        (("redis", "redis://127.0.0.1:1", []), psycopg.errors.InvalidParameterValue, "at least one label"),
    ]
    for (kind, url, labels), error, text in cases:
        with pytest.raises(error) as e:
            db.execute("SELECT changerelay.create_sink('t_bad', %s, %s, %s)", (kind, url, labels))
        assert text in str(e.value) and e.value.diag.message_hint, (kind, url, str(e.value))
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown option"):
        db.execute("SELECT changerelay.create_sink('t_bad', 'redis', 'redis://127.0.0.1:1', %s, '{\"stream\":1}')",
                   ([label],))
    with pytest.raises(psycopg.errors.UndefinedObject, match="does not exist"):
        db.execute("SELECT changerelay.drop_sink('no_such_sink')")
    db.execute("SELECT changerelay.create_sink('t_twice', 'redis', 'redis://u:secret@127.0.0.1:1', %s)", ([label],))
    try:
        with pytest.raises(psycopg.errors.DuplicateObject):
            db.execute("SELECT changerelay.create_sink('t_twice', 'redis', 'redis://127.0.0.1:1', %s)", ([label],))
        assert sink(db, "t_twice")["url"] == "redis://u:***@127.0.0.1:1", "the password is not shown"
    finally:
        db.execute("SELECT changerelay.drop_sink('t_twice')")
    db.execute("DROP ROLE IF EXISTS s_nobody; CREATE ROLE s_nobody LOGIN")
    try:
        with connect(user="s_nobody") as r:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                r.execute("SELECT changerelay.create_sink('t_x', 'redis', 'redis://127.0.0.1:1', %s)", ([label],))
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                r.execute("SELECT * FROM changerelay.sinks")
    finally:
        db.execute("DROP ROLE s_nobody")


@pytest.mark.parametrize("kind", ["redis", "nats"])
def test_an_unreachable_broker_shows_and_then_gets_everything(db, kind):
    port = broker_port("unused")
    table, label = numbered_table(db)
    name = f"t_away_{kind}_" + uuid.uuid4().hex[:6]
    db.execute("SELECT changerelay.create_sink(%s, %s, %s, ARRAY[%s])",
               (name, kind, f"{kind}://127.0.0.1:{port}", label))
    broker = None
    try:
        db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 50) g")
        s = wait_until(lambda: (s := sink(db, name)) and s["state"] == "retrying" and s["last_error"] and s,
                       timeout=30, what="the sink retrying")
        assert str(port) in s["last_error"] and "retrying in" in s["last_error"], s["last_error"]
        assert s["lag_bytes"] > 0, "it lags"
        db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(51, 100) g")
        broker = (Redis if kind == "redis" else Nats)(port)
        read = (lambda: broker.entries(f"changerelay:{label}")) if kind == "redis" else \
            (lambda: broker.messages(subject=f"changerelay.{label}"))
        got = wait_until(lambda: len(r := read()) >= 100 and r, timeout=60, what="everything delivered")
        assert sorted(g[-1]["new"]["n"] for g in got) == list(range(1, 101))
        wait_until(lambda: sink(db, name)["state"] == "streaming", what="streaming again")
    finally:
        db.execute("SELECT changerelay.drop_sink(%s)", (name,))
        if broker:
            broker.stop()


def test_a_redis_that_refuses_writes_only_delays(db, redis_broker):
    table, label = numbered_table(db)
    name = "t_oom_" + uuid.uuid4().hex[:6]
    c = redis_broker.client()
    db.execute("SELECT changerelay.create_sink(%s, 'redis', %s, ARRAY[%s])", (name, redis_broker.url, label))
    try:
        db.execute(f"INSERT INTO {table} VALUES (1, 'x')")
        wait_until(lambda: redis_broker.entries(f"changerelay:{label}"), what="the first change")
        c.config_set("maxmemory-policy", "noeviction")
        c.config_set("maxmemory", "1")
        db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(2, 200) g")
        s = wait_until(lambda: (s := sink(db, name)) and s["last_error"] and "OOM" in s["last_error"] and s,
                       timeout=30, what="the refusal shown")
        assert s["state"] in ("retrying", "connecting"), s
        c.config_set("maxmemory", "0")
        got = wait_until(lambda: len(r := redis_broker.entries(f"changerelay:{label}")) >= 200 and r, timeout=60,
                         what="everything delivered")
        assert [x["new"]["n"] for _, x in got] == list(range(1, 201))
    finally:
        c.config_set("maxmemory", "0")
        db.execute("SELECT changerelay.drop_sink(%s)", (name,))


def test_a_jetstream_that_refuses_writes_only_delays(db, nats_broker):
    import nats.js.api as api
    table, label = numbered_table(db)
    name = "t_full_" + uuid.uuid4().hex[:6]
    stream, prefix = "FULL" + uuid.uuid4().hex[:6].upper(), "full" + uuid.uuid4().hex[:6]
    config = api.StreamConfig(name=stream, subjects=[f"{prefix}.>"], storage=api.StorageType.FILE, max_msgs=5,
                              discard=api.DiscardPolicy.NEW)
    nats_broker.run(lambda nc, js: js.add_stream(config))
    db.execute("SELECT changerelay.create_sink(%s, 'nats', %s, ARRAY[%s], %s)",
               (name, nats_broker.url, label, psycopg.types.json.Jsonb({"stream": stream, "subject_prefix": prefix})))
    try:
        db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 50) g")
        s = wait_until(lambda: (s := sink(db, name)) and s["last_error"] and "maximum messages" in s["last_error"]
                       and s, timeout=30, what="the refusal shown")
        assert s["state"] in ("retrying", "connecting"), s  # between attempts, or trying again
        config.max_msgs = -1
        nats_broker.run(lambda nc, js: js.update_stream(config))
        got = wait_until(lambda: len(r := nats_broker.messages(stream)) >= 50 and r, timeout=60,
                         what="everything delivered")
        assert [m[-1]["new"]["n"] for m in got] == list(range(1, 51))
        # Retries after the refusal write one change at a time, so the raised limit leaves no gap to report.
        s = wait_until(lambda: (s := sink(db, name)) and s["state"] == "streaming" and s, what="streaming again")
        assert s["last_error"] is None, s
    finally:
        db.execute("SELECT changerelay.drop_sink(%s)", (name,))


def test_a_truncate_of_two_tables_of_a_label_is_one_change(db, redis_broker):
    label = "sl_" + uuid.uuid4().hex[:8]
    a, b = "s_a_" + uuid.uuid4().hex[:8], "s_b_" + uuid.uuid4().hex[:8]
    db.execute(f"CREATE TABLE {a} (n int PRIMARY KEY); CREATE TABLE {b} (n int PRIMARY KEY)")
    db.execute("SELECT changerelay.track(%s, %s), changerelay.track(%s, %s)", (a, label, b, label))
    name = "t_trunc_" + uuid.uuid4().hex[:6]
    db.execute("SELECT changerelay.create_sink(%s, 'redis', %s, ARRAY[%s])", (name, redis_broker.url, label))
    try:
        db.execute(f"INSERT INTO {a} VALUES (1); TRUNCATE {a}, {b}; INSERT INTO {b} VALUES (2)")
        got = wait_until(lambda: len(r := redis_broker.entries(f"changerelay:{label}")) >= 3 and r,
                         what="three changes")
        time.sleep(0.3)
        got = redis_broker.entries(f"changerelay:{label}")
        assert [c["op"] for _, c in got] == ["insert", "truncate", "insert"]
        assert got[1][1]["tables"] == [f"public.{a}", f"public.{b}"]
    finally:
        db.execute("SELECT changerelay.drop_sink(%s)", (name,))
