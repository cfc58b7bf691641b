"""Builders shared by the store tests: a job state, and its insert and claim."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from psycopg_pool import ConnectionPool

from worker.lifecycle import JobState
from worker.store import jobs, leases

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


def insert_job(conn: jobs.Conn, state: JobState, *, next_run_at: datetime) -> bool:
    """One job in, through intake's own insert (the package inserts batches only); False
    when the job exists."""
    return state.job_id in jobs.insert_jobs(conn, [jobs.job_row(state)], next_run_at=next_run_at)


def request_action(
    conn: jobs.Conn, fleet_id: str, job_id: str, action: str, *, now: datetime
) -> bool:
    """A ``start`` or ``cancel`` recorded through intake's own statement; False (and nothing
    recorded) when there is no such job."""
    found = conn.execute(
        "SELECT 1 FROM bw_jobs WHERE fleet_id = %s AND job_id = %s", (fleet_id, job_id)
    ).fetchone()
    jobs.request_actions(conn, fleet_id, [(job_id, action)], now=now)
    return found is not None


def insert(pool: ConnectionPool, state: JobState, at: datetime = T0) -> bool:
    with pool.connection() as conn:
        return insert_job(conn, state, next_run_at=at)


def claim(
    pool: ConnectionPool, owner: str = "w1", now: datetime = T0, limit: int = 10
) -> list[leases.Claim]:
    with pool.connection() as conn:
        return leases.claim_due(conn, FLEET, owner, now=now, lease=LEASE, limit=limit)
