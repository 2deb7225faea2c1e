"""Real brokers for the sink tests: Debian's redis-server and nats-server, each started on a loopback port of its
own (PGCR_PORT + an offset, see BROKER_OFFSETS) with persistence on: Redis with an append-only file, NATS with
the JetStream file store. Started, restarted and stopped by the tests; every wait is for a condition."""
import asyncio
import os
import shutil
import socket
import subprocess
import time

import nats
import redis

# Offsets from the cluster's port (PGCR_PORT): 15 -> 5748.., 17 -> 5950.., 18 -> 6050..; clear of every major's
# clusters and endpoints. The bench's brokers are at its own cluster's port + the same offsets.
BROKER_OFFSETS = {"redis": 250, "nats": 251, "unused": 254}


def broker_port(name, base=None):
    if base is None:
        from conftest import PORT
        base = PORT
    return base + BROKER_OFFSETS[name]


def _wait(fn, timeout, what):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            if fn():
                return
        except Exception as e:  # noqa: BLE001 - still starting
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last error {last!r}")


def _port_free(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


class Broker:
    """One broker process; `restart()` keeps its data directory."""

    def __init__(self, name, port, work=None):
        if work is None:
            from conftest import WORK
            work = WORK
        self.name, self.port = name, port
        self.dir = os.path.join(work, f"broker-{name}-{port}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.proc = None
        self.start()

    def command(self):
        raise NotImplementedError

    def ready(self):
        raise NotImplementedError

    def start(self):
        _wait(lambda: _port_free(self.port), 30, f"port {self.port} free for {self.name}")
        log = open(os.path.join(self.dir, "broker.log"), "ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)
        _wait(self.ready, 30, f"{self.name} on port {self.port}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self):
        self.stop()
        self.start()


class Redis(Broker):
    def __init__(self, port, work=None):
        super().__init__("redis", port, work)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"

    def command(self):
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--protected-mode", "no",
                "--daemonize", "no"]

    def client(self):
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=10)

    def ready(self):
        return self.client().ping()

    def entries(self, key):
        """[(event_id, seq), change] of every entry of a stream, in stream order."""
        import json
        out, start = [], "-"
        c = self.client()
        while True:
            page = c.xrange(key, start, "+", count=5000)
            if start != "-":
                page = page[1:]
            if not page:
                return out
            for entry_id, fields in page:
                e, s = entry_id.split("-")
                out.append(((int(e), int(s)), json.loads(fields["change"])))
            start = page[-1][0]


class Nats(Broker):
    def __init__(self, port, work=None):
        super().__init__("nats", port, work)

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.port}"

    def command(self):
        return ["nats-server", "-js", "-sd", os.path.join(self.dir, "js"), "-p", str(self.port), "-a", "127.0.0.1",
                "--http_port", "0"]

    def run(self, coro_fn):
        async def go():
            nc = await nats.connect(self.url, connect_timeout=5, max_reconnect_attempts=0)
            try:
                return await coro_fn(nc, nc.jetstream(timeout=10))
            finally:
                await nc.close()
        return asyncio.run(go())

    def ready(self):
        return self.run(lambda nc, js: js.account_info()) is not None

    def messages(self, stream="CHANGERELAY", subject=None):
        """[(stream seq, Nats-Msg-Id, change)] of every message (of `subject`), in stream order."""
        import json

        async def read(nc, js):
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                return []
            out = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                try:
                    m = await js.get_msg(stream, seq)
                except nats.js.errors.NotFoundError:
                    continue
                if subject is None or m.subject == subject:
                    out.append((m.seq, (m.headers or {}).get("Nats-Msg-Id"), json.loads(m.data)))
            return out
        return self.run(read)
