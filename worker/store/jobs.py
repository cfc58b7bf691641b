"""Job rows in PostgreSQL: durable lifecycle state, and the requests intake leaves.

Every function takes a connection and runs inside the caller's transaction, so intake can
take a whole batch of messages in one commit and the engine can save a step together with
its outbox rows. Times are passed in (``now``) rather than read from the database clock so
the lifecycle, leases and wake-ups all reason with one clock. The leases the engine holds
on these rows: worker/store/leases.py.

The state is stored as JSON and only ever read back whole: what queries select or filter
on is written next to it in columns of its own, derived from the state in Python at every
insert and save (``columns``), the status poller's from ``lifecycle.poll_view``.

Longer than most modules on purpose: every statement on ``bw_jobs`` but the leases' is
here, beside the schema and the derived columns they write and read; apart, a column could
be added to the schema and not to an insert, or the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg.rows import dict_row

from worker.lifecycle import JobState, Phase, poll_view, total_cost
from worker.store import capacity
from worker.wire.outgoing import OutboxMessage, message_from_json

SCHEMA = """
CREATE TABLE IF NOT EXISTS bw_jobs (
    fleet_id            text        NOT NULL,
    job_id              text        NOT NULL,
    state               jsonb       NOT NULL,
    phase               text        NOT NULL,
    status              text,
    batch_request_id    text,
    upstream_created    timestamptz,
    request_hash        text        NOT NULL,
    next_run_at         timestamptz,
    lease_owner         text,
    lease_until         timestamptz,
    generation          bigint      NOT NULL DEFAULT 0,
    cancel_requested_at timestamptz,
    start_requested_at  timestamptz,
    last_status_event   jsonb,
    last_seen_at        timestamptz,
    accepted_at         timestamptz NOT NULL,
    ended_at            timestamptz,
    PRIMARY KEY (fleet_id, job_id)
);
CREATE INDEX IF NOT EXISTS bw_jobs_due
    ON bw_jobs (fleet_id, next_run_at) WHERE next_run_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS bw_jobs_active
    ON bw_jobs (fleet_id, upstream_created) WHERE ended_at IS NULL;
"""

# The columns that came after the first release, and their types: the status poller's
# (``lifecycle.PollView``, whose field names they carry), and the cost cap (for the cost
# gauge). Added to tables made before them by ``upgrade``, which also makes new ones.
DERIVED: dict[str, str] = {
    "read_status": "text",
    "completion": "float8",
    "cost_pu": "float8",
    "resting": "boolean",
    "create_doubtful": "boolean",
    "intent_at": "timestamptz",
    "attempt": "integer",
    "max_cost_pu": "float8",
    # What every request of the job has cost (``cost_pu`` is the current request's, compared
    # with each read): the cap's share and the status API's sums.
    "job_cost_pu": "float8",
    # The tile counts, for the status API's fleet overview (worker/store/listing.py).
    "tiles_total": "bigint",
    "tiles_processed": "bigint",
    "tiles_failed": "bigint",
}
_ADD_DERIVED = ", ".join(
    f"ADD COLUMN IF NOT EXISTS {name} {kind}" for name, kind in DERIVED.items()
)
_FORGET_DERIVED = " ".join(f"NEW.{name} := NULL;" for name in DERIVED)
# ``derived_rev`` rises with every write of the columns above. An older worker (a rollout
# runs old and new pods side by side) saves the state without them; the trigger then sees
# the state written and ``derived_rev`` unchanged, and sets them to NULL: unknown until
# this version saves the job again, which the queries below take as "read it, sweep for
# it" rather than trusting what an older state said.
_UPGRADE = f"""
ALTER TABLE bw_jobs
    {_ADD_DERIVED},
    ADD COLUMN IF NOT EXISTS derived_rev bigint;
UPDATE bw_jobs SET
    read_status = COALESCE(state->>'upstream_status', status),
    completion = COALESCE((state->>'completion')::float8, 0),
    cost_pu = (state->>'cost_pu')::float8,
    resting = COALESCE(
        COALESCE(state->>'upstream_status', status) = 'ANALYSIS_DONE'
        AND NOT COALESCE((state->>'start_wanted')::boolean, true)
        AND NOT COALESCE((state->>'cancel_wanted')::boolean, false), false),
    create_doubtful = COALESCE((state->>'create_doubtful')::boolean, false),
    intent_at = (state->>'intent_at')::timestamptz,
    attempt = COALESCE((state->'retry'->>'attempt')::integer, 0),
    max_cost_pu = (state->>'max_cost_pu')::float8,
    job_cost_pu = CASE
        WHEN jsonb_array_length(COALESCE(state->'retry'->'past', '[]')) = 0
        THEN (state->>'cost_pu')::float8
        ELSE COALESCE((state->>'cost_pu')::float8, 0) + (
            SELECT sum((past->>'cost_pu')::float8)
            FROM jsonb_array_elements(state->'retry'->'past') AS past)
    END,
    tiles_total = (state->'tiles'->>'total')::bigint,
    tiles_processed = (state->'tiles'->>'processed')::bigint,
    tiles_failed = (state->'tiles'->>'failed')::bigint,
    derived_rev = 1;
CREATE OR REPLACE FUNCTION bw_jobs_derived_unknown() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    {_FORGET_DERIVED}
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS bw_jobs_derived_unknown ON bw_jobs;
CREATE TRIGGER bw_jobs_derived_unknown BEFORE UPDATE OF state ON bw_jobs
    FOR EACH ROW WHEN (NEW.derived_rev IS NOT DISTINCT FROM OLD.derived_rev)
    EXECUTE FUNCTION bw_jobs_derived_unknown();
CREATE INDEX IF NOT EXISTS bw_jobs_doubtful_ended
    ON bw_jobs (fleet_id, ended_at)
    WHERE ended_at IS NOT NULL AND create_doubtful IS NOT false;
"""


# Who owns a job, and whether it adopted its batch request or created it: written once, at
# insert (a job's tenant and origin never change). Intake refuses a job of another tenant
# and, by default, the adoption of a request no job of the fleet created (admission.py).
_UPGRADE_TENANCY = """
ALTER TABLE bw_jobs
    ADD COLUMN IF NOT EXISTS tenant text,
    ADD COLUMN IF NOT EXISTS adopted boolean;
UPDATE bw_jobs SET adopted = (state->>'adopt_id') IS NOT NULL WHERE adopted IS NULL;
CREATE INDEX IF NOT EXISTS bw_jobs_batch_request
    ON bw_jobs (fleet_id, batch_request_id) WHERE batch_request_id IS NOT NULL;
-- Credentials only a create needs, kept by versions before this one in every job past it
-- (lifecycle.forget_credentials: this version drops them at the step that leaves
-- PENDING_CREATE). derived_rev rises, so the trigger leaves the derived columns alone.
UPDATE bw_jobs SET
    state = jsonb_set(state, '{request}',
        state->'request'
        #- '{output,delivery,s3,accessKey}' #- '{output,delivery,s3,secretAccessKey}'
        #- '{output,delivery,gs,credentials}'
        #- '{input,features,s3,accessKey}' #- '{input,features,s3,secretAccessKey}'
        #- '{input,features,gs,credentials}'),
    derived_rev = derived_rev + 1
WHERE phase <> 'PENDING_CREATE' AND jsonb_typeof(state->'request') = 'object';
"""


def _upgrade_tenancy(conn: psycopg.Connection[Any]) -> None:
    row = conn.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'bw_jobs'::regclass"
        " AND attname IN ('tenant', 'adopted') AND NOT attisdropped"
    ).fetchone()
    if row is None or row[0] < 2:
        conn.execute(_UPGRADE_TENANCY)


def upgrade(conn: psycopg.Connection[Any]) -> None:
    """Bring the table up to this version: the derived columns, once, filled in from the
    states already stored (the one read of the state's JSON in SQL, of the fields as they
    were named when the columns came). In the caller's transaction, under db.apply_schema's
    lock: the whole upgrade commits at once or not at all."""
    # What older versions filter ended jobs by (the state's JSON); one may have made it
    # again at its start during a rollout.
    conn.execute("DROP INDEX IF EXISTS bw_jobs_ended_doubtful")
    row = conn.execute(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'bw_jobs'::regclass"
        " AND attname = ANY(%s) AND NOT attisdropped",
        ([*DERIVED, "derived_rev"],),
    ).fetchone()
    if row is None or row[0] != len(DERIVED) + 1:
        conn.execute(_UPGRADE)
    _upgrade_tenancy(conn)


Conn = psycopg.Connection[Any]
JOBS_KEY = "bw_jobs_pkey"  # the primary key's constraint name, as PostgreSQL names it


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


def columns(state: JobState) -> dict[str, Any]:
    """The queried columns, always derived from the state they sit next to.

    ``state`` is the JSON text pydantic writes, cast to jsonb by the statement: parsing it
    into Python only for psycopg to dump it again would be work done twice per save.
    """
    return {
        "state": state.model_dump_json(),
        "phase": state.phase.value,
        "status": state.status,
        "batch_request_id": state.batch_request_id,
        "upstream_created": state.upstream_created,
        "ended_at": state.ended_at,
        "last_seen_at": state.last_seen_at,
        **poll_view(state)._asdict(),
        "max_cost_pu": state.max_cost_pu,
        "job_cost_pu": total_cost(state),
        # Written at insert only (``_INSERT_MANY``); a save passes them unused.
        "tenant": state.tenant,
        "adopted": state.adopt_id is not None,
        **tile_columns(state),
    }


def tile_columns(state: JobState) -> dict[str, int | None]:
    tiles = state.tiles
    return {
        "tiles_total": tiles.total if tiles else None,
        "tiles_processed": tiles.processed if tiles else None,
        "tiles_failed": tiles.failed if tiles else None,
    }


# The derived columns set from ``columns`` by a save (worker/store/leases.py).
DERIVED_SET = ", ".join(
    [*(f"{name} = %({name})s" for name in DERIVED), "derived_rev = COALESCE(derived_rev, 0) + 1"]
)
_DERIVED_NAMES = ", ".join(DERIVED)
_DERIVED_VALUES = ", ".join(f"%({name})s" for name in DERIVED)
_DERIVED_ARRAYS = ", ".join(f"%({name})b::{kind}[]" for name, kind in DERIVED.items())


# ------------------------------------------------------------------------------------------
# Intake side
# ------------------------------------------------------------------------------------------


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


@dataclass(frozen=True, slots=True)
class JobRow:
    """A new job's row with its state already in JSON text: intake builds it ahead of the
    transaction that inserts it (``job_row``), off the database's critical path."""

    fleet_id: str
    job_id: str
    request_hash: str
    accepted_at: datetime
    columns: dict[str, Any]


def job_row(state: JobState) -> JobRow:
    return JobRow(
        state.fleet_id, state.job_id, state.request_hash, state.accepted_at, columns(state)
    )


_INSERT_MANY = f"""
    INSERT INTO bw_jobs (fleet_id, job_id, state, phase, status, batch_request_id,
                         upstream_created, request_hash, next_run_at, accepted_at,
                         ended_at, last_seen_at, tenant, adopted, {_DERIVED_NAMES},
                         derived_rev)
    SELECT fleet_id, job_id, state::jsonb, phase, status, batch_request_id,
           upstream_created, request_hash, %(next_run_at)s, accepted_at, ended_at,
           last_seen_at, tenant, adopted, {_DERIVED_NAMES}, 1
    FROM unnest(%(fleet_id)b::text[], %(job_id)b::text[], %(state)b::text[],
                %(phase)b::text[], %(status)b::text[], %(batch_request_id)b::text[],
                %(upstream_created)b::timestamptz[], %(request_hash)b::text[],
                %(accepted_at)b::timestamptz[], %(ended_at)b::timestamptz[],
                %(last_seen_at)b::timestamptz[], %(tenant)b::text[], %(adopted)b::boolean[],
                {_DERIVED_ARRAYS})
        AS new (fleet_id, job_id, state, phase, status, batch_request_id,
                upstream_created, request_hash, accepted_at, ended_at, last_seen_at,
                tenant, adopted, {_DERIVED_NAMES})
"""


def insert_jobs(conn: Conn, rows: Sequence[JobRow], *, next_run_at: datetime) -> set[str]:
    """Insert new jobs in one statement; returns the ids inserted (a job id another
    transaction inserted meanwhile is left out)."""
    return start_insert_jobs(conn, rows, next_run_at=next_run_at)()


def start_insert_jobs(
    conn: Conn, rows: Sequence[JobRow], *, next_run_at: datetime, or_fail: bool = False
) -> Callable[[], set[str]]:
    """``insert_jobs`` sent; call the result for the ids inserted (pipeline mode: later).

    With ``or_fail``, a job id that exists already fails the statement (``UniqueViolation``
    on ``JOBS_KEY``) instead of being left out: the transaction cannot then commit, which a
    caller that sends its COMMIT before reading the answer relies on.

    One multi-row INSERT over arrays rather than one INSERT per job: PostgreSQL plans and
    runs it once, and the state goes in as the JSON text pydantic writes (cast to jsonb by
    the server) instead of being parsed and dumped again in Python. The arrays travel in
    binary: psycopg escapes every element of a text-format array with a regex, which for
    kilobytes of JSON per job cost more than all the rest.
    """
    if not rows:
        return set
    cursor = conn.execute(
        _INSERT_MANY
        + ("" if or_fail else "ON CONFLICT (fleet_id, job_id) DO NOTHING")
        + """
        RETURNING job_id
        """,
        {
            "next_run_at": next_run_at,
            "fleet_id": [row.fleet_id for row in rows],
            "job_id": [row.job_id for row in rows],
            "request_hash": [row.request_hash for row in rows],
            "accepted_at": [row.accepted_at for row in rows],
            # The derived columns exactly as every other write derives them.
            **{name: [row.columns[name] for row in rows] for name in rows[0].columns},
        },
    )
    return lambda: {row[0] for row in cursor.fetchall()}


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


# ------------------------------------------------------------------------------------------
# The status poller's side
# ------------------------------------------------------------------------------------------


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
