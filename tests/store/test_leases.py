"""Leases on job rows against a real PostgreSQL: claims, fenced saves, releases."""

from __future__ import annotations

from datetime import timedelta

import pytest
from psycopg_pool import ConnectionPool

from tests.store.store_support import FLEET, LEASE, T0, claim, insert, job, request_action
from worker.lifecycle import Phase
from worker.store import jobs, leases
from worker.store.presence import FIRST_IN_LINE
from worker.wire.outgoing import OutboxMessage


def test_claim_takes_due_jobs_once_and_bumps_generation(pool: ConnectionPool) -> None:
    insert(pool, job("due"), T0)
    insert(pool, job("later"), T0 + timedelta(minutes=5))
    first = claim(pool, "w1")
    assert [c.state.job_id for c in first] == ["due"]
    assert first[0].generation == 1
    # Leased: another worker does not get it, even though it is still due.
    assert claim(pool, "w2") == []
    # After the lease expires another worker takes it over with a new generation.
    second = claim(pool, "w2", now=T0 + LEASE + timedelta(seconds=1))
    assert [c.state.job_id for c in second] == ["due"]
    assert second[0].generation == 2


def test_save_is_fenced_on_generation(pool: ConnectionPool) -> None:
    insert(pool, job())
    (old,) = claim(pool, "w1")
    (new,) = claim(pool, "w2", now=T0 + LEASE * 2)
    moved = old.state.model_copy(update={"status": "CREATED", "batch_request_id": "b1"})
    with pytest.raises(leases.LeaseLost), pool.connection() as conn:
        leases.save_step(conn, moved, generation=old.generation, owner="w1")
    with pool.connection() as conn:
        assert not leases.release(
            conn, FLEET, "j1", generation=old.generation, owner="w1", next_run_at=T0, now=T0
        )
        leases.save_step(conn, moved, generation=new.generation, owner="w2")
        record = jobs.get_job(conn, FLEET, "j1")
    assert record is not None
    assert record.state.batch_request_id == "b1"
    assert record.lease_owner == "w2"


def test_save_writes_outbox_rows_in_the_same_transaction(pool: ConnectionPool) -> None:
    insert(pool, job())
    (c,) = claim(pool)
    event = OutboxMessage(
        exchange="ex", routing_key="job.created", body=b'{"id": "e1"}', properties={"a": 1}
    )
    state = c.state.model_copy(update={"status": "CREATED", "sequence": 1})
    with pool.connection() as conn:
        leases.save_step(
            conn, state, generation=c.generation, owner="w1", messages=[event], status_event=event
        )
        rows = conn.execute("SELECT count(*) FROM bw_outbox").fetchone()
        record = jobs.get_job(conn, FLEET, "j1")
    assert rows is not None and rows[0] == 1
    assert record is not None and record.last_status_event == event


def test_lost_lease_writes_no_outbox_rows(pool: ConnectionPool) -> None:
    insert(pool, job())
    (c,) = claim(pool)
    claim(pool, "w2", now=T0 + LEASE * 2)
    event = OutboxMessage(exchange="ex", routing_key="job.created", body=b"{}")
    with pytest.raises(leases.LeaseLost), pool.connection() as conn:
        leases.save_step(conn, c.state, generation=c.generation, owner="w1", messages=[event])
    with pool.connection() as conn:
        rows = conn.execute("SELECT count(*) FROM bw_outbox").fetchone()
    assert rows is not None and rows[0] == 0


def test_request_during_lease_wakes_the_job_at_release(pool: ConnectionPool) -> None:
    insert(pool, job())
    (c,) = claim(pool)
    later = T0 + timedelta(minutes=10)
    with pool.connection() as conn:
        assert request_action(conn, FLEET, "j1", "cancel", now=T0 + timedelta(seconds=1))
        assert not request_action(conn, FLEET, "nope", "cancel", now=T0)
        leases.release(
            conn, FLEET, "j1", generation=c.generation, owner="w1", next_run_at=later, now=T0
        )
        record = jobs.get_job(conn, FLEET, "j1")
    assert record is not None
    assert record.next_run_at == T0  # not `later`: the cancel must be folded in now
    (again,) = claim(pool, now=T0 + timedelta(seconds=2))
    assert again.cancel_requested_at == T0 + timedelta(seconds=1)
    # Folding it in clears it; release then honours the step's wake-up.
    with pool.connection() as conn:
        leases.save_step(
            conn,
            again.state.model_copy(update={"cancel_wanted": True}),
            generation=again.generation,
            owner="w1",
            folded_cancel=again.cancel_requested_at,
        )
        leases.release(
            conn, FLEET, "j1", generation=again.generation, owner="w1", next_run_at=later, now=T0
        )
        record = jobs.get_job(conn, FLEET, "j1")
    assert record is not None
    assert record.cancel_requested_at is None
    assert record.next_run_at == later


def test_ended_job_is_never_due_again(pool: ConnectionPool) -> None:
    insert(pool, job())
    (c,) = claim(pool)
    ended = c.state.model_copy(
        update={"phase": Phase.ENDED, "status": "DONE", "ended_at": T0, "batch_request_id": "b"}
    )
    with pool.connection() as conn:
        leases.save_step(conn, ended, generation=c.generation, owner="w1")
        leases.release(
            conn, FLEET, "j1", generation=c.generation, owner="w1", next_run_at=T0, now=T0
        )
        request_action(conn, FLEET, "j1", "start", now=T0)
        assert jobs.count_active_by_status(conn, FLEET) == {}
        assert jobs.active_poll_targets(conn, FLEET) == []
    assert claim(pool, now=T0 + timedelta(days=1)) == []


def test_a_request_arriving_during_a_step_makes_the_save_write_nothing(
    pool: ConnectionPool,
) -> None:
    insert(pool, job())
    (c,) = claim(pool)
    decided = c.state.model_copy(update={"status": "CREATED", "sequence": 1})
    event = OutboxMessage(exchange="ex", routing_key="job.created", body=b"{}")
    with pool.connection() as conn:  # intake, while the step was being decided
        request_action(conn, FLEET, "j1", "cancel", now=T0 + timedelta(seconds=1))
    with pool.connection() as conn:
        arrived = leases.save_step(
            conn, decided, generation=c.generation, owner="w1", messages=[event]
        )
        rows = conn.execute("SELECT count(*) FROM bw_outbox").fetchone()
        record = jobs.get_job(conn, FLEET, "j1")
    assert arrived == leases.Requests(cancel_requested_at=T0 + timedelta(seconds=1))
    assert rows is not None and rows[0] == 0
    assert record is not None and record.state == c.state
    # Saved again with the request folded in: it applies, and clears the request.
    folded = decided.model_copy(update={"cancel_wanted": True})
    with pool.connection() as conn:
        again = leases.save_step(
            conn,
            folded,
            generation=c.generation,
            owner="w1",
            folded_cancel=arrived.cancel_requested_at,
        )
        record = jobs.get_job(conn, FLEET, "j1")
    assert again is None
    assert record is not None and record.state == folded and record.cancel_requested_at is None


def test_a_save_that_ends_the_drive_gives_the_lease_back_in_the_same_statement(
    pool: ConnectionPool,
) -> None:
    insert(pool, job())
    (c,) = claim(pool)
    later = T0 + timedelta(minutes=3)
    event = OutboxMessage(exchange="ex", routing_key="job.status", body=b'{"id": "e1"}')
    state = c.state.model_copy(update={"status": "CREATED", "sequence": 1})
    with pool.connection() as conn, conn.pipeline():
        saved = leases.save_step(
            conn,
            state,
            generation=c.generation,
            owner="w1",
            messages=[event],
            status_event=event,
            lease_until=T0 + LEASE,
            release=leases.Release(later),
        )
    assert saved is None
    with pool.connection() as conn:
        record = jobs.get_job(conn, FLEET, "j1")
        rows = conn.execute("SELECT routing_key FROM bw_outbox").fetchall()
    assert record is not None and record.state == state
    assert record.lease_owner is None and record.next_run_at == later
    assert rows == [("job.status",)]
    # Free: the next claim at that wake-up takes it, with a new generation.
    (again,) = claim(pool, "w2", now=later)
    assert again.generation == c.generation + 1


def test_a_releasing_save_of_an_ended_job_leaves_it_never_due(pool: ConnectionPool) -> None:
    insert(pool, job())
    (c,) = claim(pool)
    ended = c.state.model_copy(
        update={"phase": Phase.ENDED, "status": "DONE", "ended_at": T0, "batch_request_id": "b"}
    )
    with pool.connection() as conn:
        leases.save_step(
            conn, ended, generation=c.generation, owner="w1", release=leases.Release(T0)
        )
        record = jobs.get_job(conn, FLEET, "j1")
    assert record is not None and record.lease_owner is None and record.next_run_at is None
    assert claim(pool, now=T0 + timedelta(days=1)) == []


def test_a_releasing_save_that_lost_its_lease_writes_and_releases_nothing(
    pool: ConnectionPool,
) -> None:
    insert(pool, job())
    (c,) = claim(pool)
    (other,) = claim(pool, "w2", now=T0 + LEASE * 2)
    event = OutboxMessage(exchange="ex", routing_key="job.status", body=b"{}")
    with pytest.raises(leases.LeaseLost), pool.connection() as conn:
        leases.save_step(
            conn,
            c.state.model_copy(update={"status": "CREATED"}),
            generation=c.generation,
            owner="w1",
            messages=[event],
            release=leases.Release(T0),
        )
    with pool.connection() as conn:
        record = jobs.get_job(conn, FLEET, "j1")
        rows = conn.execute("SELECT count(*) FROM bw_outbox").fetchone()
    assert record is not None and record.lease_owner == "w2" and record.state == c.state
    assert rows == (0,)
    assert other.generation == c.generation + 1


def test_a_rescue_claim_takes_only_the_jobs_a_dead_worker_left(pool: ConnectionPool) -> None:
    insert(pool, job("due"), T0)
    insert(pool, job("orphan"), FIRST_IN_LINE)
    with pool.connection() as conn:
        rescued = leases.claim_due(
            conn, FLEET, "w1", now=T0, lease=LEASE, limit=10, rescued_only=True
        )
    assert [c.state.job_id for c in rescued] == ["orphan"]
    # The ordinary claim still takes both kinds, the dead worker's first.
    insert(pool, job("orphan2"), FIRST_IN_LINE)
    assert [c.state.job_id for c in claim(pool, "w2")] == ["orphan2", "due"]
