"""The transactional outbox: AMQP publishes stored in PostgreSQL until the broker confirms them.

Whoever changes job state calls :func:`enqueue` inside the same transaction, so a message
exists exactly when the state that produced it was committed. The relay (``worker.daemon.relay``)
claims rows in id order under its lock, publishes them with confirms, and deletes them in
chunks as the confirms arrive.

A row the broker refuses (it closes the channel on it, or nacks it) is retried a bounded
number of times (``OUTBOX_MAX_ATTEMPTS``), then *parked*: kept here with the broker's reason
and skipped by the relay, so one poison row never holds back the rows behind it. Operators
list, replay or drop parked rows (``batch-worker outbox``, docs/operations.md).

Properties and headers are AMQP field values, which JSON cannot all hold (byte strings,
timestamps, decimals); they are stored as JSON with those few types tagged, and come back
as the same Python values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from worker.store import history
from worker.wire.outgoing import OutboxMessage, decode_table, encode_table

NOTIFY_CHANNEL = "bw_outbox"

SCHEMA = """
CREATE TABLE IF NOT EXISTS bw_outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    exchange    text        NOT NULL,
    routing_key text        NOT NULL,
    body        bytea       NOT NULL,
    properties  jsonb       NOT NULL DEFAULT '{}',
    headers     jsonb       NOT NULL DEFAULT '{}',
    mandatory   boolean     NOT NULL DEFAULT false,
    enqueued_at timestamptz NOT NULL DEFAULT now()
)
"""

# Added after the first release: brought in by ``upgrade`` on tables that predate them.
PARKING_COLUMNS = {
    "attempts": "integer NOT NULL DEFAULT 0",
    "last_error": "text",
    "parked_at": "timestamptz",
}
# Parked rows are few and read by id; the relay's claim reads the unparked ones in id order.
_INDEX = "CREATE INDEX IF NOT EXISTS bw_outbox_unparked ON bw_outbox (id) WHERE parked_at IS NULL"
# The broker's reason is kept, bounded: it may quote the row's property values.
ERROR_LIMIT = 500


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    conn.execute(SCHEMA)
    upgrade(conn)


def upgrade(conn: psycopg.Connection[Any]) -> None:
    """Add the parking columns where missing (checked first: ALTER locks the table)."""
    present = {
        row[0]
        for row in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'bw_outbox'::regclass"
            " AND NOT attisdropped"
        ).fetchall()
    }
    missing = [
        f"ADD COLUMN IF NOT EXISTS {name} {kind}"
        for name, kind in PARKING_COLUMNS.items()
        if name not in present
    ]
    if missing:
        conn.execute("ALTER TABLE bw_outbox " + ", ".join(missing))
    conn.execute(_INDEX)


def enqueue(conn: psycopg.Connection[Any], messages: Sequence[OutboxMessage]) -> None:
    """Store ``messages`` in the caller's transaction, in order, and wake the relays.

    NOTIFY is delivered at commit (and not at all on rollback), so a relay never wakes
    for rows it cannot see yet; PostgreSQL folds repeated notifications of a transaction.
    """
    if not messages:
        return
    conn.execute(f"{INSERT_ROWS} ORDER BY n", rows_parameters(messages))
    # The events' history, in this transaction: it holds an event exactly when the outbox did.
    history.record(conn, messages)
    conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")


# One statement for the lot (intake enqueues a batch's events at once), arrays in binary so
# psycopg does not escape every body; ORDINALITY keeps ids in list order. A caller may add a
# WHERE before the ORDER BY (the engine's save inserts only when its fenced update applied).
INSERT_ROWS = (
    "INSERT INTO bw_outbox (exchange, routing_key, body, properties, headers, mandatory)"
    " SELECT exchange, routing_key, body, properties::jsonb, headers::jsonb, mandatory"
    " FROM unnest(%(exchanges)b::text[], %(routing_keys)b::text[], %(bodies)b::bytea[],"
    " %(properties)b::text[], %(headers)b::text[], %(mandatory)b::bool[])"
    " WITH ORDINALITY AS m (exchange, routing_key, body, properties, headers, mandatory, n)"
)


def rows_parameters(messages: Sequence[OutboxMessage]) -> dict[str, list[Any]]:
    """The parameters of ``INSERT_ROWS`` for ``messages``."""
    return {
        "exchanges": [m.exchange for m in messages],
        "routing_keys": [m.routing_key for m in messages],
        "bodies": [m.body for m in messages],
        "properties": [encode_table(m.properties) for m in messages],
        "headers": [encode_table(m.headers) for m in messages],
        "mandatory": [m.mandatory for m in messages],
    }


def claim(conn: psycopg.Connection[Any], limit: int) -> list[tuple[int, OutboxMessage]]:
    """Up to ``limit`` of the oldest rows, in id order.

    No row locks: the caller holds the relay lock (one claimer fleet-wide), and deletes the
    rows in chunks from another connection while the lock's transaction is still open, so
    row locks held here would block those deletes.
    """
    rows = conn.execute(
        "SELECT id, exchange, routing_key, body, properties, headers, mandatory"
        " FROM bw_outbox WHERE parked_at IS NULL ORDER BY id LIMIT %s",
        (limit,),
    ).fetchall()
    return [
        (
            row[0],
            OutboxMessage(
                exchange=row[1],
                routing_key=row[2],
                body=bytes(row[3]),
                properties=decode_table(row[4]),
                headers=decode_table(row[5]),
                mandatory=row[6],
            ),
        )
        for row in rows
    ]


def delete(conn: psycopg.Connection[Any], ids: Sequence[int]) -> None:
    if ids:
        conn.execute("DELETE FROM bw_outbox WHERE id = ANY(%s)", (list(ids),))


def pending_count(conn: psycopg.Connection[Any]) -> int:
    """Rows waiting to be published (parked ones aside)."""
    row = conn.execute("SELECT count(*) FROM bw_outbox WHERE parked_at IS NULL").fetchone()
    return int(row[0]) if row else 0


def parked_count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM bw_outbox WHERE parked_at IS NOT NULL").fetchone()
    return int(row[0]) if row else 0


def record_refusal(
    conn: psycopg.Connection[Any], row_id: int, reason: str, max_attempts: int
) -> bool:
    """Count one refusal of row ``row_id`` by the broker; park it once it has been refused
    ``max_attempts`` times. Whether it is parked now (False too when the row is gone)."""
    row = conn.execute(
        "UPDATE bw_outbox SET attempts = attempts + 1, last_error = %s,"
        " parked_at = CASE WHEN attempts + 1 >= %s THEN now() END"
        " WHERE id = %s AND parked_at IS NULL RETURNING parked_at IS NOT NULL",
        (reason[:ERROR_LIMIT], max_attempts, row_id),
    ).fetchone()
    return bool(row and row[0])


@dataclass(frozen=True)
class ParkedRow:
    id: int
    exchange: str
    routing_key: str
    attempts: int
    last_error: str | None
    enqueued_at: datetime
    parked_at: datetime
    message_id: str | None
    type: str | None


def parked(conn: psycopg.Connection[Any], limit: int = 1000) -> list[ParkedRow]:
    """The parked rows, oldest first (what ``batch-worker outbox parked`` lists)."""
    rows = conn.execute(
        "SELECT id, exchange, routing_key, attempts, last_error, enqueued_at, parked_at,"
        " properties->>'message_id', properties->>'type'"
        " FROM bw_outbox WHERE parked_at IS NOT NULL ORDER BY id LIMIT %s",
        (limit,),
    ).fetchall()
    return [ParkedRow(*row) for row in rows]


def replay(conn: psycopg.Connection[Any], row_id: int) -> bool:
    """Put parked row ``row_id`` back in line with its attempts at 0; whether it was parked.

    It keeps its id, so it goes out ahead of every row enqueued after it.
    """
    row = conn.execute(
        "UPDATE bw_outbox SET parked_at = NULL, attempts = 0"
        " WHERE id = %s AND parked_at IS NOT NULL RETURNING id",
        (row_id,),
    ).fetchone()
    if row is not None:
        conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
    return row is not None


def drop(conn: psycopg.Connection[Any], row_id: int) -> bool:
    """Delete parked row ``row_id`` for good; whether it was parked. Unparked rows are the
    relay's and are never dropped here."""
    row = conn.execute(
        "DELETE FROM bw_outbox WHERE id = %s AND parked_at IS NOT NULL RETURNING id", (row_id,)
    ).fetchone()
    return row is not None
