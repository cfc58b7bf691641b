"""``API_BUDGET_PER_MINUTE`` for the whole fleet: a ``RequestBudget`` whose tokens come from
the fleet's bucket in PostgreSQL (worker/store/api_budget.py), so one replica or twenty
together stay within it, and one alone may use all of it.

Priorities as in worker/api/budget.py, between processes too: a create (``LOW``) takes a
token only when one more is left for a status read. A 429 holds the whole fleet back. When
the database cannot be reached, the process falls back on its own bucket (the whole budget,
as if alone) and says so once: with the database down no job can be stepped anyway, and the
API's own 429s and their ``Retry-After`` still bound it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from worker.api.budget import Priority, RequestBudget
from worker.store import api_budget
from worker.store.api_budget import Fence
from worker.store.leases import LeaseLost

log = logging.getLogger(__name__)

# The fleet's bucket holds this many seconds' worth at most: a 60 s window then sees at most
# API_BUDGET_PER_MINUTE * (1 + BURST_SECONDS / 60) requests (docs/reliability.md).
BURST_SECONDS = 5.0
# Sleep at least this long between looks at an empty bucket (others are taking too).
_MIN_WAIT = 0.01
_POOL_WAIT = 10.0  # a busy pool is waited for; only a database out of reach falls back

# The claim the requests made on this thread are sent under (``fenced``), if any.
_FENCE: ContextVar[Fence | None] = ContextVar("fence", default=None)


@contextlib.contextmanager
def fenced(fence: Fence) -> Iterator[None]:
    """Every token taken on this thread meanwhile checks ``fence`` in its own statement, and
    raises ``LeaseLost`` instead of granting when another worker has taken the job over: a
    worker frozen (SIGSTOP, a long pause, a budget wait) between its lease check and the
    request finds out in the last round trip before the request, not after it."""
    token = _FENCE.set(fence)
    try:
        yield
    finally:
        _FENCE.reset(token)


class FleetBudget(RequestBudget):
    def __init__(
        self,
        per_minute: int,
        pool: ConnectionPool,
        fleet_id: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._rate_per_second = per_minute / 60.0
        burst = max(1, int(self._rate_per_second * BURST_SECONDS))
        super().__init__(per_minute, burst, sleep=sleep)
        self._pool = pool
        self._fleet = fleet_id
        self._fleet_capacity = float(burst)
        self._sleep_for = sleep
        self._degraded = threading.Event()

    def acquire(self, priority: Priority = Priority.HIGH) -> float:
        keep = 1.0 if priority is Priority.LOW else 0.0
        fence = _FENCE.get()
        waited = 0.0
        while True:
            try:
                with self._pool.connection(timeout=_POOL_WAIT) as conn:
                    taken = api_budget.take(
                        conn,
                        self._fleet,
                        rate=self._rate_per_second,
                        capacity=self._fleet_capacity,
                        keep=keep,
                        fence=fence,
                    )
            except (psycopg.Error, PoolTimeout) as exc:
                if fence is not None:
                    # The claim cannot be confirmed: the request waits for a step that can.
                    raise LeaseLost(
                        f"job {fence.job_id}: lease not confirmed before the request"
                        f" ({type(exc).__name__})"
                    ) from None
                self._fall_back(exc)
                return waited + super().acquire(priority)
            if taken.fenced_out:
                assert fence is not None  # only a fenced take is refused so
                raise LeaseLost(
                    f"job {fence.job_id}: taken over before the request"
                    f" (generation {fence.generation})"
                )
            if self._degraded.is_set():
                self._degraded.clear()
                log.info("the fleet's API budget is shared through the database again")
            if taken.granted:
                return waited
            pause = max(_MIN_WAIT, taken.wait)
            self._sleep_for(pause)
            waited += pause

    def defer(self, seconds: float) -> None:
        super().defer(seconds)
        if seconds <= 0:
            return
        try:
            with self._pool.connection(timeout=_POOL_WAIT) as conn:
                api_budget.hold_back(conn, self._fleet, seconds=seconds, rate=self._rate_per_second)
        except (psycopg.Error, PoolTimeout) as exc:
            self._fall_back(exc)

    def _fall_back(self, exc: BaseException) -> None:
        if not self._degraded.is_set():
            self._degraded.set()
            log.warning(
                "the fleet's API budget cannot be read (%s): this process keeps to its own"
                " bucket until it can",
                type(exc).__name__,
            )
