"""A request budget: a token bucket shared by every thread of the process.

The account's limit is per minute and shared by the whole fleet (batch-v2-api.md §10);
each process gets its share as ``per_minute``. Bursting a whole minute at once gets
requests limited, so the bucket holds only a few seconds' worth by default.

Two priorities. A ``HIGH`` request (the default: status reads, actions on existing batch
requests) reserves its slot under the lock (the bucket may go negative) and sleeps outside
it, so such requests are served in arrival order and nobody spins. A ``LOW`` request (a
create) never goes into debt: creates line up FIFO, and the first of them takes a token
only when one is left over after every reservation, so a read that arrives behind a queue
of creates goes first. Creates are not starved: the poller spends at most a share of the
budget (the status loop's ``STATUS_BUDGET_SHARE``), and every token it leaves is theirs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from enum import IntEnum

_DEFAULT_BURST_SECONDS = 10.0
# A token is "whole" within float noise: refill arithmetic may land just under 1.0.
_WHOLE_TOKEN = 1.0 - 1e-9


class Priority(IntEnum):
    HIGH = 0  # status reads and actions on requests that exist: a job is waiting on them
    LOW = 1  # creates: new work, which can wait for tokens nobody else wants


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
        # Low-priority callers in arrival order; only the first one watches the bucket.
        self._low_queue: deque[object] = deque()
        self._low_turn = threading.Condition(self._lock)

    def _refill(self, now: float) -> None:
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    def acquire(self, priority: Priority = Priority.HIGH) -> float:
        """Take one request's worth; block until it is available. Returns seconds waited."""
        if priority is Priority.LOW:
            return self._acquire_spare()
        with self._lock:
            self._refill(self._clock())
            self._tokens -= 1.0
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait

    def _acquire_spare(self) -> float:
        """A token left over by every reservation, behind earlier low-priority callers."""
        ticket = object()
        with self._low_turn:
            started = self._clock()
            self._low_queue.append(ticket)
            queued = self._low_queue[0] is not ticket
            while self._low_queue[0] is not ticket:
                self._low_turn.wait()
        slept = False
        try:
            while True:
                with self._lock:
                    self._refill(self._clock())
                    if self._tokens >= _WHOLE_TOKEN:
                        self._tokens -= 1.0
                        break
                    # Until a whole token is free if nobody reserves meanwhile; a read that
                    # does reserve pushes this back, and the loop looks again.
                    wait = (1.0 - self._tokens) / self._rate
                self._sleep(wait)
                slept = True
        finally:
            with self._low_turn:
                self._low_queue.popleft()
                self._low_turn.notify_all()
        if not (queued or slept):
            return 0.0
        return max(0.0, self._clock() - started)

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

    @property
    def low_priority_waiting(self) -> int:
        """Low-priority callers (creates) in line for a spare token, the first included."""
        with self._lock:
            return len(self._low_queue)
