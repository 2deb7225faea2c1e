"""The cache pattern: a loader for one key (a label's ``all`` version, or one row identifier's version) that
runs once when the first version is known and again whenever that version increases: never for a repeat or an
older version, never twice at once, and always with the newest version known when it starts (versions that
arrive during a run are coalesced into one more run). A failed run is retried with backoff.

A coroutine function is awaited on the event loop; any other callable runs in a thread (``asyncio.to_thread``),
so a blocking loader (a psycopg query) does not stall the relay."""
from __future__ import annotations

import asyncio
import inspect
from typing import Any, Awaitable, Callable, Generic, List, Optional, TypeVar, Union

from .backoff import Backoff
from .protocol import Version

T = TypeVar("T")
Loader = Callable[[Version], Union[T, Awaitable[T]]]


class Cached(Generic[T]):
    """What :meth:`Relay.loader` returns: the newest value loaded, and when it changes."""

    def __init__(self, label: str, identifier: Optional[str], load: Loader, retry: Backoff,
                 report: Callable[[BaseException], None], detach: Callable[[], None]):
        self.label = label
        self.identifier = identifier
        self._load = load
        self._retry = retry
        self._report = report
        self._detach = detach
        self._latest: Optional[Version] = None
        self._loaded: Optional[Version] = None
        self._value: Optional[T] = None
        self._task: Optional[asyncio.Task] = None
        self._retry_handle: Optional[asyncio.TimerHandle] = None
        self._closed = False
        self._first = asyncio.Event()
        self._listeners: List[Callable[[T, Version], Any]] = []

    @property
    def value(self) -> Optional[T]:
        """The value of the last successful load (None before the first)."""
        return self._value

    @property
    def version(self) -> Optional[Version]:
        """The version the current value was loaded for."""
        return self._loaded

    @property
    def latest(self) -> Optional[Version]:
        """The newest version known for this key (the value may still be loading it)."""
        return self._latest

    @property
    def loading(self) -> bool:
        return self._task is not None

    async def ready(self) -> T:
        """The value, once the first load succeeded."""
        await self._first.wait()
        return self._value  # type: ignore[return-value]

    def on_load(self, listener: Callable[[T, Version], Any]) -> Callable[[], None]:
        """Calls ``listener(value, version)`` after every successful load; returns the function removing it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def close(self) -> None:
        """No further loads; a running one is cancelled (a thread running a blocking loader finishes, its
        value is dropped)."""
        if self._closed:
            return
        self._closed = True
        if self._retry_handle:
            self._retry_handle.cancel()
        if self._task:
            self._task.cancel()
        self._listeners.clear()
        self._detach()

    def offer(self, version: Version) -> None:
        """(For the relay.) Every version learnt for this key; only an increase leads to a load."""
        if self._closed or (self._latest is not None and version.v <= self._latest.v):
            return
        self._latest = version
        self._kick()

    def _kick(self) -> None:
        if self._task is not None or self._closed or self._retry_handle is not None or self._latest is None:
            return
        if self._loaded is not None and self._loaded.v >= self._latest.v:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(self._latest))

    async def _call(self, version: Version) -> T:
        if inspect.iscoroutinefunction(self._load):
            return await self._load(version)
        result = await asyncio.to_thread(self._load, version)
        if inspect.isawaitable(result):
            result = await result
        return result

    async def _run(self, version: Version) -> None:
        try:
            value = await self._call(version)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the loader's own failure: reported, retried
            self._task = None
            if not self._closed:
                self._report(e)
                self._retry_handle = asyncio.get_running_loop().call_later(self._retry.next(), self._retried)
            return
        self._task = None
        if self._closed:
            return
        self._value, self._loaded = value, version
        self._retry.reset()
        self._first.set()
        for listener in list(self._listeners):
            try:
                listener(value, version)
            except Exception as e:
                self._report(e)
        self._kick()

    def _retried(self) -> None:
        self._retry_handle = None
        self._kick()
