"""What the status loop leases, against a real PostgreSQL: a burst of status changes larger
than its threads is claimed as its threads come free, never queued under a lease (a worker
killed with such a queue left every job in it to wait out its lease)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

from psycopg_pool import ConnectionPool

from tests.daemon.engine_support import FakeApi, make_status
from tests.daemon.test_engine_claims import leased
from tests.daemon.test_status_loop import tracked
from worker.lifecycle import Observation, TaskSeen
from worker.store import leases

POOL_SIZE = 12  # the pool fixture's (tests/conftest.py): each step holds a connection
GUARD = 10.0  # seconds: a hang guard, not an expected duration
THREADS = 4  # make_status's


class HeldDriver:
    """Holds every step until the test lets them go; steps nothing, keeps its lease."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.entered = threading.Semaphore(0)
        self.lock = threading.Lock()
        self.driven: list[tuple[str, list[Observation]]] = []

    def drive_safely(
        self,
        claim: leases.Claim,
        observations: list[Observation],
        *,
        stop: threading.Event | None = None,
    ) -> None:
        with self.lock:
            self.driven.append((claim.state.job_id, observations))
        self.entered.release()
        assert self.go.wait(GUARD)


def test_a_burst_of_new_statuses_is_leased_only_as_threads_come_free(
    pool: ConnectionPool,
) -> None:
    api, driver = FakeApi(), HeldDriver()
    stale = datetime.now(UTC) - timedelta(hours=1)
    burst = [f"j{n}" for n in range(10)]
    for job_id in burst:
        tracked(pool, api, job_id, "ANALYSING", stale)  # each read next: ANALYSIS_DONE
    loop = make_status(pool, api, driver)
    with ThreadPoolExecutor(THREADS) as executor:
        try:
            loop.poll_once(executor)
            for _ in range(THREADS):
                assert driver.entered.acquire(timeout=GUARD)
            threading.Event().wait(0.3)  # room for a wrong claim to show
            # The other 6 changed jobs are free for any worker with a thread to step them.
            assert leased(pool) == THREADS
        finally:
            driver.go.set()
        for _ in range(len(burst) - THREADS):  # claimed by the threads as they came free
            assert driver.entered.acquire(timeout=GUARD)
    assert sorted(job_id for job_id, _ in driver.driven) == sorted(burst)  # each once
    for _, observations in driver.driven:
        (seen,) = observations
        assert isinstance(seen, TaskSeen) and seen.task.status == "ANALYSIS_DONE"
    assert leased(pool) == len(burst)  # the driver keeps them: every one was claimed


def test_a_round_while_every_thread_is_busy_leases_nothing_more(
    pool: ConnectionPool,
) -> None:
    api, driver = FakeApi(), HeldDriver()
    stale = datetime.now(UTC) - timedelta(hours=1)
    for n in range(THREADS + 2):  # more than the threads: two wait, unleased
        tracked(pool, api, f"busy{n}", "ANALYSING", stale)
    loop = make_status(pool, api, driver, sweep_every_polls=None)
    with ThreadPoolExecutor(THREADS) as executor:
        try:
            loop.poll_once(executor)
            for _ in range(THREADS):
                assert driver.entered.acquire(timeout=GUARD)
            assert leased(pool) == THREADS
            first = {job_id for job_id, _ in driver.driven}
            waiting = {f"busy{n}" for n in range(THREADS + 2)} - first
            # A round while every thread is busy: a new one comes due, and it alone is
            # read (the waiting and the stepped hold their reads); nothing more is leased.
            tracked(pool, api, "late", "ANALYSING", stale)
            calls = len(api.calls)
            loop.poll_once(executor)
            threading.Event().wait(0.3)
            assert leased(pool) == THREADS
            assert api.calls[calls:] == ["get"]
        finally:
            driver.go.set()
        for _ in range(3):
            assert driver.entered.acquire(timeout=GUARD)
    later = [job_id for job_id, _ in driver.driven[THREADS:]]
    # Each once: a job read again while waiting keeps one place, one being stepped gets none.
    assert sorted(later) == sorted(waiting | {"late"})
