"""``batch-worker status JOB_ID``: a job's latest state, read from the durable state.

For a late reader that missed the events: what the worker knows now, from PostgreSQL.
``--tenant T`` scopes it to one tenant's jobs: another's is answered as no job at all, so
a tenant's reader cannot tell which job ids others use.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import psycopg

from worker import lifecycle
from worker.redact import redact
from worker.settings import Settings
from worker.store import db, jobs


def job_status(
    settings: Settings, job_id: str, *, tenant: str | None = None
) -> dict[str, Any] | None:
    """The job's state as a reader wants it, or None when the fleet has no such job (of
    ``tenant``, when given)."""
    url = settings.database_url.get_secret_value()
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        record = jobs.get_job(conn, settings.fleet_id, job_id)
    if record is None:
        return None
    state = record.state
    if tenant is not None and state.tenant != tenant:
        return None
    latest_event = (
        json.loads(record.last_status_event.body) if record.last_status_event is not None else None
    )
    status: dict[str, Any] = {
        "job_id": state.job_id,
        "fleet_id": state.fleet_id,
        "tenant": state.tenant,
        "phase": state.phase.value,
        "status": state.status,
        "batch_request_id": state.batch_request_id,
        "sequence": state.sequence,
        "completion_percentage": state.completion,
        "tiles": state.tiles.model_dump() if state.tiles is not None else None,
        "cost_pu": lifecycle.total_cost(state),  # every request of the job
        "stopped_reason": state.stopped_reason,
        "error": state.error.model_dump() if state.error is not None else None,
        "auto_start": state.auto_start,
        "deadline": state.deadline.isoformat() if state.deadline else None,
        "max_cost_pu": state.max_cost_pu,
        "retry_failed": state.retry.attempts,
        "attempt": state.retry.attempt,
        "batch_requests": lifecycle.followups.batch_requests(state),
        "cost_guard": state.cost_guard,
        "cost_forecast": state.cost_forecast.model_dump() if state.cost_forecast else None,
        "cost_held": state.cost_held,
        "accepted_at": state.accepted_at.isoformat(),
        "last_seen_at": state.last_seen_at.isoformat() if state.last_seen_at else None,
        "ended_at": state.ended_at.isoformat() if state.ended_at else None,
        "paused": _paused(state),
        "resumes": list(state.resumed),
        "pending": {
            "start": record.start_requested_at is not None and state.phase.value != "ENDED",
            "cancel": record.cancel_requested_at is not None and state.phase.value != "ENDED",
        },
        "latest_status_event": latest_event,
    }
    result: dict[str, Any] = redact(status)
    return result


def _paused(state: lifecycle.JobState) -> dict[str, Any] | None:
    pause = state.pause
    if pause is None:
        return None
    at = pause.next_start_at
    return {
        "reason": pause.reason,
        "since": pause.since.isoformat(),
        "resume_at": at.isoformat() if at else None,
        "start_sent_at": pause.restart_sent_at.isoformat() if pause.restart_sent_at else None,
    }


def print_status(
    settings: Settings, job_id: str, *, as_json: bool, tenant: str | None = None
) -> int:
    """Print the job's state (text or JSON) on stdout; 1 when there is no such job."""
    try:
        status = job_status(settings, job_id, tenant=tenant)
    except psycopg.errors.UndefinedTable:
        status = None  # no worker of this database has ever started: it holds no job
    except psycopg.OperationalError as exc:
        url = settings.database_url.get_secret_value()
        print(f"{db.connect_problem(url, exc)} (BATCH_WORKER_DATABASE_URL)", file=sys.stderr)
        return 1
    if status is None:
        of = f" of tenant {tenant!r}" if tenant is not None else ""
        print(f"no job {job_id!r}{of} in fleet {settings.fleet_id!r}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    tiles = status["tiles"] or {}
    lines = [
        f"job            {status['job_id']} (fleet {status['fleet_id']}"
        + (f", tenant {status['tenant']})" if status["tenant"] else ")"),
        f"status         {status['status'] or '-'} ({status['phase']})",
        f"batch request  {status['batch_request_id'] or '-'}",
        f"completion     {status['completion_percentage']:.1f} %",
        f"tiles          {tiles.get('processed', '-')} done, {tiles.get('failed', '-')} failed,"
        f" {tiles.get('total', '-')} total",
        f"cost           {status['cost_pu'] if status['cost_pu'] is not None else '-'} PU",
        f"forecast       {_forecast(status)}",
        f"sequence       {status['sequence']}",
        f"accepted       {status['accepted_at']}",
        f"last read      {status['last_seen_at'] or '-'}",
    ]
    if status["cost_held"] and status["status"] == "ANALYSIS_DONE":
        lines.append("held           its cost bound exceeds its cap: `start` or `cancel` it")
    if status["stopped_reason"]:
        lines.append(f"stopped        {status['stopped_reason']}")
    if status["paused"]:
        paused = status["paused"]
        when = paused["resume_at"] or "a `resume` command"
        lines.append(f"paused         {paused['reason']} since {paused['since']}, until {when}")
    if status["error"]:
        error = status["error"]
        lines.append(f"error          [{error['source']}] {error['code']}: {error['message']}")
    if status["ended_at"]:
        lines.append(f"ended          {status['ended_at']}")
    print("\n".join(lines))
    return 0


def _forecast(status: dict[str, Any]) -> str:
    """The cost forecast, how it was made, and the cap it is held to."""
    forecast = status["cost_forecast"]
    made = "-" if forecast is None else f"{forecast['pu']} PU ({forecast['method']})"
    cap = status["max_cost_pu"]
    return made if cap is None else f"{made}, cap {cap} PU ({status['cost_guard']} guard)"
