"""The ``bw_jobs`` table: its schema and upgrades, the columns derived from a state at every
insert and save (``columns``), and the insert, which lists every column.

Kept together so a column added to the schema is added to the insert and the derived
columns in the same file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from worker.lifecycle import JobState, poll_view, total_cost

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
