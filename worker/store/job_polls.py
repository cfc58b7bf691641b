"""What the status poller and the gauges read of ``bw_jobs``: the tracked and the recently
ended doubtful jobs, the statuses read unchanged, the active counts and costs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from worker.lifecycle import Phase
from worker.store.job_rows import Conn


@dataclass(frozen=True)
class PollTarget:
    """What the poller needs of an active job: compact, no request payload."""

    job_id: str
    batch_request_id: str | None
    upstream_created: datetime | None
    status: str | None
    completion: float
    cost_pu: float | None
    last_seen_at: datetime | None
    resting: bool = False  # at ANALYSIS_DONE waiting for a `start`: read less often
    # An earlier create may have made a request the job does not know (an uncertain POST, a
    # crash mid-create, a request found by its tag): duplicate sweeps look for it soon, as
    # far back as the job's acceptance.
    create_doubtful: bool = False
    accepted_at: datetime | None = None
    # An ended job still swept a while, for a request its doubtful create may have made
    # (docs/lifecycle.md "Duplicate sweeps"): never read for its status, only for its tag.
    ended: bool = False
    intent_at: datetime | None = None  # the job's last create attempt
    attempt: int = 0  # its current request's (a follow-up's tag is its attempt's own)


# A row an older worker saved last has its derived columns unknown (``upgrade``): its
# sweeps look for the first request's tag only until this version saves it again (the next
# step), as no query reads the state's JSON.
_ATTEMPT = "COALESCE(attempt, 0)"


def active_poll_targets(conn: Conn, fleet_id: str) -> list[PollTarget]:
    """Active jobs that have a batch request, newest upstream first.

    The status compared is the last one *read* (an event may be held back for tiles), so a
    held status is not mistaken for a change. A job an older worker saved last has its
    derived columns unknown (``upgrade``): no status to compare (so a read steps it, and
    the save derives them again), doubtful (so a sweep looks for it).
    """
    rows = conn.execute(
        f"""
        SELECT job_id, batch_request_id, upstream_created, read_status,
               COALESCE(completion, 0), cost_pu, last_seen_at,
               COALESCE(resting, false), COALESCE(create_doubtful, true), accepted_at,
               false, NULL, {_ATTEMPT}
        FROM bw_jobs
        WHERE fleet_id = %s AND ended_at IS NULL AND batch_request_id IS NOT NULL
        ORDER BY upstream_created DESC NULLS LAST
        """,
        (fleet_id,),
    ).fetchall()
    return [PollTarget(*row) for row in rows]


def ended_doubtful_targets(conn: Conn, fleet_id: str, *, ended_since: datetime) -> list[PollTarget]:
    """Jobs that ended at or after ``ended_since`` with a doubtful create (or one not known
    to be certain, ``active_poll_targets``): a request they never knew may exist, so
    duplicate sweeps keep looking for their tag a while."""
    rows = conn.execute(
        f"""
        SELECT job_id, batch_request_id, upstream_created, status,
               COALESCE(completion, 0), cost_pu, last_seen_at, false, true, accepted_at, true,
               intent_at, {_ATTEMPT}
        FROM bw_jobs
        WHERE fleet_id = %s AND ended_at >= %s AND create_doubtful IS NOT false
        """,
        (fleet_id, ended_since),
    ).fetchall()
    return [PollTarget(*row) for row in rows]


def touch_seen(conn: Conn, fleet_id: str, job_ids: Iterable[str], *, seen_at: datetime) -> int:
    """Record that these jobs' statuses were read and had not changed: one statement."""
    ids = list(job_ids)
    if not ids:
        return 0
    cur = conn.execute(
        """
        UPDATE bw_jobs SET last_seen_at = GREATEST(last_seen_at, %s)
        WHERE fleet_id = %s AND job_id = ANY(%s) AND ended_at IS NULL
        """,
        (seen_at, fleet_id, ids),
    )
    return cur.rowcount


def count_active_by_status(conn: Conn, fleet_id: str) -> dict[str, int]:
    """Active jobs per status; jobs not yet created upstream count as ``PENDING_CREATE``."""
    rows = conn.execute(
        """
        SELECT COALESCE(status, 'PENDING_CREATE'), count(*) FROM bw_jobs
        WHERE fleet_id = %s AND ended_at IS NULL GROUP BY 1
        """,
        (fleet_id,),
    ).fetchall()
    return {status: count for status, count in rows}


def max_cost_share(conn: Conn, fleet_id: str) -> float:
    """The highest share of its cap among active jobs with one (0 if none): the job's cost
    over all its requests (the cap covers the sum), over ``max_cost_pu``."""
    row = conn.execute(
        """
        SELECT COALESCE(max(COALESCE(job_cost_pu, 0) / max_cost_pu), 0)
        FROM bw_jobs
        WHERE fleet_id = %s AND ended_at IS NULL AND max_cost_pu > 0
        """,
        (fleet_id,),
    ).fetchone()
    return float(row[0]) if row else 0.0


def oldest_seen(conn: Conn, fleet_id: str) -> datetime | None:
    """The stalest status held among tracked jobs (for ``status_lag_seconds``)."""
    row = conn.execute(
        """
        SELECT min(COALESCE(last_seen_at, accepted_at)) FROM bw_jobs
        WHERE fleet_id = %s AND ended_at IS NULL AND phase = %s
        """,
        (fleet_id, Phase.TRACKING.value),
    ).fetchone()
    return row[0] if row else None
