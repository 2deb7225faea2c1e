"""The endpoint's protocol, as the README's endpoint section documents it: the commands a client sends over
``/ws``, every message the server sends back, the close codes, and the JSON bodies of the HTTP endpoints."""
from __future__ import annotations

import json
from typing import Any, Dict, List, Literal, NamedTuple, Optional, TypedDict, Union

Json = Any
JsonObject = Dict[str, Any]


class Version(NamedTuple):
    """``v``: the event id (commit LSN) of the last change; ``ts``: its commit time in ms since the epoch."""

    v: int
    ts: int


NO_VERSION = Version(0, 0)

#: A version map's entries: ``all`` (the label's version) and one per row identifier.
VersionData = Dict[str, Version]

#: A tenant filter: equality on columns, one value or a list of values (compared as text).
Filter = Dict[str, Union[str, int, bool, List[Union[str, int, bool]]]]


# --- client -> server -----------------------------------------------------------------------------------------


class SubscribeCommand(TypedDict, total=False):
    op: Literal["subscribe"]
    labels: List[str]
    since: Optional[str]
    versions: bool
    changes: bool
    filter: Optional[Filter]


class UnsubscribeCommand(TypedDict):
    op: Literal["unsubscribe"]
    labels: List[str]


# --- server -> client -----------------------------------------------------------------------------------------


class SubscribedMessage(TypedDict):
    type: Literal["subscribed"]
    labels: List[str]
    cursor: Optional[str]


class UnsubscribedMessage(TypedDict):
    type: Literal["unsubscribed"]
    labels: List[str]


class VersionMapMessage(TypedDict):
    """A label's full version map (first, after subscribing) or a delta of the entries a commit moved; the
    one message without ``type``."""

    label: str
    data: Dict[str, Dict[str, int]]


ChangeOp = Literal["insert", "update", "delete", "truncate"]

# `new` is a keyword-safe key in a TypedDict only through the functional form.
Change = TypedDict("Change", {
    "type": Literal["change"],
    "cursor": str,          # the position right after this change: resume from it
    "event_id": int,
    "seq": int,
    "ts": int,
    "xid": int,
    "label": str,
    "table": str,           # schema.table
    "op": ChangeOp,
    "identifier": Optional[str],
    "key": Optional[JsonObject],
    "new": Optional[JsonObject],
    "old": Optional[JsonObject],
    "metadata": Optional[JsonObject],
})


class CheckpointMessage(TypedDict):
    type: Literal["checkpoint"]
    cursor: str


#: ``cursor_expired`` and ``cursor_foreign`` come from the server; ``cursor_invalid`` is this client's own, when
#: the server refused a stored cursor as malformed (``bad_cursor``).
ResyncReason = Literal["cursor_expired", "cursor_foreign", "cursor_invalid"]


class ResyncMessage(TypedDict, total=False):
    type: Literal["resync"]
    reason: ResyncReason
    labels: List[str]
    message: str


ErrorCode = Literal["bad_json", "unknown_op", "unknown_label", "forbidden", "bad_cursor", "bad_filter",
                    "too_large", "busy", "internal"]


class ErrorMessage(TypedDict, total=False):
    type: Literal["error"]
    code: ErrorCode
    label: str
    message: str


ServerMessage = Union[SubscribedMessage, UnsubscribedMessage, VersionMapMessage, Change, CheckpointMessage,
                      ResyncMessage, ErrorMessage]


class CloseCode:
    """WebSocket close codes the endpoint uses."""

    NORMAL = 1000
    SHUTTING_DOWN = 1001
    PROTOCOL_ERROR = 1002
    BINARY_MESSAGE = 1003
    INVALID_UTF8 = 1007
    MESSAGE_TOO_LARGE = 1009
    NO_PONG = 1011
    SLOW_CLIENT = 4001
    TOKEN_REVOKED = 4003


class ProtocolError(ValueError):
    """A server message the protocol does not know."""


_REQUIRED = {
    "change": ("cursor", "label"),
    "checkpoint": ("cursor",),
    "subscribed": ("labels",),
    "unsubscribed": ("labels",),
    "resync": ("message",),
    "error": ("message",),
}


def parse_server_message(text: str) -> ServerMessage:
    """Parses one text message of the server; raises :class:`ProtocolError` for anything unknown."""
    try:
        m = json.loads(text)
    except ValueError as e:
        raise ProtocolError(f"server message is not JSON: {e}") from None
    if not isinstance(m, dict):
        raise ProtocolError("server message is not a JSON object")
    kind = m.get("type")
    if kind is None:
        if isinstance(m.get("label"), str) and isinstance(m.get("data"), dict):
            return m  # type: ignore[return-value]
        raise ProtocolError("message without type is not a version map")
    if kind in _REQUIRED and all(k in m for k in _REQUIRED[kind]):
        return m  # type: ignore[return-value]
    raise ProtocolError(f"unexpected server message of type {kind!r}")


def is_version_map(m: ServerMessage) -> bool:
    return "type" not in m


# --- HTTP bodies ----------------------------------------------------------------------------------------------


class HealthResponse(TypedDict):
    """``GET /health`` (200 while the worker consumes its slot, else 503)."""

    status: Literal["ok", "unavailable"]
    state: str
    consuming: bool
    last_event_id: int
    lag_bytes: int
    clients: int


class StatusResponse(TypedDict):
    """``GET /status`` (token required): what the dashboard shows."""

    worker: Dict[str, Any]    # state, consuming, last_event_id, lag_bytes, cursor
    clients: Dict[str, int]   # connections, unauthenticated, websocket, sse, long_poll, worker_requests
    labels: List[str]         # the labels this token may read
    totals: Dict[str, int]    # batches, changes, messages_sent, bytes_sent (since the endpoint started)
    uptime_ms: int


class LongPollResponse(TypedDict):
    """``GET /changes``."""

    changes: List[Change]
    cursor: Optional[str]
