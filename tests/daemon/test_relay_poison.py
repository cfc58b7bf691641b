"""A row the broker refuses never holds back the outbox: it is retried a bounded number of
times, then parked, and every other row goes on. Real PostgreSQL and RabbitMQ (the shared
broker refuses a ``user_id`` that is not the login, as any RabbitMQ does)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pika
import pytest
from psycopg_pool import ConnectionPool

from worker.daemon import relay
from worker.daemon.health import Health
from worker.settings import Settings
from worker.store import outbox
from worker.wire.outgoing import OutboxMessage

pytestmark = pytest.mark.integration

WAIT = 120.0  # generous: a loaded 2-core machine


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(database_url, min_size=1, max_size=4, open=True) as p:
        with p.connection() as conn:
            outbox.ensure_schema(conn)
        yield p


@pytest.fixture
def settings(broker_url: str, database_url: str, amqp_names) -> Settings:
    return Settings(
        **amqp_names.settings(),
        broker_url=broker_url,
        database_url=database_url,
        outbox_max_attempts=2,
    )


@pytest.fixture
def reader(
    broker_url: str,
) -> Iterator[tuple[pika.adapters.blocking_connection.BlockingChannel, str]]:
    url = broker_url[:-2] + "/%2F" if broker_url.endswith("//") else broker_url
    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    yield channel, queue
    conn.close()


def _message(queue: str, n: int, **properties: object) -> OutboxMessage:
    return OutboxMessage(
        exchange="",
        routing_key=queue,
        body=f"event-{n}".encode(),
        properties={"message_id": f"id-{n}", "type": "batchworker.job.status", **properties},
        headers={},
    )


def _enqueue(pool: ConnectionPool, messages: list[OutboxMessage]) -> None:
    with pool.connection() as conn, conn.transaction():
        outbox.enqueue(conn, messages)


def _wait_for(what: str, condition: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _running(worker: relay.Relay) -> threading.Thread:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    return thread


def _stop(worker: relay.Relay, thread: threading.Thread) -> None:
    worker.request_stop()
    thread.join(60)
    assert not thread.is_alive()


def _counts(pool: ConnectionPool) -> tuple[int, int]:
    with pool.connection() as conn:
        return outbox.pending_count(conn), outbox.parked_count(conn)


@pytest.mark.parametrize(
    "poison",
    [
        # The broker checks user_id against the connection's login: PRECONDITION_FAILED.
        {"properties": {"user_id": "mallory"}},
        # A direct reply-to name that decodes to no process: 541, the connection closed.
        {"routing_key": "amq.rabbitmq.reply-to.g2gCZAAsc2FzZEBsb2NhbGhvc3Q=.xx"},
    ],
    ids=["user_id", "reply_to"],
)
def test_a_row_the_broker_refuses_is_parked_and_the_rest_go_on(
    settings, pool, reader, poison
) -> None:
    channel, queue = reader
    bad = _message(queue, 99, **poison.get("properties", {}))
    if "routing_key" in poison:
        bad = OutboxMessage(bad.exchange, poison["routing_key"], bad.body, bad.properties)
    sent = (
        [_message(queue, n) for n in range(5)] + [bad] + [_message(queue, n) for n in range(5, 10)]
    )
    _enqueue(pool, sent)
    parked: list[tuple[int, str]] = []
    worker = relay.Relay(
        settings, pool, on_parked=lambda row_id, reason: parked.append((row_id, reason))
    )
    waits = worker._stop = _Waits()
    thread = _running(worker)
    got: list[bytes] = []

    def drained() -> bool:
        while (message := channel.basic_get(queue, auto_ack=True))[0] is not None:
            got.append(message[2])
        return len(set(got)) >= 10 and _counts(pool) == (0, 1)

    try:
        _wait_for("the good rows published and the poison parked", drained)
    finally:
        _stop(worker, thread)
    # In order; a row in flight when the channel closed may come twice (at-least-once:
    # the broker may not have confirmed it), never out of order.
    assert list(dict.fromkeys(got)) == [m.body for m in sent if m is not bad]
    assert len(parked) == 1
    with pool.connection() as conn:
        (row,) = outbox.parked(conn)
    assert (row.id, row.attempts) == (parked[0][0], 2)
    assert row.message_id == "id-99"
    assert row.last_error and ("PRECONDITION_FAILED" in row.last_error or "541" in row.last_error)
    # A refusal counted on its row is tried again at once, not after a growing back-off
    # (which held the rows behind a poison for a minute or more, tests/e2e/test_hostile.py).
    assert waits.timeouts and set(waits.timeouts) == {relay.BACKOFF_FIRST}, waits.timeouts


class _Waits(threading.Event):
    """The relay's stop event, noting each back-off it waits (not the polls' sleeps)."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is not None:
            self.timeouts.append(timeout)
        return super().wait(timeout)


def test_replay_puts_a_parked_row_back_and_drop_deletes_it(settings, pool, reader) -> None:
    channel, queue = reader
    _enqueue(pool, [_message(queue, 1), _message(queue, 2)])
    with pool.connection() as conn, conn.transaction():
        first, second = (row_id for row_id, _ in outbox.claim(conn, 10))
        assert not outbox.record_refusal(conn, first, "nacked", 2)
        assert outbox.record_refusal(conn, first, "nacked", 2)  # the second refusal parks
        assert outbox.record_refusal(conn, second, "nacked", 1)
    assert _counts(pool) == (0, 2)
    worker = relay.Relay(settings, pool)
    try:
        assert worker.relay_once() == 0  # parked rows are not published
        with pool.connection() as conn:
            assert outbox.replay(conn, first)
            assert not outbox.replay(conn, first)  # no longer parked
            assert outbox.drop(conn, second)
            assert not outbox.drop(conn, first)  # only parked rows are dropped
            conn.commit()
        assert worker.relay_once() == 1
    finally:
        worker.close()
    assert channel.basic_get(queue, auto_ack=True)[2] == b"event-1"
    assert channel.basic_get(queue, auto_ack=True)[0] is None
    assert _counts(pool) == (0, 0)


def test_a_relay_that_moves_no_row_is_not_live(settings, pool, reader) -> None:
    """Going round is not progress: a relay refused on every try of a row it may retry
    many times yet beats its loop, but not the outbox's progress."""
    channel, queue = reader
    patient = settings.model_copy(update={"outbox_max_attempts": 1000})
    _enqueue(pool, [_message(queue, 1, user_id="mallory"), _message(queue, 2)])
    health = Health()
    health.register("relay", 600.0)
    health.register("relay-outbox", 1.0)
    worker = relay.Relay(
        patient,
        pool,
        on_progress=lambda: health.beat("relay"),
        on_outbox_progress=lambda: health.beat("relay-outbox"),
    )
    thread = _running(worker)

    def refused_twice() -> bool:
        with pool.connection() as conn:
            row = conn.execute("SELECT max(attempts) FROM bw_outbox").fetchone()
        return bool(row and row[0] and row[0] >= 2)

    try:
        _wait_for("two refusals", refused_twice)
        _wait_for("the outbox stall", lambda: "relay-outbox" in {n for n, _, _ in health.stalled()})
        alive, why = health.liveness()
        assert not alive and "relay-outbox" in why
        assert "relay" not in {name for name, _, _ in health.stalled()}
    finally:
        _stop(worker, thread)
    assert channel.basic_get(queue, auto_ack=True)[0] is None  # nothing overtook the row
