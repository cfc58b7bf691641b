"""Leases on job rows: the engine claims due jobs, saves each step, and gives them back.

Fencing: every claim bumps ``generation``; a save or release only applies where the
generation and lease owner are still the claimer's. A worker that lost its lease gets
``LeaseLost`` and must not perform the step's actions.

Like worker/store/jobs.py, every function runs in the caller's transaction and takes its
times as arguments (``now``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from worker.lifecycle import JobState
from worker.store import history, jobs, outbox
from worker.store.jobs import Conn
from worker.store.presence import FIRST_IN_LINE
from worker.wire.outgoing import OutboxMessage, message_from_json, message_to_json


class LeaseLost(Exception):
    """The job's generation or lease owner changed: another worker owns it now."""


@dataclass(frozen=True)
class Requests:
    """The ``start`` / ``cancel`` intake recorded on a job row and no step has folded in."""

    cancel_requested_at: datetime | None = None
    start_requested_at: datetime | None = None


@dataclass(frozen=True)
class Claim:
    """A job this worker holds the lease of, with the requests intake left pending."""

    state: JobState
    generation: int
    cancel_requested_at: datetime | None
    start_requested_at: datetime | None
    last_status_event: OutboxMessage | None

    @property
    def requests(self) -> Requests:
        return Requests(self.cancel_requested_at, self.start_requested_at)


def claim_due(
    conn: Conn,
    fleet_id: str,
    owner: str,
    *,
    now: datetime,
    lease: timedelta,
    limit: int,
    job_ids: Sequence[str] | None = None,
    rescued_only: bool = False,
) -> list[Claim]:
    """Lease up to ``limit`` due jobs (or the given ``job_ids`` when free: due or not,
    ended or not; or with ``rescued_only`` only the jobs a dead worker left, first in
    line: worker/store/presence.py).

    SKIP LOCKED lets many workers claim at once without waiting on each other's rows.
    A claimed job is due again when its lease runs out: should this worker die mid-step,
    the next owner resumes it then, even if it is a tracked job with no timed wake-up.
    """
    # Given jobs may have ended: a duplicate found for one must still be stopped (and told).
    where = "next_run_at <= %(now)s" if job_ids is None else "job_id = ANY(%(job_ids)s)"
    if rescued_only:
        where = "next_run_at = %(first)s"
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"""
            WITH due AS (
                SELECT fleet_id, job_id FROM bw_jobs
                WHERE fleet_id = %(fleet_id)s AND {where}
                  AND (lease_until IS NULL OR lease_until < %(now)s)
                ORDER BY next_run_at NULLS LAST
                LIMIT %(limit)s
                FOR UPDATE SKIP LOCKED
            )
            UPDATE bw_jobs j
            SET generation = j.generation + 1, lease_owner = %(owner)s,
                lease_until = %(lease_until)s, next_run_at = %(lease_until)s
            FROM due WHERE j.fleet_id = due.fleet_id AND j.job_id = due.job_id
            RETURNING j.state, j.generation, j.cancel_requested_at, j.start_requested_at,
                      j.last_status_event
            """,
            {
                "fleet_id": fleet_id,
                "now": now,
                "limit": limit,
                "owner": owner,
                "lease_until": now + lease,
                "job_ids": list(job_ids or ()),
                "first": FIRST_IN_LINE,
            },
        ).fetchall()
    return [
        Claim(
            state=JobState.model_validate(row["state"]),
            generation=row["generation"],
            cancel_requested_at=row["cancel_requested_at"],
            start_requested_at=row["start_requested_at"],
            last_status_event=(
                message_from_json(row["last_status_event"]) if row["last_status_event"] else None
            ),
        )
        for row in rows
    ]


# One statement, so a step's writes travel to PostgreSQL together: the fenced update, the
# outbox rows and the events' history (both inserted only when the update applied) and the
# relays' wake-up. With ``release`` the lease is given back in the same update, which a
# step that ends the drive (no action to perform) needs nothing else for. No row comes
# back (or 0, the count of ``saved``) when the fence or a request that arrived meanwhile
# kept the update from applying: then nothing was written.
_UPDATE = f"""
    UPDATE bw_jobs
    SET state = %(state)s::jsonb, phase = %(phase)s, status = %(status)s,
        batch_request_id = %(batch_request_id)s, upstream_created = %(upstream_created)s,
        ended_at = %(ended_at)s,
        last_seen_at = GREATEST(last_seen_at, %(last_seen_at)s),
        {jobs.DERIVED_SET},
        last_status_event = COALESCE(%(status_event)s, last_status_event),
        cancel_requested_at = NULL,
        start_requested_at = NULL,
        lease_owner = CASE WHEN %(release)s THEN NULL ELSE lease_owner END,
        lease_until = CASE WHEN %(release)s THEN NULL
            ELSE COALESCE(%(lease_until)s, lease_until) END,
        next_run_at = CASE
            WHEN %(release)s AND %(ended_at)s::timestamptz IS NOT NULL THEN NULL
            WHEN %(release)s THEN %(next_run_at)s::timestamptz
            ELSE COALESCE(%(lease_until)s, next_run_at) END
    WHERE fleet_id = %(fleet_id)s AND job_id = %(job_id)s
      AND generation = %(generation)s AND lease_owner = %(owner)s
      AND cancel_requested_at IS NOT DISTINCT FROM %(folded_cancel)s
      AND start_requested_at IS NOT DISTINCT FROM %(folded_start)s
    RETURNING 1
"""
_SAVE = f"""
    WITH saved AS ({_UPDATE}), queued AS (
        {outbox.INSERT_ROWS} WHERE EXISTS (SELECT FROM saved) ORDER BY n
        RETURNING exchange, body, properties
    ), kept AS (
        {history.record_queued("queued")}
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM saved),
           CASE WHEN EXISTS (SELECT FROM queued) THEN pg_notify(%(channel)s, '') END
"""
# A step with no event (most steps of a job that is not moving): the update alone.
_SAVE_QUIET = _UPDATE


@dataclass(frozen=True)
class Release:
    """Give the lease back with the save: the next wake-up (None: the status poller's)."""

    next_run_at: datetime | None


def save_step(
    conn: Conn,
    state: JobState,
    *,
    generation: int,
    owner: str,
    messages: Sequence[OutboxMessage] = (),
    status_event: OutboxMessage | None = None,
    folded_cancel: datetime | None = None,
    folded_start: datetime | None = None,
    lease_until: datetime | None = None,
    release: Release | None = None,
) -> Requests | None:
    """Save a step's state and its outbox rows, fenced on ``generation`` and ``owner``;
    None when saved.

    ``folded_cancel`` / ``folded_start`` are the request columns as the caller last read
    them, all folded into ``state``. The save applies only while they are still what the
    row holds, and clears them. When intake recorded another request since, nothing is
    written and the row's requests are returned: the step was decided without them, so its
    actions must not run (fold them in, step again, save again). The check is the save's
    own WHERE, so no request can slip in between it and the actions but after the commit.

    Raises LeaseLost (the caller's transaction must roll back, and the step's actions must
    not run). ``lease_until`` extends the lease for a long step; ``release`` gives it back
    instead, as :func:`release` would (no request can be pending: the save cleared them).
    """
    events: dict[str, Any] = outbox.rows_parameters(messages) if messages else {}
    if messages:
        events["channel"] = outbox.NOTIFY_CHANNEL
    row = conn.execute(
        _SAVE if messages else _SAVE_QUIET,
        {
            **jobs.columns(state),
            **events,
            "status_event": Jsonb(message_to_json(status_event)) if status_event else None,
            "folded_cancel": folded_cancel,
            "folded_start": folded_start,
            "lease_until": lease_until,
            "release": release is not None,
            "next_run_at": release.next_run_at if release is not None else None,
            "fleet_id": state.fleet_id,
            "job_id": state.job_id,
            "generation": generation,
            "owner": owner,
        },
    ).fetchone()
    if row is not None and row[0] == 1:
        return None
    found = conn.execute(
        """
        SELECT generation, lease_owner, cancel_requested_at, start_requested_at
        FROM bw_jobs WHERE fleet_id = %s AND job_id = %s
        """,
        (state.fleet_id, state.job_id),
    ).fetchone()
    if found is None or found[0] != generation or found[1] != owner:
        raise LeaseLost(f"job {state.job_id}: lease lost before save (generation {generation})")
    return Requests(cancel_requested_at=found[2], start_requested_at=found[3])


def release(
    conn: Conn,
    fleet_id: str,
    job_id: str,
    *,
    generation: int,
    owner: str,
    next_run_at: datetime | None,
    now: datetime,
) -> bool:
    """Give the lease back and schedule the next wake-up; False if the lease was lost.

    ``next_run_at`` None leaves a tracked job to the status poller (no timed wake-up).
    A request intake recorded while we held the lease wakes the job at once, whatever
    ``next_run_at`` the step asked for; an ended job sleeps for good.
    """
    cur = conn.execute(
        """
        UPDATE bw_jobs
        SET lease_owner = NULL, lease_until = NULL,
            next_run_at = CASE
                WHEN ended_at IS NOT NULL THEN NULL
                WHEN cancel_requested_at IS NOT NULL OR start_requested_at IS NOT NULL
                    THEN %(now)s
                ELSE %(next_run_at)s END
        WHERE fleet_id = %(fleet_id)s AND job_id = %(job_id)s
          AND generation = %(generation)s AND lease_owner = %(owner)s
        """,
        {
            "now": now,
            "next_run_at": next_run_at,
            "fleet_id": fleet_id,
            "job_id": job_id,
            "generation": generation,
            "owner": owner,
        },
    )
    return cur.rowcount == 1
