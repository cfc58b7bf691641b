"""A request budget: a token bucket shared by every thread of the process.

The account's limit is per minute and shared by the whole fleet (batch-v2-api.md §10);
each process gets its share as ``per_minute``. Bursting a whole minute at once gets
requests limited, so the bucket holds only a few seconds' worth by default.

Waiters reserve their slot under the lock (the bucket may go negative) and sleep outside
it, so threads are served in arrival order and nobody spins.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_DEFAULT_BURST_SECONDS = 10.0


class RequestBudget:
    def __init__(
        self,
        per_minute: int,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if per_minute < 1:
            raise ValueError("per_minute must be at least 1")
        if burst is not None and burst < 1:
            raise ValueError("burst must be at least 1")
        self.per_minute = per_minute
        self._rate = per_minute / 60.0  # requests per second
        self.capacity = float(burst or max(1, int(self._rate * _DEFAULT_BURST_SECONDS)))
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.capacity
        self._stamp = clock()

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def acquire(self) -> float:
        """Take one request's worth; block until it is available. Returns seconds waited."""
        with self._lock:
            self._refill(self._clock())
            self._tokens -= 1.0
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait

    def defer(self, seconds: float) -> None:
        """Hold every thread back for ``seconds`` (the API answered 429 with Retry-After)."""
        if seconds <= 0:
            return
        with self._lock:
            self._refill(self._clock())
            self._tokens = min(self._tokens, 0.0) - seconds * self._rate

    @property
    def available(self) -> float:
        """Requests that could go out now without waiting (negative: a queue is waiting)."""
        with self._lock:
            self._refill(self._clock())
            return self._tokens
