"""The endpoint under hostile clients and failures, on real clusters (README: Security): Origin and Host checks,
TLS with a self-signed certificate (curl and the websockets client), 1,000 idle connections, a change larger than
the client buffer, a request past changerelay.request_timeout, the endpoint thread's death and restart."""
import asyncio
import json
import os
import resource
import socket
import ssl
import subprocess
import time
import uuid

import pytest
from websockets.asyncio.client import connect as ws_connect

from conftest import extra_port
from test_endpoint import EP, http, new_table, recv, subscribe, ws_open
from test_relay import ROOT, ExtraCluster, wait_until


def token(db, labels, rows=True):
    name = "th_" + uuid.uuid4().hex[:10]
    secret = db.execute("SELECT changerelay.create_token(%s, %s, %s)", (name, labels, rows)).fetchone()[0]
    wait_until(lambda: http(f"/versions/{labels[0]}", token=secret).status != 401, timeout=5, what="token live")
    return secret


def test_origin_and_host_are_checked(db):
    table, label = new_table(db)
    secret = token(db, [label])
    ok = http(f"/versions/{label}", token=secret, headers=["Origin: http://127.0.0.1:%d" % EP])
    assert ok.status == 200, ok
    evil = http(f"/changes?labels={label}&wait=0s", token=secret, headers=["Origin: https://evil.example"])
    assert evil.status == 403 and evil.json()["code"] == "forbidden_origin", evil
    rebound = http(f"/versions/{label}", token=secret, headers=["Host: evil.example"])
    assert rebound.status == 403 and rebound.json()["code"] == "forbidden_host", rebound

    async def hijack():
        try:
            async with ws_connect(f"ws://127.0.0.1:{EP}/ws", origin="https://evil.example", open_timeout=5,
                                  additional_headers={"Authorization": f"Bearer {secret}"}, proxy=None):
                return "opened"
        except Exception as e:  # the handshake is refused with 403
            return str(e)

    assert "403" in asyncio.run(hijack())


def test_1000_idle_connections_do_not_lock_out_an_authenticated_client(db):
    table, label = new_table(db)
    secret = token(db, [label])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, 4096), hard), hard))
    idle = []
    try:
        for i in range(1000):
            s = socket.socket()
            s.settimeout(5)
            # From 20 other loopback addresses (50 each, under the per-address limit): the attacker is not the
            # authenticated client's own address.
            s.bind((f"127.0.0.{2 + i % 20}", 0))
            try:
                s.connect(("127.0.0.1", EP))
            except OSError:
                s.close()
                continue
            idle.append(s)
        t0 = time.monotonic()
        r = http(f"/versions/{label}", token=secret)
        served = time.monotonic() - t0
        assert r.status == 200, r
        print(f"with {len(idle)} idle connections open, an authenticated request took {served * 1000:.1f} ms")
        assert served < 2.0

        async def live():
            async with ws_open(secret) as ws:
                await subscribe(ws, labels=[label], changes=True)
                db.execute(f"INSERT INTO {table} VALUES (1, 'x')")
                while True:
                    m = await recv(ws, 5)
                    if m.get("type") == "change":
                        return m

        assert asyncio.run(live())["new"] == {"id": 1, "v": "x"}
    finally:
        for s in idle:
            s.close()


def test_a_change_larger_than_the_client_buffer_is_delivered(db):
    table, label = new_table(db, "id int PRIMARY KEY, v text")
    secret = token(db, [label])
    buffer = int(db.execute("SELECT setting FROM pg_settings WHERE name = 'changerelay.client_buffer'").fetchone()[0])
    size = buffer * 1024 + 1_000_000  # kB setting; one value well past it, under max_value_size

    async def run():
        async with ws_open(secret, max_size=None) as ws:
            await subscribe(ws, labels=[label], changes=True)
            db.execute(f"INSERT INTO {table} VALUES (1, repeat('z', {size}))")
            while True:
                m = await recv(ws, 20)
                if m.get("type") == "change":
                    return m

    assert len(asyncio.run(run())["new"]["v"]) == size


def test_a_request_past_request_timeout_is_cancelled_and_decoding_goes_on(db):
    table, label = new_table(db, "id int PRIMARY KEY, v text")
    secret = token(db, [label])
    start = db.execute("SELECT changerelay.current_cursor()").fetchone()[0]
    db.execute(f"INSERT INTO {table} SELECT g, 'x' FROM generate_series(1, 200000) g")
    wait_until(lambda: db.execute("SELECT changerelay.version(%s, '200000')", (label,)).fetchone()[0], timeout=120,
               what="200,000 rows applied")
    db.execute("ALTER SYSTEM SET changerelay.request_timeout = '20ms'")
    db.execute("SELECT pg_reload_conf()")
    try:
        # A filter nothing matches scans every row; the worker gives up after 20 ms.
        never = "%7B%22v%22%3A%22never%22%7D"

        def cancelled():
            r = http(f"/changes?labels={label}&since={start}&filter={never}&max=1000&wait=0s", token=secret)
            return r.status >= 500 and "request_timeout" in r.body and r

        wait_until(cancelled, timeout=20, what="a cancelled request")
        other, other_label = new_table(db)
        db.execute(f"INSERT INTO {other} VALUES (1, 'y')")
        wait_until(lambda: db.execute("SELECT changerelay.version(%s, '1')", (other_label,)).fetchone()[0],
                   timeout=5, what="decoding went on")
        assert db.execute("SELECT changerelay.status()->'worker'->>'state'").fetchone()[0] == "streaming"
    finally:
        db.execute("ALTER SYSTEM RESET changerelay.request_timeout")
        db.execute("SELECT pg_reload_conf()")


def self_signed(directory):
    cert, key = os.path.join(directory, "server.crt"), os.path.join(directory, "server.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True, timeout=60)
    subprocess.run(["chown", "postgres:postgres", cert, key], check=True)  # the server reads them as postgres
    return cert, key


def test_tls_and_the_endpoint_thread_restarting():
    """One cluster with TLS and the debug panic hook: https and wss with curl and websockets, plain http refused;
    then the endpoint thread is made to panic and comes back on the same port while the worker goes on."""
    tls_dir = os.path.join(ROOT, "target", "test-tls")
    os.makedirs(tls_dir, exist_ok=True)
    cert, key = self_signed(tls_dir)
    port = extra_port("tls")
    cluster = ExtraCluster("test-cluster-tls", port, "\n".join([
        f"changerelay.ssl_cert_file = '{cert}'", f"changerelay.ssl_key_file = '{key}'",
        "changerelay.debug_endpoint_panic = on"]))
    ep = port + 1000
    try:
        with cluster.connect() as c:
            c.execute("CREATE EXTENSION pg_changerelay")
            c.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            c.execute("SELECT changerelay.track('t', 't')")
            secret = c.execute("SELECT changerelay.create_token('tls', ARRAY['t'], true)").fetchone()[0]

            def curl(path, scheme="https", extra=()):
                out = subprocess.run(["curl", "-s", "--noproxy", "*", "--max-time", "5", "--cacert", cert, *extra,
                                      "-H", f"Authorization: Bearer {secret}", "-w", "\n%{http_code}",
                                      f"{scheme}://127.0.0.1:{ep}{path}"], capture_output=True, text=True, timeout=10)
                body, _, code = out.stdout.rpartition("\n")
                return int(code or 0), body

            wait_until(lambda: curl("/versions/t")[0] == 200, timeout=30, what="https with the CA file")
            assert curl("/versions/t", scheme="http")[0] != 200, "plain http is not served"
            c.execute("INSERT INTO t VALUES (1, 'secure')")
            wait_until(lambda: c.execute("SELECT changerelay.version('t', '1')").fetchone()[0], what="relayed")

            async def wss():
                ctx = ssl.create_default_context(cafile=cert)
                async with ws_connect(f"wss://127.0.0.1:{ep}/ws", ssl=ctx, open_timeout=5, proxy=None,
                                      additional_headers={"Authorization": f"Bearer {secret}"}) as ws:
                    await ws.send(json.dumps({"op": "subscribe", "labels": ["t"], "changes": True, "since": None}))
                    first = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    assert first["type"] == "subscribed", first
                    c.execute("INSERT INTO t VALUES (2, 'over wss')")
                    while True:
                        m = json.loads(await asyncio.wait_for(ws.recv(), 5))
                        if m.get("type") == "change":
                            return m

            assert asyncio.run(wss())["new"] == {"id": 2, "v": "over wss"}
            # The endpoint thread dies; the worker notices, keeps decoding, and starts a new one.
            pid = c.execute("SELECT (changerelay.status()->'worker'->>'pid')::int").fetchone()[0]
            curl("/debug/panic")
            wait_until(lambda: c.execute("SELECT (changerelay.status()->'endpoint'->>'restarts')::int").fetchone()[0] >= 1,
                       timeout=10, what="the worker noticing")
            c.execute("INSERT INTO t VALUES (3, 'while restarting')")
            wait_until(lambda: c.execute("SELECT changerelay.version('t', '3')").fetchone()[0], what="decoding went on")
            wait_until(lambda: curl("/versions/t")[0] == 200, timeout=15, what="the endpoint back on its port")
            assert c.execute("SELECT (changerelay.status()->'worker'->>'pid')::int").fetchone()[0] == pid
            assert "the endpoint thread has ended" in cluster.log()
    finally:
        cluster.stop()
