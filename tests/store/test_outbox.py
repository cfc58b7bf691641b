"""The outbox table on a real PostgreSQL: round trip, order, SKIP LOCKED, NOTIFY at commit."""

from __future__ import annotations

import math
from datetime import datetime
from decimal import Decimal

import psycopg
import pytest

from worker.store import outbox
from worker.wire.outgoing import OutboxMessage

pytestmark = pytest.mark.integration


def _message(n: int, **extra) -> OutboxMessage:
    return OutboxMessage(
        exchange="batch.events",
        routing_key=f"job.{n}",
        body=b"\x00\xff" + str(n).encode(),
        properties={"message_id": f"m-{n}", "timestamp": 1_700_000_000 + n, "delivery_mode": 2},
        **extra,
    )


@pytest.fixture
def conn(database_url: str):
    with psycopg.connect(database_url, autocommit=True) as connection:
        outbox.ensure_schema(connection)
        outbox.ensure_schema(connection)  # idempotent
        yield connection


def _assert_enqueued_then_claimed_in_order(conn: psycopg.Connection, sent: list) -> None:
    """What goes in comes back whole, in list order, with rising ids."""
    with conn.transaction():
        outbox.enqueue(conn, sent)
    with conn.transaction():
        claimed = outbox.claim(conn, len(sent) + 10)
    assert [message for _id, message in claimed] == sent
    ids = [row_id for row_id, _message in claimed]
    assert ids == sorted(ids)


def test_round_trip_keeps_amqp_values_and_id_order(conn: psycopg.Connection) -> None:
    headers = {
        "reason": "JOB_CONFLICT",
        "raw": b"\x00\x01\xfe",
        "when": datetime(2026, 11, 25, 21, 30),
        "amount": Decimal("1.25"),
        "nested": {"list": [1, "two", b"3"], "flag": True, "none": None},
    }
    sent = [_message(1, headers=headers, mandatory=True), _message(2), _message(3)]
    _assert_enqueued_then_claimed_in_order(conn, sent)


def test_claimed_rows_can_be_deleted_from_another_connection_at_once(
    conn: psycopg.Connection, database_url: str
) -> None:
    """The relay deletes a round's rows chunk by chunk on a second connection while the
    claim's transaction (holding the relay lock) is still open: the claim locks no rows."""
    with conn.transaction():
        outbox.enqueue(conn, [_message(n) for n in range(5)])
    with psycopg.connect(database_url) as other, conn.transaction():
        claimed = outbox.claim(conn, 3)
        assert [m.routing_key for _i, m in claimed] == ["job.0", "job.1", "job.2"]
        with other.transaction():
            # A row lock held by the claim would make this wait, then fail.
            other.execute("SET LOCAL lock_timeout = '2s'")
            outbox.delete(other, [row_id for row_id, _m in claimed[:2]])
        assert [m.routing_key for _i, m in outbox.claim(conn, 10)] == ["job.2", "job.3", "job.4"]


def test_a_large_enqueue_keeps_every_value_and_the_order(conn: psycopg.Connection) -> None:
    sent = [
        _message(
            n, headers={"n": n, "raw": bytes([n % 256])} if n % 3 else {}, mandatory=n % 2 == 0
        )
        for n in range(300)
    ]
    _assert_enqueued_then_claimed_in_order(conn, sent)


def test_delete_and_pending_count(conn: psycopg.Connection) -> None:
    with conn.transaction():
        outbox.enqueue(conn, [_message(n) for n in range(4)])
        outbox.enqueue(conn, [])
    assert outbox.pending_count(conn) == 4
    with conn.transaction():
        ids = [row_id for row_id, _m in outbox.claim(conn, 3)]
        outbox.delete(conn, ids[:2])
        outbox.delete(conn, [])
    assert outbox.pending_count(conn) == 2


def test_notify_is_sent_at_commit_only(conn: psycopg.Connection, database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {outbox.NOTIFY_CHANNEL}")
        with pytest.raises(RuntimeError), conn.transaction():
            outbox.enqueue(conn, [_message(1)])
            raise RuntimeError("roll back")
        assert list(listener.notifies(timeout=0.2)) == []
        with conn.transaction():
            outbox.enqueue(conn, [_message(2)])
            outbox.enqueue(conn, [_message(3)])
        got = list(listener.notifies(timeout=5, stop_after=1))
        assert [n.channel for n in got] == [outbox.NOTIFY_CHANNEL]


def test_infinities_and_nan_in_headers_survive_the_outbox(conn: psycopg.Connection) -> None:
    headers = {"up": float("inf"), "down": [float("-inf")], "odd": float("nan")}
    with conn.transaction():  # PostgreSQL took json's "Infinity" for no JSON at all
        outbox.enqueue(conn, [_message(1, headers=headers)])
    with conn.transaction():
        ((_, back),) = outbox.claim(conn, 10)
    assert back.headers["up"] == float("inf") and back.headers["down"] == [float("-inf")]
    assert math.isnan(back.headers["odd"])
