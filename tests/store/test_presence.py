"""Liveness marks against a real PostgreSQL: a dead owner's leases run out at once, a live
owner's never; renewals extend only what is still the renewer's."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from tests.store.store_support import FLEET, LEASE, T0, claim, insert, job
from worker.store import presence


@pytest.fixture
def connect(database_url: str) -> Iterator[Any]:
    """Connections of their own (autocommit), as each process's mark has; closed after."""
    opened: list[psycopg.Connection[Any]] = []

    def open_one() -> psycopg.Connection[Any]:
        conn = psycopg.connect(database_url, autocommit=True)
        opened.append(conn)
        return conn

    yield open_one
    for conn in opened:
        conn.close()


def eventually(attempt: Callable[[], Any], timeout: float = 30) -> Any:
    """The first truthy answer: a closed session's locks go a moment after the close (the
    server's backend reads the goodbye and exits on its own time)."""
    deadline = time.monotonic() + timeout
    while not (answer := attempt()):
        assert time.monotonic() < deadline, "never"
        time.sleep(0.05)
    return answer


def owner(pool: ConnectionPool, job_id: str) -> tuple[str | None, Any, int]:
    with pool.connection() as conn:
        row = conn.execute(
            "SELECT lease_owner, lease_until, generation FROM bw_jobs WHERE job_id = %s",
            (job_id,),
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


def test_a_dead_owners_leases_run_out_at_once_and_a_live_owners_stay(
    pool: ConnectionPool, connect: Any
) -> None:
    w1, w2, w3 = connect(), connect(), connect()
    assert presence.take_mark(w1, FLEET, "w1", now=T0)
    assert presence.take_mark(w2, FLEET, "w2", now=T0)
    assert presence.take_mark(w3, FLEET, "w3", now=T0)
    insert(pool, job("a"))
    insert(pool, job("b"))
    assert len(claim(pool, "w1", limit=1)) == 1
    assert len(claim(pool, "w2", limit=1)) == 1
    held = {j: owner(pool, j)[0] for j in ("a", "b")}
    dead_job = next(j for j, o in held.items() if o == "w1")
    live_job = next(j for j, o in held.items() if o == "w2")

    # All alive: nothing runs out, nobody else can claim within the lease.
    assert presence.expire_dead(w3, FLEET, "w3", now=T0) == []
    assert claim(pool, "w3", now=T0 + timedelta(seconds=1)) == []

    w1.close()  # the process died: its session, and so its mark, are gone
    freed = eventually(lambda: presence.expire_dead(w3, FLEET, "w3", now=T0))
    assert freed == [(dead_job, "w1")]
    taken = claim(pool, "w3", now=T0 + timedelta(milliseconds=1))
    assert [c.state.job_id for c in taken] == [dead_job]  # long before LEASE ran out
    assert owner(pool, live_job)[0] == "w2"
    # The dead worker is unregistered: judged once.
    assert presence.expire_dead(w3, FLEET, "w3", now=T0) == []


def test_a_name_held_by_a_live_session_is_refused(connect: Any, pool: ConnectionPool) -> None:
    first, second = connect(), connect()
    assert presence.take_mark(first, FLEET, "w1", now=T0)
    assert not presence.take_mark(second, FLEET, "w1", now=T0)
    first.close()
    assert eventually(lambda: presence.take_mark(second, FLEET, "w1", now=T0))


def test_an_unregistered_owner_keeps_its_lease_until_it_runs_out(
    pool: ConnectionPool, connect: Any
) -> None:
    # A worker of an older version holds no mark: it is not judged dead for that.
    w2 = connect()
    assert presence.take_mark(w2, FLEET, "w2", now=T0)
    insert(pool, job("a"))
    claim(pool, "old-worker")
    assert presence.expire_dead(w2, FLEET, "w2", now=T0) == []
    assert owner(pool, "a")[0] == "old-worker"


def test_heartbeat_mode_judges_by_the_registry_row(pool: ConnectionPool, connect: Any) -> None:
    conn = connect()
    presence.beat(conn, FLEET, "w1", now=T0)
    presence.beat(conn, FLEET, "w2", now=T0)
    insert(pool, job("a"))
    claim(pool, "w1")
    later = T0 + timedelta(seconds=4)
    presence.beat(conn, FLEET, "w2", now=later)
    stale = timedelta(seconds=5)
    assert (
        presence.expire_dead(conn, FLEET, "w2", now=later, mode="heartbeat", stale_after=stale)
        == []
    )
    gone = T0 + timedelta(seconds=6)
    freed = presence.expire_dead(conn, FLEET, "w2", now=gone, mode="heartbeat", stale_after=stale)
    assert freed == [("a", "w1")]


def test_renewals_extend_only_the_renewers_own_leases(pool: ConnectionPool, connect: Any) -> None:
    conn = connect()
    insert(pool, job("a"))
    insert(pool, job("b"))
    (mine,) = claim(pool, "w1", limit=1)
    claim(pool, "w2", limit=1)
    later = T0 + LEASE / 2
    assert presence.renew(conn, FLEET, "w1", now=later, lease=LEASE) == [
        (mine.state.job_id, mine.generation)
    ]
    assert owner(pool, mine.state.job_id)[1] == later + LEASE
    # Past its lease, w1 loses the job to w3; w1 back from a freeze renews nothing of it.
    taken = claim(pool, "w3", now=later + LEASE + timedelta(seconds=1))
    assert mine.state.job_id in [c.state.job_id for c in taken]
    assert presence.renew(conn, FLEET, "w1", now=later + LEASE * 2, lease=LEASE) == []


def test_a_restarted_process_of_the_same_name_takes_its_leases_back(
    pool: ConnectionPool, connect: Any
) -> None:
    insert(pool, job("a"))
    claim(pool, "pod-0")  # the container was killed holding it
    conn = connect()
    assert presence.run_out_own(conn, FLEET, "pod-0", now=T0) == ["a"]
    assert [c.state.job_id for c in claim(pool, "pod-0", now=T0)] == ["a"]
