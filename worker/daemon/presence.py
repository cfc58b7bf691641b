"""This process's presence in the fleet: its liveness mark, its leases renewed, the leases of
dead workers run out (worker/store/presence.py).

One thread, one connection of its own (autocommit), kept apart from the pool: the mark is
a session lock, held as long as this connection lives and no longer. The connection asks
the server for TCP keepalives, so a worker whose node vanished (no FIN) loses its mark in
seconds, not at the kernel's two hours.

Every ``tick``: take the mark again if the connection was lost, touch the registry row, run
out the leases of dead workers (the engine claims those jobs at its next round, first of
all). Every ``lease / 3``: extend this worker's own leases, so a step may take as long as it
needs while leases stay short for a worker that froze (SIGSTOP, a long GC, a partition):
it stops renewing, and its leases run out within ``LEASE_SECONDS``.

``lease_valid`` answers the engine's last question before it sends a request to the API: is
the lease on this job still surely ours? A worker thawed after its leases ran out (another
worker may own the job now) must not act on what it decided before the freeze.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from worker.settings import Settings
from worker.store import presence

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between rounds: the mark checked, dead workers' leases run out
# The server drops a silent client's connection (and its mark) after 5 + 2 * 3 s.
_KEEPALIVES = {"idle": 5, "interval": 2, "count": 3}
_CONNECT_TIMEOUT = 5


def _utc_now() -> datetime:
    return datetime.now(UTC)


def mark_conninfo(url: str, worker: str, *, server_keepalives: bool = True) -> str:
    """The mark's connection: keepalives on both ends, named for ``pg_stat_activity``.

    Without ``server_keepalives`` (``PRESENCE=heartbeat``) the server is not asked for its
    own: a lock the server must drop is not what marks the worker then, and PgBouncer, the
    reason for heartbeat mode, refuses a startup ``options`` parameter it does not know."""
    params: dict[str, Any] = conninfo_to_dict(url)
    if server_keepalives:
        server = " ".join(f"-c tcp_keepalives_{k}={v}" for k, v in _KEEPALIVES.items())
        params["options"] = f"{params.get('options', '')} {server}".strip()
    params.update(
        keepalives=1,
        keepalives_idle=_KEEPALIVES["idle"],
        keepalives_interval=_KEEPALIVES["interval"],
        keepalives_count=_KEEPALIVES["count"],
        connect_timeout=_CONNECT_TIMEOUT,
        application_name=f"batch-worker {worker} mark"[:63],
    )
    return make_conninfo(**params)


class Presence:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = _utc_now,
        tick: float = TICK,
        on_taken_over: Callable[[int], None] | None = None,
    ) -> None:
        self._fleet = settings.fleet_id
        self._me = settings.worker_name
        self._mode: presence.Mode = "heartbeat" if settings.presence == "heartbeat" else "lock"
        self._enabled = settings.presence != "off"
        self._url = mark_conninfo(
            settings.database_url.get_secret_value(),
            self._me,
            server_keepalives=self._mode == "lock",
        )
        self._lease = timedelta(seconds=settings.lease_seconds)
        self._renew_every = settings.lease_seconds / 3
        self._clock = clock
        self._tick = tick
        self._on_taken_over = on_taken_over or (lambda _count: None)
        self._stop = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._marked = False
        self._first_mark = True
        self._next_renewal = 0.0
        self._lock = threading.Lock()
        # (job_id, generation) -> monotonic time the last renewal that covered it began.
        self._renewed: dict[tuple[str, int], float] = {}

    # -- what the engine asks ---------------------------------------------------------------

    def lease_valid(self, job_id: str, generation: int, saved_at: float) -> bool:
        """Whether the lease taken or extended at ``saved_at`` (monotonic), or renewed since,
        has a third of its length left: less, and another worker may have it soon."""
        with self._lock:
            renewed = self._renewed.get((job_id, generation), saved_at)
        since = max(saved_at, renewed)
        return time.monotonic() < since + self._lease.total_seconds() * 2 / 3

    # -- the loop -------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except psycopg.Error as exc:
                log.warning("presence round failed (%s); connecting again", exc)
                self._drop()
            except Exception:
                log.exception("presence round failed")
            self._stop.wait(self._tick)
        self.close()

    def round(self) -> None:
        """One round (the loop's body; tests call it directly)."""
        conn = self._connection()
        now = self._clock()
        if self._enabled:
            if not self._marked:
                self._take_mark(conn, now)
            presence.beat(conn, self._fleet, self._me, now=now)
            freed = presence.expire_dead(
                conn,
                self._fleet,
                self._me,
                now=now,
                mode=self._mode,
                stale_after=self._lease / 3,
            )
            if freed:
                owners = sorted({owner for _, owner in freed})
                log.warning(
                    "worker %s gone: %d of its jobs taken over",
                    ", ".join(owners),
                    len(freed),
                    extra={"dead_workers": owners},
                )
                self._on_taken_over(len(freed))
        if time.monotonic() >= self._next_renewal:
            self.renew(conn)

    def renew(self, conn: psycopg.Connection[Any] | None = None) -> int:
        started = time.monotonic()
        renewed = presence.renew(
            conn or self._connection(),
            self._fleet,
            self._me,
            now=self._clock(),
            lease=self._lease,
        )
        with self._lock:
            self._renewed = {key: started for key in renewed}
        self._next_renewal = started + self._renew_every
        return len(renewed)

    def close(self) -> None:
        """Unregister (a clean exit) and let the mark go with the connection."""
        conn = self._conn
        if conn is not None and not conn.closed and self._enabled:
            try:
                presence.forget(conn, self._fleet, self._me)
            except psycopg.Error as exc:
                log.debug("could not unregister (%s)", exc)
        self._drop()

    # -- the connection -------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._drop()
            self._conn = psycopg.connect(self._url, autocommit=True)
        return self._conn

    def _take_mark(self, conn: psycopg.Connection[Any], now: datetime) -> None:
        if self._mode == "lock" and not presence.take_mark(conn, self._fleet, self._me, now=now):
            log.error(
                "another live process holds this worker's name (%s): WORKER_NAME must be"
                " unique per process; its jobs are recovered by lease expiry only",
                self._me,
            )
            return
        self._marked = True
        if self._first_mark:
            self._first_mark = False
            left = presence.run_out_own(conn, self._fleet, self._me, now=now)
            if left:
                log.warning("%d jobs a previous process of this name held, taken back", len(left))
        log.info("liveness mark held (%s)", self._mode)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        self._marked = False
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
