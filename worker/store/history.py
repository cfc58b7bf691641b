"""Every event a job produced, kept for ``EVENT_HISTORY_DAYS`` so a reader can see its story.

The outbox forgets a message once the broker confirmed it; this table keeps each event's
CloudEvent body. ``record`` is called by ``outbox.enqueue`` in the same transaction as the
outbox rows, so the history holds an event exactly when the outbox did: never one for
state that was not saved, never missing one that was. Only events go in (CloudEvents bound
for the events exchange), once each: a ``reply_to`` copy is the same event, a dead letter
is the producer's message, not ours.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg

from worker.wire.events import CONTENT_TYPE
from worker.wire.outgoing import OutboxMessage

SCHEMA = """
CREATE TABLE IF NOT EXISTS bw_event_history (
    fleet_id    text        NOT NULL,
    job_id      text        NOT NULL,
    event_id    text        NOT NULL,
    type        text        NOT NULL,
    sequence    bigint,
    time        timestamptz NOT NULL,
    body        jsonb       NOT NULL,
    PRIMARY KEY (fleet_id, event_id)
);
CREATE INDEX IF NOT EXISTS bw_event_history_job ON bw_event_history (fleet_id, job_id, time);
CREATE INDEX IF NOT EXISTS bw_event_history_time ON bw_event_history (time);
"""

# The fleet is the event's ``source`` (``/batch-worker/<fleet>``), the job its ``subject``;
# a command event without a job (a request too broken to name one) has no story to join.
_INSERT = "INSERT INTO bw_event_history (fleet_id, job_id, event_id, type, sequence, time, body)"
_COLUMNS = """
    SELECT regexp_replace(e->>'source', '^/batch-worker/', ''), e->>'subject', e->>'id',
           e->>'type', (e->'data'->>'sequence')::bigint, (e->>'time')::timestamptz, e
"""
# A caller may add to the WHERE before ``ON_CONFLICT``.
RECORD_ROWS = f"""
    {_INSERT} {_COLUMNS}
    FROM (SELECT b::jsonb AS e FROM unnest(%(history)b::text[]) AS u (b)) AS events
    WHERE e->>'subject' IS NOT NULL
"""
ON_CONFLICT = " ON CONFLICT (fleet_id, event_id) DO NOTHING"


def record_queued(source: str) -> str:
    """The statement keeping the events among the outbox rows ``source`` (a WITH query's
    ``RETURNING exchange, body, properties`` of its insert into ``bw_outbox``): with the
    outbox insert in one statement, as the engine's save is (worker/store/leases.py), each
    event's body travels to the server once and is kept exactly when its row went in."""
    return f"""
    {_INSERT} {_COLUMNS}
    FROM (SELECT convert_from(body, 'UTF8')::jsonb AS e FROM {source}
          WHERE exchange <> '' AND properties->>'content_type' = '{CONTENT_TYPE}') AS events
    WHERE e->>'subject' IS NOT NULL {ON_CONFLICT}
"""


def is_event(message: OutboxMessage) -> bool:
    return bool(message.exchange) and message.properties.get("content_type") == CONTENT_TYPE


def record(conn: psycopg.Connection[Any], messages: Sequence[OutboxMessage]) -> None:
    """Keep the events among ``messages`` (in the caller's transaction); a re-published
    event (same id) is kept once."""
    parameters = record_parameters(messages)
    if parameters["history"]:
        conn.execute(RECORD_ROWS + ON_CONFLICT, parameters)


def record_parameters(messages: Sequence[OutboxMessage]) -> dict[str, list[str]]:
    """The parameters of ``RECORD_ROWS`` for the events among ``messages``."""
    return {"history": [m.body.decode("utf-8") for m in messages if is_event(m)]}


def job_events(
    conn: psycopg.Connection[Any], fleet_id: str, job_id: str, *, limit: int = 10_000
) -> list[dict[str, Any]]:
    """The job's events, oldest first."""
    rows = conn.execute(
        "SELECT body FROM bw_event_history WHERE fleet_id = %s AND job_id = %s"
        " ORDER BY time, sequence NULLS FIRST, event_id LIMIT %s",
        (fleet_id, job_id, limit),
    ).fetchall()
    return [row[0] for row in rows]


def prune_older(conn: psycopg.Connection[Any], *, days: float) -> int:
    """Forget events older than ``days`` by the database's clock; returns how many."""
    cursor = conn.execute(
        "DELETE FROM bw_event_history WHERE time < now() - make_interval(secs => %s)",
        (days * 86_400,),
    )
    return cursor.rowcount


def prune(conn: psycopg.Connection[Any], *, before: datetime) -> int:
    """Forget events older than ``before``; returns how many."""
    cursor = conn.execute("DELETE FROM bw_event_history WHERE time < %s", (before,))
    return cursor.rowcount
