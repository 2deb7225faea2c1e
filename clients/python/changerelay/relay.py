"""Relay: one WebSocket to the endpoint's ``/ws`` (with ``websockets``), kept open across server restarts.

On every (re)connection it subscribes first to the change feed (from its last cursor), then to the version map
of each followed label. Messages are handled one at a time, in order: a listener that is a coroutine is awaited
before the next message is read, and the cursor moves only after the ``change`` listeners returned, so the
resume point is always "everything before it was handled"; reconnecting resumes from it, so nothing is missed
or repeated. Version maps are replaced on each new subscription and merged with deltas; loaders
(``loader.py``) are offered every version their key reaches.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from .backoff import Backoff
from .loader import Cached, Loader
from .protocol import (NO_VERSION, Change, CloseCode, ErrorMessage, Filter, ProtocolError, ResyncMessage,
                       SubscribedMessage, Version, VersionData, VersionMapMessage, parse_server_message)

log = logging.getLogger("changerelay")

EVENTS = ("open", "versions", "change", "checkpoint", "cursor", "resync", "error", "close")


class RelayError(Exception):
    """``code``: a server error code (``forbidden``, ``unknown_label``, ...) or ``token_revoked``,
    ``protocol``, ``loader``, ``listener``; ``label`` when one label is at fault."""

    def __init__(self, code: str, message: str, label: Optional[str] = None):
        super().__init__(message)
        self.code = code
        self.label = label


@dataclass
class ChangeFeed:
    """A change feed: its labels, an optional tenant filter, and where to resume (None: from now)."""

    labels: List[str]
    filter: Optional[Filter] = None
    cursor: Optional[str] = None


@dataclass
class CloseInfo:
    code: Optional[int]
    reason: str
    #: Seconds before the next attempt; None when the client will not reconnect.
    retry_in: Optional[float]


def socket_url(url: str, token: Optional[str] = None) -> str:
    """The WebSocket URL for ``url`` (``ws://host:port/ws`` or the base ``http://host:port``), token in the query."""
    u = urllib.parse.urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(u.scheme, u.scheme)
    path = u.path if u.path not in ("", "/") else "/ws"
    query = urllib.parse.parse_qsl(u.query)
    if token:
        query = [(k, v) for k, v in query if k != "token"] + [("token", token)]
    return urllib.parse.urlunsplit((scheme, u.netloc, path, urllib.parse.urlencode(query), ""))


@dataclass
class _Connection:
    """What one connection still waits for."""

    awaiting_maps: Set[str] = field(default_factory=set)
    feed_answer_pending: bool = False


class Relay:
    """Follows version maps and a change feed of the endpoint, reconnecting with backoff.

    ``url``: ``ws://host:port/ws`` or ``http://host:port``; ``token`` from ``changerelay.create_token()`` (omit
    under ``auth = trust``; sent as ``?token=``); ``versions``: labels whose maps to follow (each loader adds
    its own); ``changes``: a :class:`ChangeFeed` (the token needs ``rows``); ``backoff``: reconnection delays
    (default 0.25 s doubling to 10 s).

    Use as ``async with Relay(...) as relay:`` or ``relay.start()`` ... ``await relay.close()``.
    """

    def __init__(self, url: str, token: Optional[str] = None, *, versions: Optional[List[str]] = None,
                 changes: Optional[ChangeFeed] = None, backoff: Optional[Backoff] = None,
                 open_timeout: float = 10.0):
        self._url = socket_url(url, token)
        self._feed = changes
        self._cursor: Optional[str] = changes.cursor if changes else None
        self._followed: List[str] = list(dict.fromkeys(versions or []))
        self._backoff = backoff or Backoff()
        self._open_timeout = open_timeout
        self._maps: Dict[str, VersionData] = {}
        self._loaders: Dict[Tuple[str, Optional[str]], Cached] = {}
        self._listeners: Dict[str, List[Callable[..., Any]]] = {e: [] for e in EVENTS}
        self._last_change: Optional[Tuple[int, int]] = None
        self._ws = None
        self._conn = _Connection()
        self._task: Optional[asyncio.Task] = None
        self._closing = False
        self._state = "idle"
        self._connections = 0
        self._synced = asyncio.Event()

    # --- public ---------------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        """``idle``, ``connecting``, ``open``, ``waiting`` (between attempts) or ``closed``."""
        return self._state

    @property
    def cursor(self) -> Optional[str]:
        """Where the change feed resumes: the position after the last change handled (or checkpoint)."""
        return self._cursor

    @property
    def connections(self) -> int:
        """How many connections have opened so far."""
        return self._connections

    def on(self, event: str, listener: Optional[Callable[..., Any]] = None):
        """Adds a listener (also usable as a decorator: ``@relay.on("change")``). Events and their arguments:
        ``open()``, ``versions(label, data, full)``, ``change(change)``, ``checkpoint(cursor)``,
        ``cursor(cursor)``, ``resync(message)``, ``error(RelayError)``, ``close(CloseInfo)``. Coroutine
        listeners are awaited in order."""
        if event not in self._listeners:
            raise ValueError(f"unknown event {event!r}: one of {', '.join(EVENTS)}")

        def add(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._listeners[event].append(fn)
            return fn

        return add(listener) if listener is not None else add

    def start(self) -> "Relay":
        """Connects in a task of the running loop (and keeps reconnecting until :meth:`close`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="changerelay")
        return self

    async def close(self) -> None:
        """Closes the connection for good and stops every loader."""
        self._closing = True
        self._state = "closed"
        for c in list(self._loaders.values()):
            c.close()
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def __aenter__(self) -> "Relay":
        return self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def ready(self) -> None:
        """Returns once connected with every subscription answered and every followed label's map received."""
        await self._synced.wait()

    def follow_versions(self, *labels: str) -> None:
        """Follows these labels' version maps too."""
        for label in labels:
            if label in self._followed:
                continue
            self._followed.append(label)
            if self._state == "open":
                asyncio.get_running_loop().create_task(self._subscribe_versions(label))

    def version(self, label: str, identifier: Optional[str] = None) -> Optional[Version]:
        """The version of a label (``all``) or of one of its rows, as last received."""
        return self._maps.get(label, {}).get(identifier or "all")

    def version_map(self, label: str) -> Optional[VersionData]:
        return self._maps.get(label)

    def loader(self, label: str, load: Loader, identifier: Optional[str] = None,
               retry: Optional[Backoff] = None) -> Cached:
        """Registers the loader of a cache: ``load(version)`` runs once when the version of ``label`` (its
        ``all`` version, or the row ``identifier``'s) is first known and again whenever it increases; never
        twice at once, always with the newest version. One loader per key. Call within the running loop."""
        key = (label, identifier)
        if key in self._loaders:
            raise ValueError(f"a loader for {label}{'' if identifier is None else '/' + identifier} is registered already")
        cached = Cached(label, identifier, load, retry or Backoff(),
                        report=lambda e: self._fail(RelayError("loader", f"loader of {label} failed: {e!r}", label)),
                        detach=lambda: self._loaders.pop(key, None))
        self._loaders[key] = cached
        if label in self._maps and label not in self._conn.awaiting_maps:
            _offer(cached, self._maps[label], full=True)
        self.follow_versions(label)
        return cached

    # --- the connection -------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            self._state = "connecting"
            code: Optional[int] = None
            reason = ""
            try:
                async with connect(self._url, open_timeout=self._open_timeout, close_timeout=2,
                                   compression=None, max_size=2**28, proxy=None) as ws:
                    self._ws = ws
                    await self._opened()
                    try:
                        async for text in ws:
                            if isinstance(text, str):
                                await self._handle_safely(text)
                    except ConnectionClosed:
                        pass
                    if ws.close_code is not None:
                        code, reason = ws.close_code, ws.close_reason or ""
            except (OSError, InvalidHandshake, InvalidURI, asyncio.TimeoutError, ConnectionClosed) as e:
                reason = str(e)
            except Exception as e:  # anything else: reported, and the relay goes on reconnecting
                reason = repr(e)
                self._fail(RelayError("protocol", f"the connection failed: {e!r}"))
            finally:
                self._ws = None
                self._synced.clear()
                self._conn = _Connection()
            if self._closing:
                break
            if code == CloseCode.TOKEN_REVOKED:
                self._state = "closed"
                self._fail(RelayError("token_revoked", "the endpoint closed the connection: token revoked"))
                await self._emit("close", CloseInfo(code, reason, None))
                return
            delay = self._backoff.next()
            self._state = "waiting"
            await self._emit("close", CloseInfo(code, reason, delay))
            await asyncio.sleep(delay)

    async def _opened(self) -> None:
        self._state = "open"
        self._connections += 1
        # The feed first: the connection's first answer is then the feed's.
        if self._feed is not None:
            await self._subscribe_feed()
        for label in list(self._followed):
            await self._subscribe_versions(label)
        self._check_synced()
        await self._emit("open")

    async def _subscribe_feed(self) -> None:
        assert self._feed is not None
        self._conn.feed_answer_pending = True
        await self._send({"op": "subscribe", "labels": self._feed.labels, "since": self._cursor,
                          "versions": False, "changes": True, "filter": self._feed.filter})

    async def _subscribe_versions(self, label: str) -> None:
        self._conn.awaiting_maps.add(label)
        await self._send({"op": "subscribe", "labels": [label], "versions": True, "changes": False})

    async def _send(self, cmd: Dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            return
        try:
            await ws.send(json.dumps(cmd))
        except ConnectionClosed:
            pass  # the read loop sees the close

    # --- messages -------------------------------------------------------------------------------------------

    async def _emit(self, event: str, *args: Any) -> None:
        for listener in list(self._listeners[event]):
            try:
                result = listener(*args)
                if inspect.isawaitable(result):
                    await result
            except Exception as e:
                if event == "error":
                    log.exception("changerelay: an error listener failed")
                else:
                    self._fail(RelayError("listener", f"a {event} listener failed: {e!r}"))

    def _fail(self, error: RelayError) -> None:
        if not self._listeners["error"]:
            log.warning("changerelay: %s: %s", error.code, error)
            return
        asyncio.get_running_loop().create_task(self._emit("error", error))

    async def _handle_safely(self, text: str) -> None:
        try:
            await self._handle(text)
        except (KeyError, TypeError, ValueError) as e:  # a message of an unexpected shape
            self._fail(RelayError("protocol", f"cannot handle {text[:200]!r}: {e!r}"))

    async def _handle(self, text: str) -> None:
        try:
            m = parse_server_message(text)
        except ProtocolError as e:
            self._fail(RelayError("protocol", str(e)))
            return
        kind = m.get("type")
        if kind is None:
            await self._on_versions(m)  # type: ignore[arg-type]
        elif kind == "subscribed":
            await self._on_subscribed(m)  # type: ignore[arg-type]
        elif kind == "change":
            await self._on_change(m)  # type: ignore[arg-type]
        elif kind == "checkpoint":
            await self._move_cursor(m["cursor"], checkpoint=True)  # type: ignore[typeddict-item]
        elif kind == "resync":
            await self._on_resync(m)  # type: ignore[arg-type]
        elif kind == "error":
            await self._on_error(m)  # type: ignore[arg-type]
        self._check_synced()

    async def _on_subscribed(self, m: SubscribedMessage) -> None:
        self._backoff.reset()
        feed = self._feed
        if not self._conn.feed_answer_pending or feed is None or set(m["labels"]) != set(feed.labels):
            return
        self._conn.feed_answer_pending = False
        if self._cursor is None and m.get("cursor") is not None:
            await self._move_cursor(m["cursor"], checkpoint=False)  # type: ignore[arg-type]

    async def _on_versions(self, m: VersionMapMessage) -> None:
        label = m["label"]
        if label not in self._followed:
            return
        full = label in self._conn.awaiting_maps
        self._conn.awaiting_maps.discard(label)
        data = {k: Version(int(e["v"]), int(e["ts"])) for k, e in m["data"].items()}
        merged = data if full else {**self._maps.get(label, {}), **data}
        self._maps[label] = merged
        for c in list(self._loaders.values()):
            if c.label == label:
                _offer(c, merged, full)
        await self._emit("versions", label, merged, full)

    async def _on_change(self, m: Change) -> None:
        if self._feed is None:
            return
        pos = (m["event_id"], m["seq"])
        if self._last_change is not None and pos <= self._last_change:
            return  # a repeat
        await self._emit("change", m)
        self._last_change = pos
        await self._move_cursor(m["cursor"], checkpoint=False)

    async def _move_cursor(self, cursor: str, checkpoint: bool) -> None:
        if cursor == self._cursor:
            return
        self._cursor = cursor
        if checkpoint:
            await self._emit("checkpoint", cursor)
        await self._emit("cursor", cursor)

    async def _on_resync(self, m: ResyncMessage) -> None:
        if self._feed is None:
            return
        self._cursor = None
        # Positions from now on may be lower (another cluster, a restored server): forget the last one.
        self._last_change = None
        await self._subscribe_feed()
        await self._emit("resync", m)

    async def _on_error(self, m: ErrorMessage) -> None:
        label = m.get("label")
        feed_labels = self._feed.labels if self._feed else []
        # The feed's subscribe goes first on a connection, so a refusal while it is unanswered is its refusal.
        answers_feed = self._conn.feed_answer_pending and (label is None or label in feed_labels)
        if answers_feed:
            self._conn.feed_answer_pending = False
        if label is not None:
            self._conn.awaiting_maps.discard(label)
        self._fail(RelayError(m.get("code", "internal"), m.get("message", ""), label))
        if answers_feed and m.get("code") == "bad_cursor":
            # A stored cursor the server cannot read: as for an expired one, start again from now.
            await self._on_resync({"type": "resync", "reason": "cursor_invalid", "labels": feed_labels,
                                   "message": m.get("message", "")})
        elif m.get("code") in ("internal", "busy") and self._ws is not None:
            # A subscription was lost on the server's side: a new connection subscribes everything again.
            await self._ws.close()

    def _check_synced(self) -> None:
        if self._state == "open" and not self._conn.awaiting_maps and not self._conn.feed_answer_pending:
            self._synced.set()


def _offer(c: Cached, data: VersionData, full: bool) -> None:
    """Offers a loader the version its key has in ``data``. A key absent from a full map was never changed
    (version 0) or, if it had a version before, its row was evicted from the worker's shared map: then the
    label's ``all`` version stands in, as the worker's floor would (a spurious load at worst, never a missed
    one)."""
    v = data.get(c.identifier or "all")
    if v is not None:
        c.offer(v)
    elif full:
        if c.latest is None:
            c.offer(NO_VERSION)
        elif c.identifier is not None and "all" in data:
            c.offer(data["all"])
