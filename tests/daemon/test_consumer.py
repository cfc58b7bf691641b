"""The jobs consumer against a real RabbitMQ; producers publish with pika."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Generator, Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest
from pydantic import SecretStr

from tests.conftest import rabbitmqctl
from worker.broker import connection, connection_name, declare_topology, ensure_connected
from worker.daemon.consumer import JobsConsumer, read_ahead
from worker.daemon.inbound import InboundMessage, IntakeUnavailable
from worker.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.broker]


def pika_params(broker_url: str) -> pika.URLParameters:
    """pika reads the ``//`` of kombu-style URLs as an empty vhost name; it means ``/``."""
    return pika.URLParameters(broker_url[:-1] if broker_url.endswith("//") else broker_url)


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.fixture
def settings(broker_url: str, amqp_names) -> Settings:
    return Settings(
        **amqp_names.settings(),
        broker_url=broker_url,
        jobs_delivery_limit=2,
        prefetch=20,
        worker_name=f"test-{amqp_names.prefix}",
    )


Handler = Callable[[list[InboundMessage]], list[InboundMessage] | None]


class Whole:
    """A plain handler as intake, in one step with nothing to read ahead: it takes a batch
    in by returning (the messages it defers, or None for none) and fails it by raising."""

    def __init__(self, handle: Handler) -> None:
        self._handle = handle

    def read(self, batch: list[InboundMessage]) -> list[InboundMessage]:
        return batch

    def take_in_steps(
        self, batch: list[InboundMessage]
    ) -> Generator[None, None, list[InboundMessage]]:
        return self._handle(batch) or []
        yield  # a generator: one step


class Running:
    """A consumer on its own thread, stopped and joined at the end of the test."""

    def __init__(self, settings: Settings, handle: Handler):
        self.changes: list[bool] = []
        self.consumer = JobsConsumer(
            settings, Whole(handle), on_connection_change=self.changes.append, batch_wait=0.02
        )
        self.thread = threading.Thread(target=self.consumer.run)
        self.thread.start()
        wait_for(lambda: self.changes[-1:] == [True])

    def stop(self) -> None:
        self.consumer.request_stop()
        self.thread.join(timeout=15)
        assert not self.thread.is_alive()


@pytest.fixture
def run_consumer(settings: Settings) -> Iterator[Callable[..., Running]]:
    started: list[Running] = []

    def start(handle: Handler) -> Running:
        running = Running(settings, handle)
        started.append(running)
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.stop()


@pytest.fixture
def producer(broker_url: str) -> Iterator[Any]:
    conn = pika.BlockingConnection(pika_params(broker_url))
    channel = conn.channel()
    channel.confirm_delivery()
    yield channel
    conn.close()


def _publish(channel: Any, queue: str, bodies: list[bytes]) -> None:
    for n, body in enumerate(bodies):
        channel.basic_publish(
            "",
            queue,
            body,
            pika.BasicProperties(
                content_type="application/json",
                message_id=f"m-{n}",
                correlation_id=f"c-{n}",
                reply_to="replies",
                timestamp=1_700_000_000,
                delivery_mode=2,
                headers={"n": n, "who": "test"},
            ),
            mandatory=True,
        )


def _ready(channel: Any, queue: str) -> int:
    return channel.queue_declare(queue, passive=True).method.message_count


def test_batches_reach_intake_whole_and_are_acked_after(
    run_consumer, producer, settings: Settings
) -> None:
    bodies = [b'{"job_id": "j%d"}\xff' % n for n in range(45)]
    batches: list[list[InboundMessage]] = []
    running = run_consumer(batches.append)
    _publish(producer, settings.jobs_queue, bodies)
    wait_for(lambda: sum(map(len, batches)) >= 45)
    running.stop()

    got = [message for batch in batches for message in batch]
    assert [m.body for m in got] == bodies
    assert max(map(len, batches)) <= settings.prefetch
    first = got[0]
    assert first.content_type == "application/json"
    assert (first.message_id, first.correlation_id, first.reply_to) == ("m-0", "c-0", "replies")
    assert first.properties["timestamp"] == 1_700_000_000
    assert first.properties["delivery_mode"] == 2
    assert "application_headers" not in first.properties
    assert first.headers == {"n": 0, "who": "test"}
    assert not first.redelivered
    assert _ready(producer, settings.jobs_queue) == 0  # acked: nothing came back on close


def test_failing_intake_leaves_messages_in_the_queue(
    run_consumer, producer, settings: Settings
) -> None:
    calls: list[int] = []

    def failing(batch: list[InboundMessage]) -> None:
        calls.append(len(batch))
        raise RuntimeError("database down")

    running = run_consumer(failing)
    _publish(producer, settings.jobs_queue, [b"a", b"b", b"c"])
    wait_for(lambda: len(calls) >= 3)  # the batch, then two alone: an outage, back off
    running.stop()
    # Nothing acked; back in the queue (unless past the delivery limit, in the DLQ).
    wait_for(lambda: _ready(producer, settings.jobs_queue) + _ready(producer, settings.dlq) == 3)


def test_requeued_batch_is_taken_in_on_redelivery(
    run_consumer, producer, settings: Settings
) -> None:
    seen: list[InboundMessage] = []
    failed = threading.Event()

    def flaky(batch: list[InboundMessage]) -> None:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("transient")
        seen.extend(batch)

    running = run_consumer(flaky)
    _publish(producer, settings.jobs_queue, [b"x", b"y"])
    wait_for(lambda: {m.body for m in seen} == {b"x", b"y"})
    running.stop()
    assert _ready(producer, settings.jobs_queue) == 0


def test_an_unavailable_intake_costs_no_delivery_attempt(
    run_consumer, producer, settings: Settings
) -> None:
    # Three outages in a row, more than the delivery limit (2): requeueing each time would
    # dead-letter good requests. The batch is held instead and taken in once intake is back.
    attempts: list[list[InboundMessage]] = []

    def down_then_up(batch: list[InboundMessage]) -> None:
        attempts.append(batch)
        if len(attempts) <= 3:
            raise IntakeUnavailable("database down")

    running = run_consumer(down_then_up)
    _publish(producer, settings.jobs_queue, [b"p", b"q"])
    wait_for(lambda: len(attempts) >= 4, timeout=30)  # back-offs of 1, 2 and 4 s
    running.stop()
    taken = attempts[-1]
    assert [m.body for m in taken] == [b"p", b"q"]
    assert not any(m.redelivered for m in taken)  # held, never handed back
    assert _ready(producer, settings.jobs_queue) == 0
    assert _ready(producer, settings.dlq) == 0


def test_deferred_messages_are_held_while_the_rest_is_acked(
    run_consumer, producer, settings: Settings
) -> None:
    # Intake at capacity defers new jobs: they stay in hand (no delivery attempt spent)
    # while the rest of their batch is acked, and are offered again after a pause.
    offers: list[bytes] = []
    taken: list[InboundMessage] = []

    def at_capacity_once(batch: list[InboundMessage]) -> list[InboundMessage]:
        deferred = [m for m in batch if m.body.startswith(b"new") and m.body not in offers]
        offers.extend(m.body for m in batch)
        taken.extend(m for m in batch if m not in deferred)
        return deferred

    running = run_consumer(at_capacity_once)
    _publish(producer, settings.jobs_queue, [b"cancel-1", b"new-1", b"new-2"])
    wait_for(lambda: len(taken) == 3, timeout=15)
    running.stop()
    assert offers.count(b"cancel-1") == 1
    assert offers.count(b"new-1") == offers.count(b"new-2") == 2  # deferred once, then taken
    assert not any(m.redelivered for m in taken)  # held in hand, never handed back
    assert _ready(producer, settings.jobs_queue) == 0
    assert _ready(producer, settings.dlq) == 0


def test_poison_message_goes_to_dlq_and_spares_its_batch(
    run_consumer, producer, settings: Settings
) -> None:
    taken: list[bytes] = []

    def intake(batch: list[InboundMessage]) -> None:
        if any(m.body == b"poison" for m in batch):
            raise ValueError("bug triggered by one message")
        taken.extend(m.body for m in batch)

    bodies = [b"g1", b"g2", b"poison", b"g3", b"g4"]
    conn = ensure_connected(connection(settings, purpose="test"))
    try:
        declare_topology(conn, settings)
    finally:
        conn.release()
    _publish(producer, settings.jobs_queue, bodies)  # already queued: one batch
    running = run_consumer(intake)
    wait_for(lambda: sorted(taken) == [b"g1", b"g2", b"g3", b"g4"])

    def dead_lettered() -> bool:
        method, _props, body = producer.basic_get(settings.dlq, auto_ack=True)
        return method is not None and body == b"poison"

    wait_for(dead_lettered)  # past the delivery limit (2) after its back-offs
    running.stop()
    assert _ready(producer, settings.jobs_queue) == 0


def test_reconnects_after_the_broker_closes_the_connection(
    run_consumer, producer, settings: Settings
) -> None:
    bodies: list[bytes] = []
    running = run_consumer(lambda batch: bodies.extend(m.body for m in batch))
    _publish(producer, settings.jobs_queue, [b"before"])
    wait_for(lambda: bodies == [b"before"])

    name = connection_name(settings, "consume")
    listed = subprocess.run(
        rabbitmqctl("-q", "list_connections", "pid", "client_properties"),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pids = [line.split("\t")[0] for line in listed.splitlines() if name in line]
    assert len(pids) == 1
    # Only this test's connection: other tests share the broker.
    subprocess.run(rabbitmqctl("close_connection", pids[0], "test"), check=True)

    wait_for(lambda: running.changes[-2:] == [False, True])
    _publish(producer, settings.jobs_queue, [b"after"])
    wait_for(lambda: bodies == [b"before", b"after"])
    running.stop()
    assert running.changes[-1] is False


def test_a_broker_that_stops_answering_is_left_for_the_next_url(
    producer, settings: Settings, broker_url: str
) -> None:
    """The first URL leads through a proxy that goes silent (connections open, nothing
    forwarded: a node that hangs, a network that drops its packets). The consumer notices
    by heartbeat, drops the connection without waiting for a close that never comes (it
    used to wait for good), and goes on through the next URL."""
    from tests.e2e.test_stall import PausableProxy

    parts = urlsplit(broker_url)
    proxy = PausableProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    silent = urlunsplit(parts._replace(netloc=f"{parts.netloc.rsplit(':', 1)[0]}:{proxy.port}"))
    cluster = settings.model_copy(
        update={"broker_url": SecretStr(f"{silent};{broker_url}"), "heartbeat": 1}
    )
    bodies: list[bytes] = []
    running = Running(cluster, lambda batch: bodies.extend(m.body for m in batch))
    try:
        _publish(producer, settings.jobs_queue, [b"through the proxy"])
        wait_for(lambda: bodies == [b"through the proxy"])
        proxy.paused.set()
        # Heartbeats missed (~2 s), then the silent URL is tried again first and given up
        # after CONNECT_TIMEOUT (10 s) before the next one is.
        wait_for(lambda: running.changes[-2:] == [False, True], timeout=60)
        _publish(producer, settings.jobs_queue, [b"through the next url"])
        wait_for(lambda: bodies == [b"through the proxy", b"through the next url"])
    finally:
        running.stop()
        proxy.close()


def test_consumer_connection_carries_heartbeat_and_prefetch(settings: Settings) -> None:
    consumer = JobsConsumer(settings, Whole(lambda batch: None))
    assert consumer.connection.heartbeat == settings.heartbeat
    # Half the window: the next batch arrives while this one is in its transaction.
    assert consumer._batch_max == settings.prefetch // 2


def test_the_consumer_reads_ahead_on_a_real_connection(settings: Settings) -> None:
    with connection(settings, purpose="test") as conn:
        conn.ensure_connection(max_retries=1)
        assert read_ahead(conn.connection)
        assert conn.connection.transport._quick_recv.__name__ == "recv_ahead"


def test_heartbeats_are_checked_once_a_second_not_once_a_delivery(settings: Settings) -> None:
    class Conn:
        checks = 0

        def drain_events(self, timeout: float) -> None:
            pass  # a delivery was read

        def heartbeat_check(self) -> None:
            self.checks += 1

    consumer, conn = JobsConsumer(settings, Whole(lambda batch: None)), Conn()
    for _ in range(50):
        consumer._drain(conn)
    assert conn.checks == 1
    consumer._heartbeat_checked_at -= 1.0  # a second later
    consumer._drain(conn)
    assert conn.checks == 2


def test_deliveries_already_read_are_drained_in_one_pass_up_to_a_batch(
    settings: Settings,
) -> None:
    class Conn:
        def __init__(self, transport: Any, consumer: JobsConsumer) -> None:
            self.transport, self.consumer, self.drains = transport, consumer, 0

        def drain_events(self, timeout: float) -> None:
            self.drains += 1
            self.consumer._on_message(delivery(self.drains))
            self.transport._read_buffer = self.transport._read_buffer[1:]

        def heartbeat_check(self) -> None:
            pass

    def delivery(tag: int) -> Any:
        return SimpleNamespace(
            body=b"{}",
            content_type="application/json",
            properties={},
            headers={},
            delivery_tag=tag,
            delivery_info={"redelivered": False},
        )

    consumer = JobsConsumer(settings, Whole(lambda batch: None), batch_max=4)
    transport = SimpleNamespace(sock=None, _read_buffer=b"xxxxxxxx")  # 8 frames' worth
    consumer._transport = transport
    conn = Conn(transport, consumer)
    consumer._drain(conn)
    assert conn.drains == 4 and len(consumer._pending) == 4  # a batch, then back round
    consumer._pending.clear()
    transport._read_buffer = b"xx"
    consumer._drain(conn)
    assert conn.drains == 6  # the first, then one more for what it left in the buffer
    transport._read_buffer = b""
    consumer._drain(conn)
    assert conn.drains == 7  # a drain waits on the socket even when nothing is buffered
