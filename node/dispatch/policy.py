"""Retry policy: exponential backoff with jitter, and a circuit breaker per destination (peer)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from node.settings import DispatchSection


def backoff_delay(attempt: int, settings: DispatchSection, rng: random.Random | None = None) -> float:
    """Delay before attempt ``attempt + 1`` after ``attempt`` failures (attempt >= 1).

    ``base * 2**(attempt-1)``, capped at ``backoff_max_seconds``; the last ``jitter`` fraction of it
    is random, so peers coming back are not hit by every waiting node at the same instant.
    """
    ceiling = min(settings.backoff_max_seconds, settings.backoff_base_seconds * 2.0 ** max(0, attempt - 1))
    r = float((rng or random).random())
    return ceiling * (1.0 - settings.jitter) + ceiling * settings.jitter * r


BreakerState = Literal["closed", "open", "half-open"]


@dataclass
class _Breaker:
    failures: int = 0
    opened_at: float | None = None
    trial: bool = False  # a half-open trial is in flight


class CircuitBreakers:
    """Consecutive transient failures per peer key; open after ``threshold``, a trial after ``cooldown``.

    While open, ``allow`` is false (nothing is sent to the peer); after the cooldown one caller gets
    ``allow`` (half-open); its success closes the breaker, its failure opens it for another cooldown.
    Thread-safe. In memory: after a restart every breaker starts closed.
    """

    def __init__(self, threshold: int, cooldown: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self._lock = threading.Lock()
        self._state: dict[str, _Breaker] = {}

    def state(self, key: str) -> BreakerState:
        with self._lock:
            b = self._state.get(key)
            if b is None or b.opened_at is None:
                return "closed"
            if b.trial or self.clock() - b.opened_at >= self.cooldown:
                return "half-open"
            return "open"

    def allow(self, key: str) -> bool:
        with self._lock:
            b = self._state.setdefault(key, _Breaker())
            if b.opened_at is None:
                return True
            if b.trial or self.clock() - b.opened_at < self.cooldown:
                return False
            b.trial = True
            return True

    def retry_at(self, key: str) -> float | None:
        """Monotonic time at which an open breaker lets a trial through; None when closed."""
        with self._lock:
            b = self._state.get(key)
            return None if b is None or b.opened_at is None else b.opened_at + self.cooldown

    def success(self, key: str) -> bool:
        """Record a success; True when this closed an open breaker."""
        with self._lock:
            b = self._state.setdefault(key, _Breaker())
            was_open = b.opened_at is not None
            b.failures, b.opened_at, b.trial = 0, None, False
            return was_open

    def failure(self, key: str) -> bool:
        """Record a transient failure; True when this opened the breaker (not when it stays open)."""
        with self._lock:
            b = self._state.setdefault(key, _Breaker())
            b.failures += 1
            if b.trial or (b.opened_at is not None):
                b.opened_at, b.trial = self.clock(), False
                return False
            if b.failures >= self.threshold:
                b.opened_at = self.clock()
                return True
            return False

    def release(self, key: str) -> None:
        """A trial that ended without a verdict on the peer (e.g. a permanent per-job problem)."""
        with self._lock:
            b = self._state.get(key)
            if b is not None:
                b.trial = False
