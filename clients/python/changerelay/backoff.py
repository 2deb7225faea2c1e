"""Exponential backoff with jitter, for reconnecting and for retrying failed loaders."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Backoff:
    """Delays of ``initial`` seconds growing by ``factor`` up to ``maximum``; ``jitter`` (0 to 1) of each is
    random, which spreads clients that lost the same server."""

    initial: float = 0.25
    maximum: float = 10.0
    factor: float = 2.0
    jitter: float = 0.2
    _attempt: int = 0

    def next(self) -> float:
        """The delay before the next attempt; each call grows the next one."""
        base = min(self.maximum, self.initial * self.factor ** self._attempt)
        self._attempt += 1
        return base * (1 - self.jitter * random.random())

    def reset(self) -> None:
        self._attempt = 0
