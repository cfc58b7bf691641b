"""What the engine claims, against a real PostgreSQL: only as many jobs as it has idle
threads (a job claimed into a queue would hold its lease there, out of every other worker's
reach), and a dead worker's jobs on threads of their own, however busy the others are."""

from __future__ import annotations

import threading
from typing import Any

from psycopg_pool import ConnectionPool

from tests.daemon.engine_support import FLEET, FakeApi, add_job, make_engine, record
from worker.api.models import Task
from worker.daemon.engine import Engine
from worker.store.presence import FIRST_IN_LINE

POOL_SIZE = 12  # the pool fixture's (tests/conftest.py): each step holds a connection
GUARD = 10.0  # seconds: a hang guard, not an expected duration


class CreatesHeld(FakeApi):
    """Every create waits until the test lets them all go: the engine's threads stay busy."""

    def __init__(self) -> None:
        super().__init__()
        self.go = threading.Event()
        self.entered = threading.Semaphore(0)

    def create(self, payload: dict[str, Any]) -> Task:
        self.entered.release()
        self.go.wait(GUARD)
        return super().create(payload)


def leased(pool: ConnectionPool) -> int:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT count(*) FROM bw_jobs WHERE fleet_id = %s AND lease_owner IS NOT NULL",
            (FLEET,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def entered(api: CreatesHeld, count: int) -> None:
    for _ in range(count):
        assert api.entered.acquire(timeout=GUARD)


def running(engine: Engine) -> threading.Thread:
    thread = threading.Thread(target=engine.run)
    thread.start()
    return thread


def test_no_more_jobs_are_claimed_than_there_are_idle_threads(pool: ConnectionPool) -> None:
    api = CreatesHeld()
    for n in range(7):
        add_job(pool, f"j{n}")
    engine = make_engine(pool, api, rescue_threads=0)  # 4 threads
    thread = running(engine)
    try:
        entered(api, 4)
        threading.Event().wait(0.3)  # a few more claim rounds (idle_wait is 0.02 s)
        assert leased(pool) == 4  # the other 3 stay free for any worker with a thread
    finally:
        api.go.set()
        engine.request_stop()
        thread.join(GUARD)
    assert not thread.is_alive()


def test_a_dead_workers_job_is_stepped_while_every_thread_is_busy(pool: ConnectionPool) -> None:
    api = CreatesHeld()
    for n in range(5):
        add_job(pool, f"j{n}")
    engine = make_engine(pool, api)  # 4 threads, and the rescue lane's
    thread = running(engine)
    try:
        entered(api, 4)
        # A job a dead worker held, its lease run out (worker/store/presence.py).
        add_job(pool, "orphan")
        with pool.connection() as conn:
            conn.execute(
                "UPDATE bw_jobs SET next_run_at = %s WHERE fleet_id = %s AND job_id = 'orphan'",
                (FIRST_IN_LINE, FLEET),
            )
        engine.wake()
        entered(api, 1)  # its create is on its way while the four still wait
        assert record(pool, "orphan").lease_owner == "w1"
        assert leased(pool) == 5  # the fifth ordinary job waits for a thread, unleased
    finally:
        api.go.set()
        engine.request_stop()
        thread.join(GUARD)
    assert not thread.is_alive()


def test_a_wake_claims_at_once_not_at_the_next_idle_round(pool: ConnectionPool) -> None:
    api = CreatesHeld()
    api.go.set()
    engine = make_engine(pool, api, idle_wait=3600.0)  # only a wake makes it claim again
    thread = running(engine)
    try:
        threading.Event().wait(0.2)  # the first round found nothing; it sleeps now
        add_job(pool)
        engine.wake()
        entered(api, 1)
    finally:
        engine.request_stop()
        thread.join(GUARD)
    assert not thread.is_alive()
