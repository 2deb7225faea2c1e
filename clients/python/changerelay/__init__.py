"""pg_changerelay's Python client.

* :class:`Relay` (asyncio, ``websockets``): version maps and a change feed over the endpoint's WebSocket,
  reconnecting with backoff from the last cursor, resync, checkpoints, and loaders (the cache pattern).
* :class:`Watcher` (blocking, psycopg): follows ``changerelay.watch()`` over a database connection.
"""
from .backoff import Backoff
from .loader import Cached, Loader
from .protocol import (NO_VERSION, Change, CloseCode, ProtocolError, ServerMessage, Version, VersionData,
                       is_version_map, parse_server_message)
from .relay import ChangeFeed, CloseInfo, Relay, RelayError, socket_url

__all__ = ["Backoff", "Cached", "Change", "ChangeFeed", "CloseCode", "CloseInfo", "Loader", "NO_VERSION",
           "ProtocolError", "Relay", "RelayError", "ResyncRequired", "ServerMessage", "Version", "VersionData",
           "Watcher", "is_version_map", "parse_server_message", "socket_url"]


def __getattr__(name: str):
    # The psycopg part only when asked for: the WebSocket client does not need psycopg.
    if name in ("Watcher", "ResyncRequired"):
        from . import watch
        return getattr(watch, name)
    raise AttributeError(name)
