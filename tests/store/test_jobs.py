"""Job rows against a real PostgreSQL (a fresh database per test): inserts, reads, the
columns derived from the state, and the table's upgrade."""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from tests.store.store_support import FLEET, LEASE, T0, claim, insert, insert_job, job
from worker.lifecycle import (
    KNOWN_STATUSES,
    JobState,
    Phase,
    PollView,
    Tiles,
    poll_view,
    total_cost,
)
from worker.lifecycle.state import PastRequest, Retry
from worker.store import db, job_intake, job_rows, jobs, leases

ROOT = Path(__file__).resolve().parents[2]


def test_insert_then_get_round_trips_state(pool: ConnectionPool) -> None:
    state = job(deadline=T0 + timedelta(hours=1), max_cost_pu=10.5)
    assert insert(pool, state)
    assert not insert(pool, job(request_hash="other"))
    with pool.connection() as conn:
        record = jobs.get_job(conn, FLEET, "j1")
        assert jobs.get_job(conn, "other-fleet", "j1") is None
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
        rows = [jobs.job_row(s) for s in (fresh, job("old", request_hash="other"), tracked)]
        inserted = jobs.insert_jobs(conn, rows, next_run_at=T0)
        assert jobs.insert_jobs(conn, [], next_run_at=T0) == set()
    assert inserted == {"fresh", "tracked"}
    with pool.connection() as conn:
        records = {j: jobs.get_job(conn, FLEET, j) for j in ("old", "fresh", "tracked")}
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
            leases.save_step(conn, tracked, generation=c.generation, owner="w1")
    with pool.connection() as conn:
        targets = jobs.active_poll_targets(conn, FLEET)
        assert [t.batch_request_id for t in targets] == ["b2", "b1", "b0"]
        assert targets[0].completion == 20.0
        assert jobs.count_active_by_status(conn, FLEET) == {
            "CREATED": 1,
            "PROCESSING": 2,
            "PENDING_CREATE": 1,
        }
        seen = T0 + timedelta(minutes=3)
        assert jobs.touch_seen(conn, FLEET, ["j0", "j1"], seen_at=seen) == 2
        assert jobs.oldest_seen(conn, FLEET) == T0  # j2 was not touched
        jobs.touch_seen(conn, FLEET, ["j2"], seen_at=seen)
        assert jobs.oldest_seen(conn, FLEET) == seen
        # A save carrying an older last_seen_at never moves the column backwards.
        record = jobs.get_job(conn, FLEET, "j0")
    assert record is not None and record.last_seen_at == seen


def test_max_cost_share_is_the_highest_share_of_its_cap_among_active_jobs(
    pool: ConnectionPool,
) -> None:
    with pool.connection() as conn:
        assert jobs.max_cost_share(conn, FLEET) == 0.0  # no job at all
    insert(pool, job("uncapped"))
    insert(pool, job("capped-fresh", max_cost_pu=100.0))  # no cost read yet
    insert(pool, job("capped", max_cost_pu=200.0))
    insert(pool, job("ended", max_cost_pu=10.0))
    with pool.connection() as conn:
        assert jobs.max_cost_share(conn, FLEET) == 0.0
        for c in leases.claim_due(conn, FLEET, "w1", now=T0, lease=LEASE, limit=10):
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
                leases.save_step(conn, state, generation=c.generation, owner="w1")
        assert jobs.max_cost_share(conn, FLEET) == 0.75
        assert jobs.max_cost_share(conn, "other-fleet") == 0.0


def test_max_cost_share_sums_every_request_of_a_job_with_follow_ups(
    pool: ConnectionPool,
) -> None:
    """The cap covers the job's sum (lifecycle.total_cost), so does its share: a follow-up
    that has spent 30 of a 100 PU cap after its first request's 60 is at 0.9, not 0.3."""
    insert(pool, job("retried", max_cost_pu=100.0))
    insert(pool, job("single", max_cost_pu=100.0))
    first = PastRequest(batch_request_id="b0", attempt=0, status="DONE", cost_pu=60.0)
    with pool.connection() as conn:
        for c in leases.claim_due(conn, FLEET, "w1", now=T0, lease=LEASE, limit=10):
            changes: dict[str, object] = {"cost_pu": 30.0, "status": "PROCESSING"}
            if c.state.job_id == "retried":
                changes["retry"] = Retry(attempts=1, attempt=1, past=(first,), covering=3)
            state = c.state.model_copy(update=changes)
            leases.save_step(conn, state, generation=c.generation, owner="w1")
        assert jobs.max_cost_share(conn, FLEET) == pytest.approx(0.9)


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
            leases.save_step(conn, ended, generation=c.generation, owner="w1")
    with pool.connection() as conn:
        (target,) = jobs.ended_doubtful_targets(conn, FLEET, ended_since=ended_at)
        assert jobs.ended_doubtful_targets(conn, FLEET, ended_since=ended_at + LEASE) == []
        assert jobs.active_poll_targets(conn, FLEET) == []
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
        (c,) = leases.claim_due(
            conn, FLEET, "w2", now=later, lease=LEASE, limit=1, job_ids=["doubtful"]
        )
    assert c.state.phase is Phase.ENDED


def test_the_intake_lookup_probes_each_id_whatever_the_statistics_say(
    pool: ConnectionPool,
) -> None:
    # A burst outruns autovacuum: the statistics still describe the empty table.
    rows = [jobs.job_row(job(f"j{n:05d}")) for n in range(3000)]
    with pool.connection() as conn:
        conn.execute("ANALYZE bw_jobs")  # while empty
        jobs.insert_jobs(conn, rows, next_run_at=T0)
        lookup = jobs.start_intake_lookup(conn, FLEET, {"j00007", "j02999", "nope"})
        assert lookup() == (
            3000,
            {
                "j00007": jobs.IntakeView("h1", None),
                "j02999": jobs.IntakeView("h1", None),
            },
            {},
        )
        (plan,) = conn.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + job_intake._INTAKE_VIEWS,
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


# -- the columns derived from the state -------------------------------------------------------

# ANALYSIS_DONE twice: the status the resting rule turns on.
STATUSES = st.sampled_from([None, "ANALYSIS_DONE", *KNOWN_STATUSES])
MOMENTS = st.none() | st.datetimes(
    min_value=datetime(2026, 1, 1), max_value=datetime(2027, 1, 1), timezones=st.just(UTC)
)


def _retry(costs: list[float]) -> Retry:
    past = tuple(
        PastRequest(batch_request_id=f"b{n}", attempt=n, status="DONE", cost_pu=cost)
        for n, cost in enumerate(costs)
    )
    return Retry(attempts=3, attempt=len(past), past=past)


# A job on its first request or on a follow-up, its earlier requests' costs summed with the
# current one's (no subnormals, as for ``cost_pu``).
RETRIES = st.lists(st.floats(0, 1e6, allow_subnormal=False), max_size=3).map(_retry)


@st.composite
def states(draw: st.DrawFn) -> JobState:
    """Job states across what the derived columns depend on, as the lifecycle may leave
    them (an ended job has an end; a tracked one a request)."""
    phase = draw(st.sampled_from(Phase))
    return job(
        "generated",
        phase=phase,
        status=draw(STATUSES),
        upstream_status=draw(STATUSES),
        batch_request_id=None if phase is Phase.PENDING_CREATE else draw(st.sampled_from(["b"])),
        upstream_created=draw(MOMENTS),
        completion=draw(st.floats(0, 100)),
        # No subnormals: PostgreSQL's float8 input refuses them (the upgrade reads the state's
        # JSON text), and no API bills 5e-324 PU.
        cost_pu=draw(st.none() | st.floats(0, 1e6, allow_subnormal=False)),
        start_wanted=draw(st.booleans()),
        cancel_wanted=draw(st.booleans()),
        create_doubtful=draw(st.booleans()),
        intent_at=draw(MOMENTS),
        max_cost_pu=draw(st.none() | st.floats(1, 1e6)),
        tiles=draw(
            st.none()
            | st.builds(
                Tiles,
                total=st.none() | st.integers(0, 10**6),
                processed=st.integers(0, 10**6),
                failed=st.integers(0, 10**6),
            )
        ),
        last_seen_at=draw(MOMENTS),
        ended_at=draw(MOMENTS.filter(bool)) if phase is Phase.ENDED else None,
        retry=draw(RETRIES),
    )


def derived(conn: Any, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    rows = conn.execute(
        f"SELECT job_id, {', '.join(jobs.DERIVED)} FROM bw_jobs WHERE job_id = ANY(%s)",
        (job_ids,),
    ).fetchall()
    return {row[0]: dict(zip(jobs.DERIVED, row[1:], strict=True)) for row in rows}


def expected_target(state: JobState) -> jobs.PollTarget | None:
    """What the poller must be handed for a job, from the lifecycle alone."""
    view = poll_view(state)
    if state.phase is not Phase.ENDED and state.batch_request_id is not None:
        return jobs.PollTarget(
            state.job_id,
            state.batch_request_id,
            state.upstream_created,
            view.read_status,
            view.completion,
            view.cost_pu,
            state.last_seen_at,
            view.resting,
            view.create_doubtful,
            state.accepted_at,
            attempt=view.attempt,
        )
    if state.phase is Phase.ENDED and view.create_doubtful:
        return jobs.PollTarget(
            state.job_id,
            state.batch_request_id,
            state.upstream_created,
            state.status,
            view.completion,
            view.cost_pu,
            state.last_seen_at,
            False,
            True,
            state.accepted_at,
            ended=True,
            intent_at=view.intent_at,
            attempt=view.attempt,
        )
    return None


def targets(conn: Any, job_ids: list[str]) -> dict[str, jobs.PollTarget]:
    found = jobs.active_poll_targets(conn, FLEET) + jobs.ended_doubtful_targets(
        conn, FLEET, ended_since=datetime(2000, 1, 1, tzinfo=UTC)
    )
    return {t.job_id: t for t in found if t.job_id in job_ids}


def test_the_derived_columns_are_named_for_the_lifecycles_poll_view() -> None:
    assert tuple(jobs.DERIVED) == (
        *PollView._fields,
        "max_cost_pu",
        "job_cost_pu",
        "tiles_total",
        "tiles_processed",
        "tiles_failed",
    )


def derived_from(state: JobState) -> dict[str, Any]:
    """The derived columns a write of ``state`` must leave, from the lifecycle alone."""
    return {
        **poll_view(state)._asdict(),
        "max_cost_pu": state.max_cost_pu,
        "job_cost_pu": total_cost(state),
        **jobs.tile_columns(state),
    }


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(state=states())
@example(  # resting
    state=job(
        phase=Phase.TRACKING,
        batch_request_id="b",
        upstream_status="ANALYSIS_DONE",
        status="ANALYSIS_DONE",
        start_wanted=False,
    )
)
@example(  # an ended job swept for, its own request unknown
    state=job(
        phase=Phase.ENDED,
        status="STOPPED",
        ended_at=T0,
        create_doubtful=True,
        intent_at=T0 - timedelta(seconds=3),
    )
)
def test_every_write_derives_the_columns_from_the_lifecycle(
    pool: ConnectionPool, state: JobState
) -> None:
    """Inserted alone, inserted in a batch, or saved by a step: the columns hold what the
    lifecycle says of the state, and the poller is handed exactly that. A rule changed or a
    field renamed in the lifecycle reaches the poller; nothing reads the state's JSON."""
    key = uuid.uuid4().hex[:8]
    alone, batched, saved = (
        state.model_copy(update={"job_id": f"{way}-{key}"}) for way in ("alone", "batch", "save")
    )
    with pool.connection() as conn:
        assert insert_job(conn, alone, next_run_at=T0)
        assert jobs.insert_jobs(conn, [jobs.job_row(batched)], next_run_at=T0) == {batched.job_id}
        assert insert_job(conn, job(saved.job_id), next_run_at=T0)
        (c,) = leases.claim_due(
            conn, FLEET, "w1", now=T0, lease=LEASE, limit=1, job_ids=[saved.job_id]
        )
        assert leases.save_step(conn, saved, generation=c.generation, owner="w1") is None
    written = [alone, batched, saved]
    ids = [s.job_id for s in written]
    with pool.connection() as conn:
        columns = derived(conn, ids)
        handed = targets(conn, ids)
    for s in written:
        assert columns[s.job_id] == derived_from(s)
        assert handed.get(s.job_id) == expected_target(s)


def test_no_query_reads_the_states_json_but_the_upgrade() -> None:
    """A query that read a field out of the state's JSON would go on running, reading
    nothing, once the field was renamed: only the one-off backfill of ``upgrade`` may."""
    reads = re.compile(r"\bstate\s*(->|#>|@>|\?)|jsonb_\w+\(\s*(\w+\.)?state\b")
    found = {
        str(path.relative_to(ROOT)): len(reads.findall(path.read_text()))
        for path in sorted((ROOT / "worker").rglob("*.py"))
    }
    in_upgrade = len(reads.findall(job_rows._UPGRADE)) + len(
        reads.findall(job_rows._UPGRADE_TENANCY)
    )
    assert in_upgrade > 0  # the pattern finds what it is meant to
    assert {path: n for path, n in found.items() if n} == {"worker/store/job_rows.py": in_upgrade}


# -- the upgrade from a table made before the derived columns ---------------------------------

# bw_jobs as the first release made it, and that release's writes: the database a fleet
# upgraded in place comes with, and the pods of the old version during a rollout.
FIRST_SCHEMA = """
CREATE TABLE bw_jobs (
    fleet_id text NOT NULL, job_id text NOT NULL, state jsonb NOT NULL, phase text NOT NULL,
    status text, batch_request_id text, upstream_created timestamptz,
    request_hash text NOT NULL, next_run_at timestamptz, lease_owner text,
    lease_until timestamptz, generation bigint NOT NULL DEFAULT 0,
    cancel_requested_at timestamptz, start_requested_at timestamptz,
    last_status_event jsonb, last_seen_at timestamptz, accepted_at timestamptz NOT NULL,
    ended_at timestamptz, PRIMARY KEY (fleet_id, job_id)
);
CREATE INDEX bw_jobs_due ON bw_jobs (fleet_id, next_run_at) WHERE next_run_at IS NOT NULL;
CREATE INDEX bw_jobs_active ON bw_jobs (fleet_id, upstream_created) WHERE ended_at IS NULL;
CREATE INDEX bw_jobs_ended_doubtful ON bw_jobs (fleet_id, ended_at)
    WHERE ended_at IS NOT NULL AND (state->>'create_doubtful')::boolean;
"""
FIRST_INSERT = """
INSERT INTO bw_jobs (fleet_id, job_id, state, phase, status, batch_request_id,
                     upstream_created, request_hash, next_run_at, accepted_at,
                     ended_at, last_seen_at)
VALUES (%(fleet_id)s, %(job_id)s, %(state)s::jsonb, %(phase)s, %(status)s,
        %(batch_request_id)s, %(upstream_created)s, %(request_hash)s,
        %(next_run_at)s, %(accepted_at)s, %(ended_at)s, %(last_seen_at)s)
"""
FIRST_SAVE = """
UPDATE bw_jobs
SET state = %(state)s::jsonb, phase = %(phase)s, status = %(status)s,
    batch_request_id = %(batch_request_id)s, upstream_created = %(upstream_created)s,
    ended_at = %(ended_at)s, last_seen_at = GREATEST(last_seen_at, %(last_seen_at)s)
WHERE fleet_id = %(fleet_id)s AND job_id = %(job_id)s
"""
# What the poller was handed before: the oracle the upgraded table must agree with.
FIRST_ACTIVE_TARGETS = """
SELECT job_id, batch_request_id, upstream_created,
       COALESCE(state->>'upstream_status', status),
       COALESCE((state->>'completion')::float8, 0), (state->>'cost_pu')::float8,
       last_seen_at,
       COALESCE(state->>'upstream_status', status) = 'ANALYSIS_DONE'
           AND NOT COALESCE((state->>'start_wanted')::boolean, true)
           AND NOT COALESCE((state->>'cancel_wanted')::boolean, false),
       COALESCE((state->>'create_doubtful')::boolean, false),
       accepted_at
FROM bw_jobs
WHERE fleet_id = %s AND ended_at IS NULL AND batch_request_id IS NOT NULL
ORDER BY upstream_created DESC NULLS LAST
"""
FIRST_ENDED_TARGETS = """
SELECT job_id, batch_request_id, upstream_created, status,
       COALESCE((state->>'completion')::float8, 0), (state->>'cost_pu')::float8,
       last_seen_at, false, true, accepted_at, true,
       (state->>'intent_at')::timestamptz
FROM bw_jobs
WHERE fleet_id = %s AND ended_at >= %s AND (state->>'create_doubtful')::boolean
"""
FIRST_MAX_COST_SHARE = """
SELECT COALESCE(max(COALESCE((state->>'cost_pu')::float8, 0)
                    / (state->>'max_cost_pu')::float8), 0)
FROM bw_jobs
WHERE fleet_id = %s AND ended_at IS NULL AND (state->>'max_cost_pu')::float8 > 0
"""


def first_release_row(state: JobState) -> dict[str, Any]:
    return {
        "fleet_id": state.fleet_id,
        "job_id": state.job_id,
        "state": state.model_dump_json(),
        "phase": state.phase.value,
        "status": state.status,
        "batch_request_id": state.batch_request_id,
        "upstream_created": state.upstream_created,
        "request_hash": state.request_hash,
        "next_run_at": T0,
        "accepted_at": state.accepted_at,
        "ended_at": state.ended_at,
        "last_seen_at": state.last_seen_at,
    }


@pytest.fixture
def first_release(database_url: str) -> Iterator[ConnectionPool]:
    """A database the first release made, before this version ever started on it."""
    pool = db.open_pool(database_url, max_size=2)
    yield pool
    pool.close()


def fresh_first_release(pool: ConnectionPool, saved: list[JobState]) -> None:
    with pool.connection() as conn:
        conn.execute("DROP TABLE IF EXISTS bw_jobs CASCADE")
        conn.execute(FIRST_SCHEMA)
        for state in saved:
            conn.execute(FIRST_INSERT, first_release_row(state))


def by_job(target: jobs.PollTarget) -> str:
    return target.job_id


def job_list(states_: list[JobState]) -> list[JobState]:
    return [s.model_copy(update={"job_id": f"j{n}"}) for n, s in enumerate(states_)]


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(saved=st.lists(states(), min_size=1, max_size=25).map(job_list))
def test_the_upgrade_fills_the_columns_in_once_as_the_lifecycle_would(
    first_release: ConnectionPool, saved: list[JobState]
) -> None:
    fresh_first_release(first_release, saved)
    since = datetime(2000, 1, 1, tzinfo=UTC)
    with first_release.connection() as conn:
        before = (
            # The first release's SQL said NULL, not false, for a job with no status read
            # yet; its poller took NULL as not resting, as the upgraded column says false.
            [
                dataclasses.replace(target, resting=bool(target.resting))
                for target in (
                    jobs.PollTarget(*row) for row in conn.execute(FIRST_ACTIVE_TARGETS, (FLEET,))
                )
            ],
            [jobs.PollTarget(*row) for row in conn.execute(FIRST_ENDED_TARGETS, (FLEET, since))],
        )
        share = conn.execute(FIRST_MAX_COST_SHARE, (FLEET,)).fetchone()
    db.ensure_schema(first_release)
    with first_release.connection() as conn:
        columns = derived(conn, [s.job_id for s in saved])
        after = (
            jobs.active_poll_targets(conn, FLEET),
            jobs.ended_doubtful_targets(conn, FLEET, ended_since=since),
        )
        # The first release made no follow-ups: its share was the current request's. The
        # upgraded one is the job's sum over the cap, as the lifecycle counts it.
        assert share is not None
        single = [s for s in saved if not s.retry.past]
        if len(single) == len(saved):
            assert jobs.max_cost_share(conn, FLEET) == share[0]
        expected = [
            (total_cost(s) or 0.0) / s.max_cost_pu
            for s in saved
            if s.ended_at is None and s.max_cost_pu
        ]
        assert jobs.max_cost_share(conn, FLEET) == max(expected, default=0.0)
        indexes = {
            name
            for (name,) in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'bw_jobs'"
            ).fetchall()
        }
    assert columns == {s.job_id: derived_from(s) for s in saved}
    # As many orders as ties in ``upstream_created``: compared by job.
    # The first release made no follow-ups, so it knew no attempt; the upgrade reads it.
    attempts = {s.job_id: s.retry.attempt for s in saved}
    for found, first in zip(after, before, strict=True):
        with_attempts = [dataclasses.replace(t, attempt=attempts[t.job_id]) for t in first]
        assert sorted(found, key=by_job) == sorted(with_attempts, key=by_job)
    assert "bw_jobs_ended_doubtful" not in indexes and "bw_jobs_doubtful_ended" in indexes
    # Once: a start after the upgrade leaves the columns as the last write left them.
    with first_release.connection() as conn:
        conn.execute("UPDATE bw_jobs SET resting = NOT resting, derived_rev = 7")
        flipped = derived(conn, [s.job_id for s in saved])
    db.ensure_schema(first_release)
    with first_release.connection() as conn:
        assert derived(conn, [s.job_id for s in saved]) == flipped
        revs = conn.execute("SELECT DISTINCT derived_rev FROM bw_jobs").fetchall()
    assert revs == [(7,)]


def test_a_write_by_an_older_worker_leaves_the_columns_unknown_until_saved_again(
    first_release: ConnectionPool,
) -> None:
    """A rollout runs old and new pods on one table: what an old pod writes after the
    upgrade (its state, not the columns) must not leave the columns saying what the state
    said before. Unknown, the job is read (no status to compare) and swept for (doubtful)."""
    resting = job(
        "resting",
        phase=Phase.TRACKING,
        status="ANALYSIS_DONE",
        batch_request_id="b1",
        upstream_created=T0,
        start_wanted=False,
    )
    fresh_first_release(first_release, [resting])
    db.ensure_schema(first_release)
    with first_release.connection() as conn:
        assert derived(conn, ["resting"])["resting"]["resting"] is True
        # The old pod: a cancel folded in and its stop sent; then a new job taken in.
        cancelled = resting.model_copy(update={"cancel_wanted": True, "completion": 5.0})
        conn.execute(FIRST_SAVE, first_release_row(cancelled))
        conn.execute(FIRST_INSERT, first_release_row(job("newer")))
        ended = resting.model_copy(
            update={"job_id": "ended", "phase": Phase.ENDED, "status": "STOPPED", "ended_at": T0}
        )
        conn.execute(FIRST_INSERT, first_release_row(ended))
        columns = derived(conn, ["resting", "newer", "ended"])
        (target,) = jobs.active_poll_targets(conn, FLEET)
        (swept,) = jobs.ended_doubtful_targets(conn, FLEET, ended_since=T0)
    unknown = dict.fromkeys(jobs.DERIVED)
    assert columns == {"resting": unknown, "newer": unknown, "ended": unknown}
    assert (target.job_id, target.status, target.resting, target.create_doubtful) == (
        "resting",
        None,
        False,
        True,
    )
    assert (swept.job_id, swept.ended, swept.intent_at) == ("ended", True, None)
    # This version's next save of the job derives them again.
    with first_release.connection() as conn:
        (c,) = leases.claim_due(
            conn, FLEET, "w1", now=T0, lease=LEASE, limit=1, job_ids=["resting"]
        )
        leases.save_step(conn, cancelled, generation=c.generation, owner="w1")
        assert derived(conn, ["resting"])["resting"] == derived_from(cancelled)


def test_the_upgrade_drops_the_keys_older_versions_kept_past_the_create(
    first_release: ConnectionPool,
) -> None:
    s3 = {"url": "s3://b/out", "accessKey": "AKIAIOSFODNN7EXAMPLE", "secretAccessKey": "wJalrXUtnF"}
    payload = {"description": "x", "output": {"delivery": {"s3": s3}}}
    tracked = job("tracked", request=payload, phase=Phase.TRACKING, batch_request_id="r1")
    waiting = job("waiting", request=payload)  # its create may still need them
    fresh_first_release(first_release, [tracked, waiting])
    db.ensure_schema(first_release)
    with first_release.connection() as conn:
        rows = dict(
            conn.execute(
                "SELECT job_id, state->'request'->'output'->'delivery'->'s3' FROM bw_jobs"
            ).fetchall()
        )
        tenancy = conn.execute("SELECT DISTINCT adopted, tenant FROM bw_jobs").fetchall()
    assert rows == {"tracked": {"url": "s3://b/out"}, "waiting": s3}
    assert tenancy == [(False, None)]
