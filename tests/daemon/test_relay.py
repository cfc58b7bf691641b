"""The relay against real PostgreSQL and RabbitMQ; what it published is read back with pika."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest
from psycopg_pool import ConnectionPool
from pydantic import SecretStr

from worker.daemon import relay
from worker.settings import Settings
from worker.store import outbox
from worker.wire.outgoing import OutboxMessage

pytestmark = [pytest.mark.integration, pytest.mark.broker]


def pika_params(broker_url: str) -> pika.URLParameters:
    """pika reads the ``//`` of kombu-style URLs as an empty vhost name; it means ``/``."""
    return pika.URLParameters(broker_url[:-1] if broker_url.endswith("//") else broker_url)


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    with ConnectionPool(database_url, min_size=1, max_size=4, open=True) as p:
        with p.connection() as conn:
            outbox.ensure_schema(conn)
        yield p


@pytest.fixture
def settings(broker_url: str, database_url: str, amqp_names) -> Settings:
    return Settings(**amqp_names.settings(), broker_url=broker_url, database_url=database_url)


@pytest.fixture
def reader(
    broker_url: str,
) -> Iterator[tuple[pika.adapters.blocking_connection.BlockingChannel, str]]:
    """A pika channel and an exclusive queue to publish to (stands in for a reply_to queue)."""
    conn = pika.BlockingConnection(pika_params(broker_url))
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    yield channel, queue
    conn.close()


def _event(queue: str, n: int, **extra) -> OutboxMessage:
    return OutboxMessage(
        exchange="",
        routing_key=queue,
        body=b"\x00event\xff" + str(n).encode(),
        properties={
            "content_type": "application/cloudevents+json",
            "message_id": f"id-{n}",
            "correlation_id": f"corr-{n}",
            "type": "batchworker.job.status",
            "app_id": "batch-worker",
            "timestamp": 1_700_000_000 + n,
            "delivery_mode": 2,
        },
        headers={"attempt": n, "note": "é"},
        **extra,
    )


def _enqueue(pool: ConnectionPool, messages: list[OutboxMessage]) -> None:
    with pool.connection() as conn, conn.transaction():
        outbox.enqueue(conn, messages)


def _pending(pool: ConnectionPool) -> int:
    with pool.connection() as conn:
        return outbox.pending_count(conn)


def _drain(channel, queue: str, expect: int, timeout: float = 60.0) -> list[tuple]:
    got: list[tuple] = []
    deadline = time.monotonic() + timeout
    while len(got) < expect and time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            time.sleep(0.02)
            continue
        got.append((props, body))
    # Anything beyond what was expected would be a duplicate.
    time.sleep(0.2)
    method, _props, _body = channel.basic_get(queue, auto_ack=True)
    assert method is None, "more messages than were enqueued"
    return got


def test_publishes_properties_headers_and_body_in_order_once(settings, pool, reader) -> None:
    channel, queue = reader
    sent = [_event(queue, n) for n in range(50)]
    _enqueue(pool, sent)
    published: list[OutboxMessage] = []
    worker = relay.Relay(settings, pool, on_published=published.append, batch_size=16)
    try:
        while worker.relay_once():
            pass
    finally:
        worker.close()
    got = _drain(channel, queue, 50)
    assert [body for _p, body in got] == [m.body for m in sent]
    props, _body = got[7]
    assert props.content_type == "application/cloudevents+json"
    assert props.message_id == "id-7"
    assert props.correlation_id == "corr-7"
    assert props.type == "batchworker.job.status"
    assert props.app_id == "batch-worker"
    assert props.timestamp == 1_700_000_007
    assert props.delivery_mode == 2
    assert props.headers == {"attempt": 7, "note": "é"}
    assert published == sent
    assert _pending(pool) == 0


def test_unroutable_mandatory_message_is_dropped_not_retried(settings, pool, reader) -> None:
    channel, queue = reader
    lost = OutboxMessage("", "no-such-reply-queue", b"lost", {"message_id": "x"}, mandatory=True)
    _enqueue(pool, [_event(queue, 1), lost, _event(queue, 2)])
    published: list[OutboxMessage] = []
    worker = relay.Relay(settings, pool, on_published=published.append)
    try:
        assert worker.relay_once() == 3
        assert worker.relay_once() == 0
    finally:
        worker.close()
    assert [body for _p, body in _drain(channel, queue, 2)] == [
        _event(queue, 1).body,
        _event(queue, 2).body,
    ]
    assert lost not in published
    assert _pending(pool) == 0


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing in the relay catches it."""


def test_relay_killed_mid_round_republishes_only_that_round(
    settings, pool, reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel, queue = reader
    sent = [_event(queue, n) for n in range(15)]
    _enqueue(pool, sent)
    real_delete = outbox.delete
    calls = 0

    def dying_delete(conn, ids):
        nonlocal calls
        calls += 1
        if calls == 2:  # the second round's publishes are confirmed, its delete never commits
            raise _Killed
        real_delete(conn, ids)

    monkeypatch.setattr(relay.outbox, "delete", dying_delete)
    first = relay.Relay(settings, pool, batch_size=5)
    try:
        assert first.relay_once() == 5
        with pytest.raises(_Killed):
            first.relay_once()
    finally:
        first.close()
    monkeypatch.setattr(relay.outbox, "delete", real_delete)

    second = relay.Relay(settings, pool, batch_size=5)
    try:
        while second.relay_once():
            pass
    finally:
        second.close()
    bodies = [body for _p, body in _drain(channel, queue, 20)]
    counts = {m.body: bodies.count(m.body) for m in sent}
    assert [counts[m.body] for m in sent] == [1] * 5 + [2] * 5 + [1] * 5
    assert _pending(pool) == 0


def test_relay_killed_mid_round_republishes_at_most_one_chunk(
    settings, pool, reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    channel, queue = reader
    sent = [_event(queue, n) for n in range(1000)]
    _enqueue(pool, sent)
    real_message = relay.amqp_message
    built = 0

    def dying_message(message: OutboxMessage):
        # The kill lands mid-publish, deep into the round, the window as full as it gets.
        nonlocal built
        built += 1
        if built == 451:
            raise _Killed
        return real_message(message)

    monkeypatch.setattr(relay, "amqp_message", dying_message)
    first = relay.Relay(settings, pool, batch_size=1000, chunk_size=100)
    try:
        with pytest.raises(_Killed):
            first.relay_once()
    finally:
        first.close()
    monkeypatch.setattr(relay, "amqp_message", real_message)
    left = _pending(pool)
    assert 550 <= left <= 650  # 450 published: at least 350 of them were deleted already

    second = relay.Relay(settings, pool, batch_size=1000, chunk_size=100)
    try:
        while second.relay_once():
            pass
    finally:
        second.close()
    # Every row once, plus the published rows that were not deleted at the kill, and no more.
    ids = [props.message_id for props, _body in _drain(channel, queue, 1000 + left - 550)]
    assert set(ids) == {f"id-{n}" for n in range(1000)}
    duplicates = len(ids) - len(set(ids))
    assert duplicates == left - 550  # exactly the published rows not deleted at the kill
    assert duplicates <= 100
    assert _pending(pool) == 0


def test_each_chunk_is_deleted_and_reported_as_progress(settings, pool, reader) -> None:
    channel, queue = reader
    sent = [_event(queue, n) for n in range(35)]
    _enqueue(pool, sent)
    pending_at_progress: list[int] = []
    published: list[OutboxMessage] = []
    worker = relay.Relay(
        settings,
        pool,
        on_published=published.append,
        on_progress=lambda: pending_at_progress.append(_pending(pool)),
        batch_size=100,
        chunk_size=10,
    )
    try:
        assert worker.relay_once() == 35
    finally:
        worker.close()
    # Rows leave the outbox chunk by chunk within the one round, not all at its end.
    assert len(pending_at_progress) >= 4
    assert pending_at_progress == sorted(pending_at_progress, reverse=True)
    assert pending_at_progress[0] < 35 and pending_at_progress[-1] == 0
    assert published == sent
    assert [body for _p, body in _drain(channel, queue, 35)] == [m.body for m in sent]


def test_running_relays_wake_on_notify_and_share_one_outbox(settings, pool, reader) -> None:
    channel, queue = reader
    changes: list[bool] = []
    relays = [
        relay.Relay(settings, pool, batch_size=7, on_connection_change=changes.append),
        relay.Relay(settings, pool, batch_size=7),
    ]
    threads = [threading.Thread(target=r.run) for r in relays]
    for thread in threads:
        thread.start()
    try:
        sent = [_event(queue, n) for n in range(60)]
        for start in range(0, 60, 10):
            _enqueue(pool, sent[start : start + 10])
        got = _drain(channel, queue, 60)
    finally:
        for r in relays:
            r.request_stop()
        for thread in threads:
            thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert [body for _p, body in got] == [m.body for m in sent]  # one order, no duplicates
    assert changes == [True, False]
    assert _pending(pool) == 0


def test_a_broker_that_stops_answering_is_left_for_the_next_url(
    settings, pool, reader, broker_url: str
) -> None:
    """As the consumer's: the relay notices a silent broker by heartbeat, drops the
    connection without waiting for a close that never comes (it used to wait for good),
    and publishes what is left through the next URL, nothing lost."""
    from tests.e2e.test_stall import PausableProxy

    channel, queue = reader
    parts = urlsplit(broker_url)
    proxy = PausableProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    silent = urlunsplit(parts._replace(netloc=f"{parts.netloc.rsplit(':', 1)[0]}:{proxy.port}"))
    cluster = settings.model_copy(
        update={"broker_url": SecretStr(f"{silent};{broker_url}"), "heartbeat": 1}
    )
    changes: list[bool] = []
    worker = relay.Relay(cluster, pool, on_connection_change=changes.append)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        _enqueue(pool, [_event(queue, 0)])
        assert len(_drain(channel, queue, 1)) == 1
        proxy.paused.set()
        deadline = time.monotonic() + 60
        while changes[-1:] != [False]:
            assert time.monotonic() < deadline, "the relay never let go of the silent broker"
            time.sleep(0.05)
        _enqueue(pool, [_event(queue, 1)])
        [(_props, body)] = _drain(channel, queue, 1, timeout=60)
        assert body == _event(queue, 1).body
        assert changes[-2:] == [False, True]
    finally:
        worker.request_stop()
        thread.join(timeout=20)
        proxy.close()
    assert not thread.is_alive()
    assert _pending(pool) == 0


def test_relay_connection_has_heartbeat_and_confirms(settings, pool) -> None:
    worker = relay.Relay(settings, pool)
    try:
        channel = worker._ensure_channel()
        assert channel.connection.heartbeat == settings.heartbeat
        assert channel.connection.client_properties["purpose"] == "publish"
    finally:
        worker.close()


def test_timestamp_given_as_datetime_is_sent_as_seconds() -> None:
    from datetime import UTC, datetime

    message = relay.amqp_message(
        OutboxMessage("", "q", b"", {"timestamp": datetime(2026, 1, 1, tzinfo=UTC)})
    )
    assert message.properties["timestamp"] == int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
    assert "application_headers" not in message.properties


def test_a_connection_that_read_a_large_row_is_replaced_and_the_row_published(
    settings, database_url: str, reader
) -> None:
    # libpq keeps its read buffer as large as the largest row read (store/db.py): the
    # relay's lock connection, which read a 5 MiB dead letter, is not kept for the next.
    channel, queue = reader
    with ConnectionPool(database_url, min_size=2, max_size=2, open=True) as two:
        with two.connection() as conn:
            outbox.ensure_schema(conn)

        def backends() -> set[int]:
            with two.connection() as a, two.connection() as b:
                return {a.info.backend_pid, b.info.backend_pid}

        worker = relay.Relay(settings, two)
        try:
            _enqueue(two, [_event(queue, 1)])
            before = backends()
            assert worker.relay_once() == 1
            assert backends() == before
            large = OutboxMessage(exchange="", routing_key=queue, body=b"x" * (5 * 2**20))
            _enqueue(two, [large, _event(queue, 2)])
            assert worker.relay_once() == 2
            assert len(backends() - before) == 1
        finally:
            worker.close()
        got = _drain(channel, queue, 3)
        assert [body for _p, body in got] == [
            _event(queue, 1).body,
            large.body,
            _event(queue, 2).body,
        ]
