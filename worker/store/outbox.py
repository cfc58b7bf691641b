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

import base64
import json
import math
from collections.abc import Sequence
from contextlib import suppress
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson
import psycopg

from worker.wire.events import OutboxMessage

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

_TAG = "$amqp"


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no infinities (PostgreSQL refuses json.dumps' "Infinity"); AMQP has.
        return {_TAG: "float", "v": repr(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime):
        return {_TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, Decimal):
        return {_TAG: "decimal", "v": str(value)}
    if isinstance(value, dict):
        return {str(key): _encode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    raise TypeError(f"not an AMQP field value: {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag == "bytes":
        return base64.b64decode(value["v"])
    if tag == "datetime":
        return datetime.fromisoformat(value["v"])
    if tag == "decimal":
        return Decimal(value["v"])
    if tag == "float":
        return float(value["v"])
    return {key: _decode(item) for key, item in value.items()}


def encode_table(table: dict[str, Any]) -> str:
    """An AMQP table (properties or headers) as JSON text."""
    if not table:
        return "{}"  # most events carry no headers
    if all(type(value) in _PLAIN for value in table.values()):
        # An event's properties, on intake's hot path: orjson is several times faster.
        with suppress(orjson.JSONEncodeError):  # an integer beyond 64 bits
            return orjson.dumps(table).decode()
    return json.dumps(_encode(table), separators=(",", ":"))


_PLAIN = frozenset({str, int, bool, type(None)})


def decode_table(data: Any) -> dict[str, Any]:
    """The inverse of :func:`encode_table`; takes JSON text or an already parsed value."""
    parsed = json.loads(data) if isinstance(data, str | bytes) else data
    decoded = _decode(parsed)
    if not isinstance(decoded, dict):
        raise TypeError("an AMQP table must be an object")
    return decoded


def ensure_schema(conn: psycopg.Connection[Any]) -> None:
    conn.execute(SCHEMA)


def enqueue(conn: psycopg.Connection[Any], messages: Sequence[OutboxMessage]) -> None:
    """Store ``messages`` in the caller's transaction, in order, and wake the relays.

    NOTIFY is delivered at commit (and not at all on rollback), so a relay never wakes
    for rows it cannot see yet; PostgreSQL folds repeated notifications of a transaction.
    """
    if not messages:
        return
    # One statement for the lot (intake enqueues a batch's events at once), arrays in
    # binary so psycopg does not escape every body; ORDINALITY keeps ids in list order.
    conn.execute(
        "INSERT INTO bw_outbox (exchange, routing_key, body, properties, headers, mandatory)"
        " SELECT exchange, routing_key, body, properties::jsonb, headers::jsonb, mandatory"
        " FROM unnest(%b::text[], %b::text[], %b::bytea[], %b::text[], %b::text[], %b::bool[])"
        " WITH ORDINALITY AS m (exchange, routing_key, body, properties, headers, mandatory, n)"
        " ORDER BY n",
        (
            [m.exchange for m in messages],
            [m.routing_key for m in messages],
            [m.body for m in messages],
            [encode_table(m.properties) for m in messages],
            [encode_table(m.headers) for m in messages],
            [m.mandatory for m in messages],
        ),
    )
    conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")


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
