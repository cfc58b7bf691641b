"""Recovery in seconds, with real worker processes: a SIGKILLed worker's jobs in hand are
taken over by a live peer through its liveness mark, long before their leases run out; a
frozen (SIGSTOP) worker's go when its unrenewed leases run out, and thawed it writes
nothing over them. Every job ends once, with one batch request."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.e2e.conftest import Events, Producer, Stack, WorkerProcess
from tests.e2e.test_resilience import assert_no_forks, terminal_ids
from worker.lifecycle import tag_for
from worker.store import db

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
GEOTIFF = "max-ndvi-geotiff.json"


def with_schema(stack: Stack) -> None:
    """The tables in place before any worker starts, so the test can read them at once."""
    with psycopg.connect(stack.database_url) as conn:
        db.apply_schema(conn)


def leases_of(stack: Stack, name: str | None = None) -> dict[str, tuple[str, int]]:
    """job_id -> (lease_owner, generation) of the leased jobs (of ``name`` when given)."""
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute(
            "SELECT job_id, lease_owner, generation FROM bw_jobs"
            " WHERE fleet_id = %s AND lease_owner IS NOT NULL",
            (stack.names.settings()["fleet_id"],),
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows if name is None or r[1] == name}


def generations(stack: Stack) -> dict[str, tuple[str | None, int]]:
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute(
            "SELECT job_id, lease_owner, generation FROM bw_jobs WHERE fleet_id = %s",
            (stack.names.settings()["fleet_id"],),
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def registered(stack: Stack) -> set[str]:
    with psycopg.connect(stack.database_url) as conn:
        rows = conn.execute(
            "SELECT worker FROM bw_workers WHERE fleet_id = %s",
            (stack.names.settings()["fleet_id"],),
        ).fetchall()
    return {r[0] for r in rows}


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, show: Callable[[], Any] = str
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {show()}")
        time.sleep(0.1)


def holding(stack: Stack, name: str, timeout: float = 90) -> dict[str, tuple[str, int]]:
    found: dict[str, tuple[str, int]] = {}

    def some() -> bool:
        found.update(leases_of(stack, name))
        return bool(found)

    wait_until(some, timeout, f"{name} to hold a lease")
    return found


def stopped_holding(
    worker: WorkerProcess, stack: Stack, name: str, timeout: float = 90
) -> dict[str, tuple[str, int]]:
    """Stop the worker (SIGSTOP) at a moment it holds leases; what it holds then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        holding(stack, name, timeout)
        worker.signal(signal.SIGSTOP)
        held = leases_of(stack, name)
        if held:
            return held
        worker.signal(signal.SIGCONT)  # it let go just then: try again
    raise AssertionError(f"{name} never stopped with a lease in hand")


def all_taken_over(stack: Stack, held: dict[str, tuple[str, int]], name: str) -> Callable[[], bool]:
    def check() -> bool:
        now = generations(stack)
        return all(
            now[job][1] > generation and now[job][0] != name
            for job, (_, generation) in held.items()
        )

    return check


def assert_each_once(stack: Stack, events: Events, jobs: list[dict[str, Any]]) -> None:
    fleet = stack.names.settings()["fleet_id"]
    for job in jobs:
        final = events.wait_terminal(job["job_id"], timeout=240)
        assert final["data"]["status"] == "DONE", final
        assert len(terminal_ids(events, job["job_id"])) == 1
    upstream = [t["request"].get("description") or "" for t in stack.upstream_requests()]
    for job in jobs:
        tag = tag_for(fleet, job["job_id"])
        assert sum(tag in text for text in upstream) == 1, job["job_id"]
    assert_no_forks(events)


def test_a_sigkilled_workers_jobs_are_taken_over_long_before_their_leases_run_out(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    # Every API call takes a second, so a worker holds leases while it steps. The leases
    # last five minutes: only the dead worker's mark can hand its jobs on within the wait.
    with_schema(stack)
    stack.simulator.configure(latency=1.0, speed=40.0)
    doomed = start_worker(worker_name="doomed", lease_seconds=300)
    start_worker(worker_name="peer", lease_seconds=300)
    # The lease rows and the registry name the workers.
    wait_until(lambda: registered(stack) == {"doomed", "peer"}, 60, "both to register")
    jobs = [stack.payload(GEOTIFF, features=2) for _ in range(8)]
    for job in jobs:
        producer.publish(job)
    held = stopped_holding(doomed, stack, "doomed")
    doomed.kill()  # with jobs in hand
    killed = time.monotonic()
    wait_until(
        all_taken_over(stack, held, "doomed"),
        90,
        "the peer to take the jobs over",
        lambda: (held, generations(stack)),
    )
    print(f"{len(held)} jobs taken over {time.monotonic() - killed:.1f} s after the kill")
    assert "doomed" not in registered(stack)
    stack.simulator.configure(latency=0.0)
    assert_each_once(stack, events, jobs)


def test_a_frozen_worker_loses_its_jobs_to_a_peer_and_thawed_writes_nothing_over_them(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    with_schema(stack)
    stack.simulator.configure(latency=1.0, speed=40.0)
    # Leases of 10 s (renewed every 3 s): at 4 s a worker that is only slow (a loaded
    # machine, a create answered after 1 s) lost a job it was still creating, and the peer
    # created it again (seen once in a full run, never alone).
    frozen = start_worker(worker_name="frozen", lease_seconds=10)
    start_worker(worker_name="peer", lease_seconds=10)
    wait_until(lambda: registered(stack) == {"frozen", "peer"}, 60, "both to register")
    jobs = [stack.payload(GEOTIFF, features=2) for _ in range(8)]
    for job in jobs:
        producer.publish(job)
    held = stopped_holding(frozen, stack, "frozen")
    try:
        # Its mark lives on (the process is alive); its leases, unrenewed, run out.
        wait_until(
            all_taken_over(stack, held, "frozen"),
            90,
            "the peer to take the jobs over",
            lambda: (held, generations(stack)),
        )
    finally:
        frozen.signal(signal.SIGCONT)
    stack.simulator.configure(latency=0.0)
    assert_each_once(stack, events, jobs)
    assert frozen.process.poll() is None  # thawed, it carries on
