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


def insert(pool: ConnectionPool, state: JobState, at: datetime = T0) -> bool:
    with pool.connection() as conn:
        return jobs.insert_job(conn, state, next_run_at=at)


def claim(
    pool: ConnectionPool, owner: str = "w1", now: datetime = T0, limit: int = 10
) -> list[leases.Claim]:
    with pool.connection() as conn:
        return leases.claim_due(conn, FLEET, owner, now=now, lease=LEASE, limit=limit)
