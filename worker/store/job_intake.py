"""What intake reads and writes on ``bw_jobs``: the jobs a batch names (locked), the batch
requests the fleet created, and the ``start`` / ``cancel`` requests it records.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from psycopg.rows import dict_row

from worker.lifecycle import JobState
from worker.store import capacity
from worker.store.job_rows import Conn
from worker.wire.outgoing import OutboxMessage, message_from_json


@dataclass(frozen=True)
class JobRecord:
    """A job row as ``batch-worker status`` and intake read it."""

    state: JobState
    generation: int
    next_run_at: datetime | None
    lease_owner: str | None
    lease_until: datetime | None
    cancel_requested_at: datetime | None
    start_requested_at: datetime | None
    last_status_event: OutboxMessage | None
    last_seen_at: datetime | None


def get_job(conn: Conn, fleet_id: str, job_id: str) -> JobRecord | None:
    """Read one job."""
    sql = """
        SELECT state, generation, next_run_at, lease_owner, lease_until, cancel_requested_at,
               start_requested_at, last_status_event, last_seen_at
        FROM bw_jobs WHERE fleet_id = %s AND job_id = %s
    """
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(sql, (fleet_id, job_id)).fetchone()
    if row is None:
        return None
    event = row["last_status_event"]
    return JobRecord(
        state=JobState.model_validate(row["state"]),
        generation=row["generation"],
        next_run_at=row["next_run_at"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        cancel_requested_at=row["cancel_requested_at"],
        start_requested_at=row["start_requested_at"],
        last_status_event=message_from_json(event) if event else None,
        last_seen_at=row["last_seen_at"],
    )


@dataclass(frozen=True)
class IntakeView:
    """What intake needs of an existing job: its request, its latest status event, and
    its owner."""

    request_hash: str
    last_status_event: OutboxMessage | None
    tenant: str | None = None


# One primary-key probe per job id, whatever the statistics say. Written as
# "job_id = ANY(...)", the planner, working from statistics taken when the table was small
# (a burst outruns autovacuum), scanned every row of the fleet and filtered: 2.5 ms a batch
# at 10,000 jobs, growing with the table. The locking subquery cannot be flattened into a
# join, so each id is looked up alone, in the (sorted) order given.
_INTAKE_VIEWS = """
    SELECT j.job_id, j.request_hash, j.last_status_event, j.tenant
    FROM unnest(%s::text[]) AS ids (job_id)
    CROSS JOIN LATERAL (
        SELECT job_id, request_hash, last_status_event, tenant FROM bw_jobs
        WHERE fleet_id = %s AND job_id = ids.job_id FOR UPDATE
    ) AS j
"""


def _views(rows: Iterable[tuple[Any, ...]]) -> dict[str, IntakeView]:
    return {
        job_id: IntakeView(request_hash, message_from_json(event) if event else None, tenant)
        for job_id, request_hash, event, tenant in rows
    }


# The batch requests a batch's adopting submits name that jobs of the fleet created, with
# the tenants of those jobs (a tenant may adopt only its own, TenantRule.adopt).
_ORIGINS = """
    SELECT batch_request_id, array_agg(DISTINCT COALESCE(tenant, '')) FROM bw_jobs
    WHERE fleet_id = %s AND batch_request_id = ANY(%s) AND adopted IS NOT TRUE
    GROUP BY batch_request_id
"""


class IntakeLookup(NamedTuple):
    """The lookup's answer: the fleet's active count, the named jobs that exist, and the
    named batch requests the fleet created (id -> their creators' tenants, "" for none)."""

    active: int
    known: dict[str, IntakeView]
    origins: dict[str, frozenset[str]]


def start_intake_lookup(
    conn: Conn, fleet_id: str, job_ids: Collection[str], adopting: Collection[str] = ()
) -> Callable[[], IntakeLookup]:
    """``capacity.count_active`` and the named jobs that exist (locked until the transaction
    ends, in job id order so concurrent batches cannot deadlock) sent at once; call the
    result for them.

    In pipeline mode the statements go out now and the answers are read when called, so
    the caller can work meanwhile (worker/intake.py).
    """
    counted = conn.execute(capacity.COUNT_ACTIVE, (fleet_id,))
    views = conn.execute(_INTAKE_VIEWS, (sorted(job_ids), fleet_id)) if job_ids else None
    origins = conn.execute(_ORIGINS, (fleet_id, sorted(adopting))) if adopting else None

    def result() -> IntakeLookup:
        row = counted.fetchone()
        return IntakeLookup(
            int(row[0]) if row else 0,
            _views(views.fetchall() if views else ()),
            {rid: frozenset(tenants) for rid, tenants in (origins.fetchall() if origins else ())},
        )

    return result


def request_actions(
    conn: Conn, fleet_id: str, requests: Sequence[tuple[str, str]], *, now: datetime
) -> None:
    """Record a pending ``start`` or ``cancel`` for each (job id, action) of jobs known to
    exist, and wake them. The lifecycle state is never touched here: the engine folds the
    request in under its lease. An ended job keeps its request recorded but is not woken.

    A ``resume`` is recorded as a ``start``: both ask a job to go on, and the lifecycle
    tells them apart by the job's state (a paused job resumes, a resting one starts)."""
    columns = {"start": "start_requested_at", "cancel": "cancel_requested_at"}
    for column in dict.fromkeys(columns.values()):
        job_ids = sorted(
            {
                job_id
                for job_id, wanted in requests
                if columns.get("start" if wanted == "resume" else wanted) == column
            }
        )
        if not job_ids:
            continue
        conn.execute(
            f"""
            UPDATE bw_jobs
            SET {column} = COALESCE({column}, %(now)s),
                next_run_at = CASE WHEN ended_at IS NULL THEN %(now)s ELSE next_run_at END
            WHERE fleet_id = %(fleet_id)s AND job_id = ANY(%(job_ids)s)
            """,
            {"now": now, "fleet_id": fleet_id, "job_ids": job_ids},
        )
