"""Reading the fleet's jobs for people: lists with filters and pages, one job whole, the
fleet at a glance. Shared by ``batch-worker jobs`` and the status API (``worker.web``), so
both answer the same question the same way.

Read-only, and never the whole state of many jobs: a list selects the few fields it shows
(the create payload, with the producer's evalscript and maybe credentials, stays in the
row). Everything returned passes ``redact``: a description or an error text that quotes a
key comes out masked.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from worker.lifecycle import JobState
from worker.redact import redact
from worker.store import history, jobs

MAX_PAGE = 500
_MAX_OFFSET = 10_000_000
_ORDER_NAMES = ("accepted", "duration")


class BadFilter(ValueError):
    """A filter's value the list does not take; the message names the field first."""


def instant(text: str) -> datetime:
    """An ISO 8601 instant with its zone (``ValueError`` says what is wrong)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError("not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise ValueError("give a time zone (Z or +hh:mm)")
    return moment


@dataclass(frozen=True)
class JobFilter:
    """Which jobs: every field narrows, none given means all of the fleet's."""

    fleet_id: str
    statuses: tuple[str, ...] = ()  # a job's status, or its phase (PENDING_CREATE, ENDED)
    text: str | None = None  # part of the job id or batch request id
    since: datetime | None = None  # accepted at or after
    until: datetime | None = None  # accepted before
    active: bool | None = None  # True: not ended; False: ended
    limit: int = 50
    offset: int = 0
    order: str = "accepted"  # accepted (newest first) | duration (longest first)
    job_id: str | None = None  # exactly this job
    tenant: str | None = None  # only this tenant's jobs (None: every job, of none too)

    @classmethod
    def from_query(
        cls, query: Iterable[tuple[str, str]], *, fleet_id: str, tenant: str | None = None
    ) -> JobFilter:
        """The filter a query asks for, as the status API's ``/api/v1/jobs`` takes it (and
        ``batch-worker jobs`` passes its options): ``status`` (repeated, or a,b), ``q``,
        ``since``, ``until``, ``active`` (true|false), ``limit``, ``offset``, ``order``;
        the first value of any other name counts. Raises ``BadFilter``. ``tenant`` is the
        caller's, never the query's (a query cannot widen its own scope)."""
        values: dict[str, list[str]] = {}
        for name, value in query:
            values.setdefault(name, []).append(value)

        def first(name: str) -> str | None:
            return values.get(name, [None])[0]

        active = first("active")
        if active not in (None, "true", "false"):
            raise BadFilter("active: true or false")
        order = first("order") or "accepted"
        if order not in _ORDER_NAMES:
            raise BadFilter("order: accepted or duration")
        return cls(
            fleet_id=fleet_id,
            tenant=tenant,
            statuses=tuple(
                part.strip().upper()
                for value in values.get("status", [])
                for part in value.split(",")
                if part.strip()
            ),
            text=first("q") or None,
            since=_instant(first("since"), "since"),
            until=_instant(first("until"), "until"),
            active=None if active is None else active == "true",
            limit=_whole(first("limit"), "limit", 50, 1, MAX_PAGE),
            offset=_whole(first("offset"), "offset", 0, 0, _MAX_OFFSET),
            order=order,
        )

    def page(self, jobs: list[dict[str, Any]], total: int) -> dict[str, Any]:
        """The answer for one page of ``jobs`` (of ``total``) that this filter selected."""
        following = self.offset + len(jobs)
        return {
            "fleet_id": self.fleet_id,
            "jobs": jobs,
            "total": total,
            "limit": self.limit,
            "offset": self.offset,
            "next_offset": following if following < total else None,
        }


def _instant(text: str | None, name: str) -> datetime | None:
    if not text:
        return None
    try:
        return instant(text)
    except ValueError as exc:
        raise BadFilter(f"{name}: {exc}") from None


def _whole(text: str | None, name: str, default: int, low: int, high: int) -> int:
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadFilter(f"{name}: not an integer") from None
    if not low <= value <= high:
        raise BadFilter(f"{name}: must be from {low} to {high}")
    return value


_ORDERS = {
    "accepted": "accepted_at DESC, job_id",
    "duration": "COALESCE(ended_at, now()) - accepted_at DESC, job_id",
}

# The state is read whole and parsed (its fields are the lifecycle's, never picked out of
# its JSON in SQL: tests/store/test_jobs.py); what is filtered, sorted or summed is in
# columns of its own.
_SUMMARY = """
    SELECT job_id, fleet_id, tenant, phase, status, batch_request_id, completion, job_cost_pu,
           max_cost_pu, accepted_at, last_seen_at, ended_at, state,
           EXTRACT(EPOCH FROM COALESCE(ended_at, now()) - accepted_at) AS duration_seconds,
           count(*) OVER () AS total
    FROM bw_jobs
"""


def _where(spec: JobFilter) -> tuple[str, list[Any]]:
    clauses = ["fleet_id = %s"]
    params: list[Any] = [spec.fleet_id]
    if spec.statuses:
        clauses.append("(status = ANY(%s) OR phase = ANY(%s))")
        params += [list(spec.statuses), list(spec.statuses)]
    if spec.text:
        # position() rather than LIKE: the text is matched as it is, "%" and "_" included.
        clauses.append(
            "(position(lower(%s) in lower(job_id)) > 0"
            " OR position(lower(%s) in lower(COALESCE(batch_request_id, ''))) > 0)"
        )
        params += [spec.text] * 2
    if spec.tenant is not None:
        clauses.append("tenant = %s")
        params.append(spec.tenant)
    if spec.job_id is not None:
        clauses.append("job_id = %s")
        params.append(spec.job_id)
    if spec.since is not None:
        clauses.append("accepted_at >= %s")
        params.append(spec.since)
    if spec.until is not None:
        clauses.append("accepted_at < %s")
        params.append(spec.until)
    if spec.active is not None:
        clauses.append("ended_at IS NULL" if spec.active else "ended_at IS NOT NULL")
    return " AND ".join(clauses), params


def _summary(row: dict[str, Any]) -> dict[str, Any]:
    state = JobState.model_validate(row["state"])
    description = (state.request or {}).get("description")
    return {
        "job_id": row["job_id"],
        "fleet_id": row["fleet_id"],
        "tenant": row["tenant"],
        "phase": row["phase"],
        "status": row["status"],
        "batch_request_id": row["batch_request_id"],
        "description": description if isinstance(description, str) else None,
        "completion_percentage": row["completion"] or 0.0,
        "cost_pu": row["job_cost_pu"],  # every request of the job
        "max_cost_pu": row["max_cost_pu"],
        "tiles": state.tiles.model_dump() if state.tiles is not None else None,
        "stopped_reason": state.stopped_reason,
        "error": state.error.model_dump() if state.error is not None else None,
        "accepted_at": row["accepted_at"].isoformat(),
        "last_seen_at": row["last_seen_at"].isoformat() if row["last_seen_at"] else None,
        "ended_at": row["ended_at"].isoformat() if row["ended_at"] else None,
        "duration_seconds": float(row["duration_seconds"]),
    }


def list_jobs(conn: psycopg.Connection[Any], spec: JobFilter) -> tuple[list[dict[str, Any]], int]:
    """One page of the jobs ``spec`` selects, and how many it selects in all."""
    where, params = _where(spec)
    limit = max(1, min(spec.limit, MAX_PAGE))
    sql = f"{_SUMMARY} WHERE {where} ORDER BY {_ORDERS[spec.order]} LIMIT %s OFFSET %s"
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(sql, [*params, limit, max(0, spec.offset)]).fetchall()
    total = int(rows[0]["total"]) if rows else _count(conn, where, params)
    found: list[dict[str, Any]] = redact([_summary(row) for row in rows])
    return found, total


def _count(conn: psycopg.Connection[Any], where: str, params: list[Any]) -> int:
    # A page past the end has no row to carry the window's count.
    row = conn.execute(f"SELECT count(*) FROM bw_jobs WHERE {where}", params).fetchone()
    return int(row[0]) if row else 0


def fleets(conn: psycopg.Connection[Any], *, tenant: str | None = None) -> list[str]:
    """The fleets with jobs (of ``tenant``, when given)."""
    if tenant is None:
        rows = conn.execute("SELECT DISTINCT fleet_id FROM bw_jobs ORDER BY 1")
    else:
        rows = conn.execute(
            "SELECT DISTINCT fleet_id FROM bw_jobs WHERE tenant = %s ORDER BY 1", (tenant,)
        )
    return [row[0] for row in rows]


def fleet_overview(
    conn: psycopg.Connection[Any], fleet_id: str, *, top: int = 5, tenant: str | None = None
) -> dict[str, Any]:
    """The fleet at a glance (its jobs of ``tenant``, when given): jobs by status, cost and
    tiles summed, the slowest jobs still running and the latest that failed."""
    where, params = _where(JobFilter(fleet_id=fleet_id, tenant=tenant))
    with conn.cursor(row_factory=dict_row) as cur:
        by_status = cur.execute(
            "SELECT COALESCE(status, phase) AS status, count(*) AS jobs,"
            " COALESCE(sum(job_cost_pu), 0) AS cost_pu,"
            " COALESCE(sum(tiles_total), 0) AS tiles_total,"
            " COALESCE(sum(tiles_processed), 0) AS tiles_processed,"
            " COALESCE(sum(tiles_failed), 0) AS tiles_failed"
            f" FROM bw_jobs WHERE {where} GROUP BY 1 ORDER BY 1",
            params,
        ).fetchall()
    slowest, _ = list_jobs(
        conn,
        JobFilter(fleet_id=fleet_id, tenant=tenant, active=True, order="duration", limit=top),
    )
    failing, _ = list_jobs(
        conn, JobFilter(fleet_id=fleet_id, tenant=tenant, statuses=("FAILED",), limit=top)
    )
    statuses: dict[str, dict[str, Any]] = {
        row["status"]: {
            "jobs": int(row["jobs"]),
            "cost_pu": float(row["cost_pu"]),
            "tiles": {
                "total": int(row["tiles_total"]),
                "processed": int(row["tiles_processed"]),
                "failed": int(row["tiles_failed"]),
            },
        }
        for row in by_status
    }
    return {
        "fleet_id": fleet_id,
        "jobs": sum(entry["jobs"] for entry in statuses.values()),
        "cost_pu": sum(entry["cost_pu"] for entry in statuses.values()),
        "tiles": {
            part: sum(entry["tiles"][part] for entry in statuses.values())
            for part in ("total", "processed", "failed")
        },
        "by_status": statuses,
        "slowest_active": slowest,
        "failing": failing,
    }


def empty_overview(fleet_id: str) -> dict[str, Any]:
    return {
        "fleet_id": fleet_id,
        "jobs": 0,
        "cost_pu": 0.0,
        "tiles": {"total": 0, "processed": 0, "failed": 0},
        "by_status": {},
        "slowest_active": [],
        "failing": [],
    }


def _owned(record: jobs.JobRecord, tenant: str | None) -> bool:
    # Another tenant's job is no job at all: answered as an id nobody uses, so a tenant
    # cannot tell which ids others have.
    return tenant is None or record.state.tenant == tenant


def job_request(
    conn: psycopg.Connection[Any], fleet_id: str, job_id: str, *, tenant: str | None = None
) -> tuple[dict[str, Any] | None, str | None] | None:
    """The job's create payload (unredacted: for reading its delivery bucket, never for an
    answer) and its batch request id; None when the fleet has no such job (of ``tenant``,
    when given)."""
    record = jobs.get_job(conn, fleet_id, job_id)
    if record is None or not _owned(record, tenant):
        return None
    return record.state.request, record.state.batch_request_id


def job_detail(
    conn: psycopg.Connection[Any], fleet_id: str, job_id: str, *, tenant: str | None = None
) -> dict[str, Any] | None:
    """One job whole: its summary, its request (credentials masked), its batch requests
    and its events, oldest first; None when the fleet has no such job (of ``tenant``, when
    given)."""
    record = jobs.get_job(conn, fleet_id, job_id)
    if record is None or not _owned(record, tenant):
        return None
    [summary], _ = list_jobs(conn, JobFilter(fleet_id=fleet_id, job_id=job_id, limit=1))
    state = record.state
    requests = []
    if state.batch_request_id is not None:
        requests.append({"id": state.batch_request_id, "role": "job"})
    requests += [{"id": dup, "role": "duplicate_stopped"} for dup in state.duplicates_stopped]
    detail = {
        **summary,
        "auto_start": state.auto_start,
        "deadline": state.deadline.isoformat() if state.deadline else None,
        "sequence": state.sequence,
        "upstream_status": state.upstream_status,
        "request": state.request,
        "batch_requests": requests,
        "pending": {
            "start": record.start_requested_at is not None and state.ended_at is None,
            "cancel": record.cancel_requested_at is not None and state.ended_at is None,
        },
        "events": history.job_events(conn, fleet_id, job_id),
    }
    result: dict[str, Any] = redact(detail)
    return result
