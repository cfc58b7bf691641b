"""The transactional outbox: AMQP publishes stored in PostgreSQL until the broker confirms them.

Whoever changes job state calls :func:`enqueue` inside the same transaction, so a message
exists exactly when the state that produced it was committed. The relay (``worker.daemon.relay``)
claims rows in id order under its lock, publishes them with confirms, and deletes them in
chunks as the confirms arrive.

Properties and headers are AMQP field values, which JSON cannot all hold (byte strings,
timestamps, decimals); they are stored as JSON with those few types tagged, and come back
as the same Python values.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    conn.execute(SCHEMA)


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
        " FROM bw_outbox ORDER BY id LIMIT %s",
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
    row = conn.execute("SELECT count(*) FROM bw_outbox").fetchone()
    return int(row[0]) if row else 0
