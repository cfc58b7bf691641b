"""The job store against a real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from psycopg_pool import ConnectionPool

from worker.lifecycle import JobState, Phase
from worker.store import jobs as store
from worker.wire.outgoing import OutboxMessage

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=60)
FLEET = "f1"


def job(job_id: str = "j1", **changes: object) -> JobState:
    fields: dict[str, object] = {
        "job_id": job_id,
        "fleet_id": FLEET,
        "request_hash": "h1",
        "request": {"description": "x"},
        "accepted_at": T0,
    }
    return JobState.model_validate(fields | changes)


def insert(pool: ConnectionPool, state: JobState, at: datetime = T0) -> bool:
    with pool.connection() as conn:
        return store.insert_job(conn, state, next_run_at=at)


def claim(pool: ConnectionPool, owner: str = "w1", now: datetime = T0, limit: int = 10):  # type: ignore[no-untyped-def]
    with pool.connection() as conn:
        return store.claim_due(conn, FLEET, owner, now=now, lease=LEASE, limit=limit)


def test_insert_then_get_round_trips_state(pool: ConnectionPool) -> None:
    state = job(deadline=T0 + timedelta(hours=1), max_cost_pu=10.5)
    assert insert(pool, state)
    assert not insert(pool, job(request_hash="other"))
    with pool.connection() as conn:
        record = store.get_job(conn, FLEET, "j1")
        assert store.get_job(conn, "other-fleet", "j1") is None
    assert record is not None
    assert record.state == state
    assert record.generation == 0
    assert record.next_run_at == T0


def test_insert_jobs_takes_many_in_one_statement_and_leaves_out_existing(
    pool: ConnectionPool,
) -> None:
    assert insert(pool, job("old"))
    tracked = job(
        "tracked",
        status="CREATED",
        batch_request_id="b1",
        upstream_created=T0,
        last_seen_at=T0 + timedelta(seconds=5),
        request={"description": "é ünïcode", "n": [1, 2.5, None, True]},
    )
    fresh = job("fresh", deadline=T0 + timedelta(hours=1), max_cost_pu=10.5)
    with pool.connection() as conn:
        rows = [store.job_row(s) for s in (fresh, job("old", request_hash="other"), tracked)]
        inserted = store.insert_jobs(conn, rows, next_run_at=T0)
        assert store.insert_jobs(conn, [], next_run_at=T0) == set()
    assert inserted == {"fresh", "tracked"}
    with pool.connection() as conn:
        records = {j: store.get_job(conn, FLEET, j) for j in ("old", "fresh", "tracked")}
        columns = conn.execute(
            "SELECT job_id, phase, status, batch_request_id, upstream_created, request_hash,"
            " accepted_at, ended_at, last_seen_at FROM bw_jobs ORDER BY job_id"
        ).fetchall()
    assert records["fresh"] is not None and records["fresh"].state == fresh
    assert records["tracked"] is not None and records["tracked"].state == tracked
    assert records["tracked"].next_run_at == T0
    assert records["old"] is not None and records["old"].state.request_hash == "h1"
    by_id = {row[0]: row[1:] for row in columns}
    assert by_id["tracked"] == (
        tracked.phase.value,
        "CREATED",
        "b1",
        T0,
        "h1",
        T0,
        None,
        T0 + timedelta(seconds=5),
    )
    assert by_id["fresh"] == (fresh.phase.value, None, None, None, "h1", T0, None, None)


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
    with pytest.raises(store.LeaseLost), pool.connection() as conn:
        store.save_step(conn, moved, generation=old.generation, owner="w1")
    with pool.connection() as conn:
        assert not store.release(
            conn, FLEET, "j1", generation=old.generation, owner="w1", next_run_at=T0, now=T0
        )
        store.save_step(conn, moved, generation=new.generation, owner="w2")
        record = store.get_job(conn, FLEET, "j1")
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
        store.save_step(
            conn, state, generation=c.generation, owner="w1", messages=[event], status_event=event
        )
        rows = conn.execute("SELECT count(*) FROM bw_outbox").fetchone()
        record = store.get_job(conn, FLEET, "j1")
    assert rows is not None and rows[0] == 1
    assert record is not None and record.last_status_event == event


def test_lost_lease_writes_no_outbox_rows(pool: ConnectionPool) -> None:
    insert(pool, job())
    (c,) = claim(pool)
    claim(pool, "w2", now=T0 + LEASE * 2)
    event = OutboxMessage(exchange="ex", routing_key="job.created", body=b"{}")
    with pytest.raises(store.LeaseLost), pool.connection() as conn:
        store.save_step(conn, c.state, generation=c.generation, owner="w1", messages=[event])
    with pool.connection() as conn:
        rows = conn.execute("SELECT count(*) FROM bw_outbox").fetchone()
    assert rows is not None and rows[0] == 0


def test_request_during_lease_wakes_the_job_at_release(pool: ConnectionPool) -> None:
    insert(pool, job())
    (c,) = claim(pool)
    later = T0 + timedelta(minutes=10)
    with pool.connection() as conn:
        assert store.request_action(conn, FLEET, "j1", "cancel", now=T0 + timedelta(seconds=1))
        assert not store.request_action(conn, FLEET, "nope", "cancel", now=T0)
        store.release(
            conn, FLEET, "j1", generation=c.generation, owner="w1", next_run_at=later, now=T0
        )
        record = store.get_job(conn, FLEET, "j1")
    assert record is not None
    assert record.next_run_at == T0  # not `later`: the cancel must be folded in now
    (again,) = claim(pool, now=T0 + timedelta(seconds=2))
    assert again.cancel_requested_at == T0 + timedelta(seconds=1)
    # Folding it in clears it; release then honours the step's wake-up.
    with pool.connection() as conn:
        store.save_step(
            conn,
            again.state.model_copy(update={"cancel_wanted": True}),
            generation=again.generation,
            owner="w1",
            folded_cancel=again.cancel_requested_at,
        )
        store.release(
            conn, FLEET, "j1", generation=again.generation, owner="w1", next_run_at=later, now=T0
        )
        record = store.get_job(conn, FLEET, "j1")
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
        store.save_step(conn, ended, generation=c.generation, owner="w1")
        store.release(
            conn, FLEET, "j1", generation=c.generation, owner="w1", next_run_at=T0, now=T0
        )
        store.request_action(conn, FLEET, "j1", "start", now=T0)
        assert store.count_active_by_status(conn, FLEET) == {}
        assert store.active_poll_targets(conn, FLEET) == []
    assert claim(pool, now=T0 + timedelta(days=1)) == []


def test_poll_targets_counts_and_bulk_touch(pool: ConnectionPool) -> None:
    for i in range(3):
        insert(pool, job(f"j{i}"))
    insert(pool, job("pending"), T0 + timedelta(hours=1))
    claims = claim(pool)
    with pool.connection() as conn:
        for i, c in enumerate(claims):
            tracked = c.state.model_copy(
                update={
                    "phase": Phase.TRACKING,
                    "status": "PROCESSING" if i else "CREATED",
                    "batch_request_id": f"b{i}",
                    "upstream_created": T0 + timedelta(minutes=i),
                    "completion": 10.0 * i,
                    "last_seen_at": T0,
                }
            )
            store.save_step(conn, tracked, generation=c.generation, owner="w1")
    with pool.connection() as conn:
        targets = store.active_poll_targets(conn, FLEET)
        assert [t.batch_request_id for t in targets] == ["b2", "b1", "b0"]
        assert targets[0].completion == 20.0
        assert store.count_active_by_status(conn, FLEET) == {
            "CREATED": 1,
            "PROCESSING": 2,
            "PENDING_CREATE": 1,
        }
        seen = T0 + timedelta(minutes=3)
        assert store.touch_seen(conn, FLEET, ["j0", "j1"], seen_at=seen) == 2
        assert store.oldest_seen(conn, FLEET) == T0  # j2 was not touched
        store.touch_seen(conn, FLEET, ["j2"], seen_at=seen)
        assert store.oldest_seen(conn, FLEET) == seen
        # A save carrying an older last_seen_at never moves the column backwards.
        record = store.get_job(conn, FLEET, "j0")
    assert record is not None and record.last_seen_at == seen


def test_max_cost_share_is_the_highest_share_of_its_cap_among_active_jobs(
    pool: ConnectionPool,
) -> None:
    with pool.connection() as conn:
        assert store.max_cost_share(conn, FLEET) == 0.0  # no job at all
    insert(pool, job("uncapped"))
    insert(pool, job("capped-fresh", max_cost_pu=100.0))  # no cost read yet
    insert(pool, job("capped", max_cost_pu=200.0))
    insert(pool, job("ended", max_cost_pu=10.0))
    with pool.connection() as conn:
        assert store.max_cost_share(conn, FLEET) == 0.0
        for c in store.claim_due(conn, FLEET, "w1", now=T0, lease=LEASE, limit=10):
            changes: dict[str, object] = {
                "capped": {"cost_pu": 150.0, "status": "PROCESSING"},
                "uncapped": {"cost_pu": 9000.0, "status": "PROCESSING"},
                "ended": {
                    "cost_pu": 50.0,
                    "status": "STOPPED",
                    "phase": Phase.ENDED,
                    "ended_at": T0,
                },
            }.get(c.state.job_id, {})
            if changes:
                state = c.state.model_copy(update=changes)
                store.save_step(conn, state, generation=c.generation, owner="w1")
        assert store.max_cost_share(conn, FLEET) == 0.75
        assert store.max_cost_share(conn, "other-fleet") == 0.0


def test_a_request_arriving_during_a_step_makes_the_save_write_nothing(
    pool: ConnectionPool,
) -> None:
    insert(pool, job())
    (c,) = claim(pool)
    decided = c.state.model_copy(update={"status": "CREATED", "sequence": 1})
    event = OutboxMessage(exchange="ex", routing_key="job.created", body=b"{}")
    with pool.connection() as conn:  # intake, while the step was being decided
        store.request_action(conn, FLEET, "j1", "cancel", now=T0 + timedelta(seconds=1))
    with pool.connection() as conn:
        arrived = store.save_step(
            conn, decided, generation=c.generation, owner="w1", messages=[event]
        )
        rows = conn.execute("SELECT count(*) FROM bw_outbox").fetchone()
        record = store.get_job(conn, FLEET, "j1")
    assert arrived == store.Requests(cancel_requested_at=T0 + timedelta(seconds=1))
    assert rows is not None and rows[0] == 0
    assert record is not None and record.state == c.state
    # Saved again with the request folded in: it applies, and clears the request.
    folded = decided.model_copy(update={"cancel_wanted": True})
    with pool.connection() as conn:
        again = store.save_step(
            conn,
            folded,
            generation=c.generation,
            owner="w1",
            folded_cancel=arrived.cancel_requested_at,
        )
        record = store.get_job(conn, FLEET, "j1")
    assert again is None
    assert record is not None and record.state == folded and record.cancel_requested_at is None


def test_ended_doubtful_jobs_are_listed_for_sweeps_for_a_while_and_claimable(
    pool: ConnectionPool,
) -> None:
    ended_at = T0 + timedelta(minutes=1)
    for job_id in ("doubtful", "certain"):
        insert(pool, job(job_id))
    for c in claim(pool):
        ended = c.state.model_copy(
            update={
                "phase": Phase.ENDED,
                "status": "STOPPED",
                "ended_at": ended_at,
                "intent_at": T0,
                "create_doubtful": c.state.job_id == "doubtful",
            }
        )
        with pool.connection() as conn:
            store.save_step(conn, ended, generation=c.generation, owner="w1")
    with pool.connection() as conn:
        (target,) = store.ended_doubtful_targets(conn, FLEET, ended_since=ended_at)
        assert store.ended_doubtful_targets(conn, FLEET, ended_since=ended_at + LEASE) == []
        assert store.active_poll_targets(conn, FLEET) == []
    assert (target.job_id, target.ended, target.intent_at, target.accepted_at) == (
        "doubtful",
        True,
        T0,
        T0,
    )
    assert (target.create_doubtful, target.batch_request_id) == (True, None)
    # A duplicate found for it must be stopped: the poller's claim by id takes it.
    later = T0 + timedelta(hours=1)
    with pool.connection() as conn:
        (c,) = store.claim_due(
            conn, FLEET, "w2", now=later, lease=LEASE, limit=1, job_ids=["doubtful"]
        )
    assert c.state.phase is Phase.ENDED


def test_the_intake_lookup_probes_each_id_whatever_the_statistics_say(
    pool: ConnectionPool,
) -> None:
    # A burst outruns autovacuum: the statistics still describe the empty table.
    rows = [store.job_row(job(f"j{n:05d}")) for n in range(3000)]
    with pool.connection() as conn:
        conn.execute("ANALYZE bw_jobs")  # while empty
        store.insert_jobs(conn, rows, next_run_at=T0)
        lookup = store.start_intake_lookup(conn, FLEET, {"j00007", "j02999", "nope"})
        assert lookup() == (
            3000,
            {
                "j00007": store.IntakeView("h1", None),
                "j02999": store.IntakeView("h1", None),
            },
        )
        (plan,) = conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + store._INTAKE_VIEWS,
            (["j00007", "j02999", "nope"], FLEET),
        ).fetchone()

    def nodes(node: dict[str, object]) -> Iterator[dict[str, object]]:
        yield node
        for child in node.get("Plans", []):  # type: ignore[attr-defined]
            yield from nodes(child)

    scans = [n for n in nodes(plan[0]["Plan"]) if n.get("Relation Name") == "bw_jobs"]
    # Three probes of the primary key, none reading the fleet's other 2,997 rows.
    assert [(n["Node Type"], n["Index Name"], n["Actual Loops"]) for n in scans] == [
        ("Index Scan", "bw_jobs_pkey", 3)
    ]
    assert "job_id" in str(scans[0]["Index Cond"])
    assert all(not n.get("Rows Removed by Filter") for n in nodes(plan[0]["Plan"]))
