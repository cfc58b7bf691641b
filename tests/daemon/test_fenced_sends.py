"""The last window for a duplicate: a worker frozen after its lease check and before its
create goes out, while another worker takes the job over and creates it. Against the
simulator over HTTP, the real ``BatchClient`` and the fleet's budget in PostgreSQL: the
thawed worker's create is refused in the budget token's own statement (the claim's fence),
so the simulator holds one batch request for the job, not two."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from psycopg_pool import ConnectionPool

from tests.daemon.test_engine_simulator import (  # the fixtures, and what they are built from
    client_for,
    example,
    settings,
    simulator,
    submit,
)
from worker.api.budget import Priority
from worker.daemon.engine import Engine
from worker.daemon.fleet_budget import FleetBudget, fenced
from worker.daemon.tiles import TileReader
from worker.lifecycle import tag_for
from worker.simulator import Running
from worker.store import api_budget, leases

pytestmark = pytest.mark.integration

__all__ = ["simulator"]  # a fixture
POOL_SIZE = 12  # the pool fixture's (tests/conftest.py): each step holds a connection
FLEET = "fleet-sim"
LEASE = timedelta(seconds=30)
GUARD = 20.0  # seconds: hang guards, not expected durations


class FrozenBeforeTheSend(FleetBudget):
    """The first token this worker asks for waits until the test thaws it: a worker stopped
    (SIGSTOP, a long pause, the budget's own queue) after the engine's lease check, right
    before the create's POST."""

    def __init__(self, pool: ConnectionPool) -> None:
        super().__init__(6000, pool, FLEET)
        self.frozen = threading.Event()
        self.thaw = threading.Event()

    def acquire(self, priority: Priority = Priority.HIGH) -> float:
        if not self.frozen.is_set():
            self.frozen.set()
            assert self.thaw.wait(GUARD)
        return super().acquire(priority)


def wait_for(check: Callable[[], bool], what: str) -> None:
    done = threading.Event()
    for _ in range(int(GUARD / 0.05)):
        if check():
            return
        done.wait(0.05)
    raise AssertionError(f"not {what} in {GUARD} s")


@pytest.fixture
def engines(pool: ConnectionPool) -> Iterator[list[tuple[Engine, threading.Thread]]]:
    running: list[tuple[Engine, threading.Thread]] = []
    yield running
    for engine, thread in running:
        engine.request_stop()
        thread.join(GUARD)
        assert not thread.is_alive()


def test_a_worker_frozen_before_its_create_does_not_send_it_once_taken_over(
    pool: ConnectionPool,
    simulator: Running,
    s3_bucket: str,
    engines: list[tuple[Engine, threading.Thread]],
) -> None:
    config = settings(lease_seconds=1.0, list_lag_window=1.0)
    frozen = FrozenBeforeTheSend(pool)

    def start(name: str, budget: FleetBudget) -> None:
        client = client_for(simulator)
        client._budget = budget
        engine = Engine(
            config, pool, client, tiles=TileReader(), worker_name=name, threads=1, idle_wait=0.05
        )
        thread = threading.Thread(target=engine.run, name=f"engine-{name}")
        thread.start()
        engines.append((engine, thread))

    job_id = submit(pool, example("max-ndvi-geotiff.json", s3_bucket, features=2))
    start("w-frozen", frozen)
    assert frozen.frozen.wait(GUARD)  # its lease checked, its create about to go
    # Its lease runs out (it renews nothing: frozen); a peer takes the job over and creates.
    start("w-peer", FleetBudget(6000, pool, FLEET))
    wait_for(lambda: owned_request(pool, job_id) is not None, "created by the peer")
    frozen.thaw.set()
    first = engines[0]
    first[0].request_stop()
    first[1].join(GUARD)
    tag = tag_for(FLEET, job_id)
    client = client_for(simulator)

    def tagged() -> list[str]:
        return [t.id for t in client.iter_requests() if tag in (t.description or "")]

    # (The list may lag a create: wait for the peer's to show, then count.)
    wait_for(lambda: owned_request(pool, job_id) in tagged(), "listed")
    assert tagged() == [owned_request(pool, job_id)]


def owned_request(pool: ConnectionPool, job_id: str) -> str | None:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT batch_request_id FROM bw_jobs WHERE fleet_id = %s AND job_id = %s",
            (FLEET, job_id),
        ).fetchone()
    return row[0] if row else None


def test_a_fenced_token_is_refused_once_the_job_was_taken_over(
    pool: ConnectionPool, s3_bucket: str
) -> None:
    job_id = submit(pool, example("max-ndvi-geotiff.json", s3_bucket))
    now = datetime.now(UTC)
    with pool.connection() as conn:
        (old,) = leases.claim_due(conn, FLEET, "w1", now=now, lease=LEASE, limit=1)
    budget = FleetBudget(6000, pool, FLEET)
    with fenced(api_budget.Fence(job_id, old.generation, "w1")):
        budget.acquire()  # still ours: granted
    with pool.connection() as conn:  # its lease ran out; w2 took it over
        (new,) = leases.claim_due(conn, FLEET, "w2", now=now + LEASE * 2, lease=LEASE, limit=1)
    before = tokens(pool)
    with fenced(api_budget.Fence(job_id, old.generation, "w1")), pytest.raises(leases.LeaseLost):
        budget.acquire()
    assert tokens(pool) >= before  # refused: no token taken
    with fenced(api_budget.Fence(job_id, new.generation, "w2")):
        budget.acquire()
    budget.acquire()  # unfenced: granted as ever


def tokens(pool: ConnectionPool) -> float:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT tokens FROM bw_api_budget WHERE fleet_id = %s", (FLEET,)
        ).fetchone()
    assert row is not None
    return float(row[0])
