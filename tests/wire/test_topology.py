"""The topology: one description, the shipped definitions file, and the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pika
import pytest

from tests.conftest import import_definitions
from worker.broker import broker_major, connection, declare_topology, ensure_connected
from worker.settings import ENV_PREFIX, Settings
from worker.wire.topology import (
    declare_on_channel,
    definitions,
    dlq_arguments,
    rabbitmq_major,
    render_definitions,
    topology,
)

DEFINITIONS_PATH = Path(__file__).resolve().parents[2] / "config" / "rabbitmq" / "definitions.json"
DEFINITIONS_4_PATH = DEFINITIONS_PATH.with_name("definitions-rabbitmq4.json")


def pika_params(broker_url: str) -> pika.URLParameters:
    """pika reads the ``//`` of kombu-style URLs as an empty vhost name; it means ``/``."""
    return pika.URLParameters(broker_url[:-1] if broker_url.endswith("//") else broker_url)


def _settings(amqp_names, **extra) -> Settings:
    return Settings(**amqp_names.settings(), **extra)


def _get(channel, queue: str, timeout: float = 10.0):
    """basic_get until a message comes (dead-lettering and routing are asynchronous)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, props, body = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            return props, body
        time.sleep(0.05)
    raise AssertionError(f"nothing arrived in {queue}")


def test_definitions_file_matches_default_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.chdir(Path(DEFINITIONS_PATH).parent)  # no stray .env file
    shipped = json.loads(DEFINITIONS_PATH.read_text(encoding="utf-8"))
    assert shipped == json.loads(render_definitions(Settings()))


def test_jobs_queue_has_delivery_limit_and_at_least_once_dead_lettering() -> None:
    settings = Settings(jobs_delivery_limit=7, unrouted_max_length=42)
    queues = {q.name: q.arguments for q in topology(settings).queues}
    jobs = queues["batch.jobs"]
    assert jobs["x-queue-type"] == "quorum"
    assert jobs["x-delivery-limit"] == 7
    assert (jobs["x-dead-letter-exchange"], jobs["x-dead-letter-routing-key"]) == (
        "",
        "batch.jobs.dlq",
    )
    assert jobs["x-dead-letter-strategy"] == "at-least-once"
    assert jobs["x-overflow"] == "reject-publish"
    assert queues["batch.jobs.dlq"] == {"x-queue-type": "quorum"}
    assert queues["batch.events.unrouted"]["x-max-length"] == 42
    assert queues["batch.events.unrouted"]["x-overflow"] == "drop-head"
    exchanges = {e.name: e for e in topology(settings).exchanges}
    assert exchanges["batch.events"].type == "topic"
    assert exchanges["batch.events"].arguments == {"alternate-exchange": "batch.events.unrouted"}
    assert exchanges["batch.events.unrouted"].type == "fanout"


def test_targets_are_declared_before_what_points_at_them() -> None:
    topo = topology(Settings())
    exchange_order = [e.name for e in topo.exchanges]
    queue_order = [q.name for q in topo.queues]
    assert exchange_order.index("batch.events.unrouted") < exchange_order.index("batch.events")
    assert queue_order.index("batch.jobs.dlq") < queue_order.index("batch.jobs")


@pytest.mark.integration
@pytest.mark.broker
def test_declared_topology_routes_unrouted_events_and_dead_letters(
    broker_url: str, amqp_names
) -> None:
    settings = _settings(amqp_names, broker_url=broker_url, jobs_delivery_limit=1)
    conn = ensure_connected(connection(settings, purpose="consume"))
    try:
        declare_topology(conn, settings)
        declare_topology(conn, settings)  # idempotent
    finally:
        conn.release()

    pc = pika.BlockingConnection(pika_params(broker_url))
    try:
        ch = pc.channel()
        for queue in (
            amqp_names.jobs_queue,
            amqp_names.dlq,
            f"{amqp_names.events_exchange}.unrouted",
        ):
            ch.queue_declare(queue, passive=True)
        for exchange in (amqp_names.events_exchange, f"{amqp_names.events_exchange}.unrouted"):
            ch.exchange_declare(exchange, passive=True)

        # An event no queue is bound for lands in the retention queue.
        ch.confirm_delivery()
        ch.basic_publish(amqp_names.events_exchange, "job.done", b"event-1")
        _props, body = _get(ch, f"{amqp_names.events_exchange}.unrouted")
        assert body == b"event-1"

        # A message requeued past the delivery limit lands in the DLQ, whole.
        ch.basic_publish(
            "",
            amqp_names.jobs_queue,
            b"\x00poison\xff",
            pika.BasicProperties(message_id="m-1", headers={"h": "v"}, delivery_mode=2),
        )
        for _ in range(2):
            method, _p, _b = ch.basic_get(amqp_names.jobs_queue) or (None, None, None)
            deadline = time.monotonic() + 10
            while method is None and time.monotonic() < deadline:
                time.sleep(0.05)
                method, _p, _b = ch.basic_get(amqp_names.jobs_queue)
            assert method is not None
            ch.basic_reject(method.delivery_tag, requeue=True)
        props, body = _get(ch, amqp_names.dlq)
        assert body == b"\x00poison\xff"
        assert props.message_id == "m-1"
        assert props.headers["h"] == "v"
    finally:
        pc.close()


@pytest.mark.integration
@pytest.mark.broker
def test_declaring_over_preloaded_definitions_does_not_fail(broker_url: str, amqp_names) -> None:
    settings = _settings(amqp_names, broker_url=broker_url)
    with connection(settings, purpose="test") as conn:
        major = broker_major(conn)
    # The operator's way: rabbitmqctl (on PATH, works as root here), with the definitions
    # for the broker's major version. It reads the file as the broker's user, so the file
    # must be world-readable (pytest's tmp_path is not).
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir="/tmp") as file:
        file.write(json.dumps(definitions(topology(settings, rabbitmq=major))))
        file.flush()
        os.chmod(file.name, 0o644)
        subprocess.run(import_definitions(file.name), check=True, capture_output=True)
        _wait_until_declared(broker_url, amqp_names.jobs_queue)
    conn = ensure_connected(connection(settings, purpose="consume"))
    try:
        declare_topology(conn, settings)
    finally:
        conn.release()


def _wait_until_declared(broker_url: str, queue: str, timeout: float = 15.0) -> None:
    """The import is asynchronous; wait for its last queue."""
    deadline = time.monotonic() + timeout
    while True:
        pc = pika.BlockingConnection(pika_params(broker_url))
        try:
            pc.channel().queue_declare(queue, passive=True)
            return
        except pika.exceptions.ChannelClosedByBroker:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        finally:
            if pc.is_open:
                pc.close()


@pytest.mark.parametrize(
    ("announced", "major"),
    [("3.10.8", 3), (b"4.0.5", 4), ("4.1.0-rc.1", 4), ("13.0", 13), (None, 3), ("x", 3)],
)
def test_the_brokers_major_version_is_read_from_what_it_announces(announced, major) -> None:
    assert rabbitmq_major({"version": announced}) == major
    assert rabbitmq_major(None) == 3


def test_the_dlq_is_unlimited_explicitly_on_rabbitmq_4_and_left_alone_on_3() -> None:
    """4.x: -1, no limit (its default is 20, and looking at the DLQ spends deliveries).
    3.x has no default limit, and takes -1 as a limit below every count: a 3.10 queue
    with it drops a message at its first return."""
    settings = Settings()
    on_3 = {q.name: q.arguments for q in topology(settings, rabbitmq=3).queues}
    on_4 = {q.name: q.arguments for q in topology(settings, rabbitmq=4).queues}
    assert on_3["batch.jobs.dlq"] == {"x-queue-type": "quorum"}
    assert on_4["batch.jobs.dlq"] == {"x-queue-type": "quorum", "x-delivery-limit": -1}
    # Everything else is the same on both.
    assert {k: v for k, v in on_3.items() if k != "batch.jobs.dlq"} == {
        k: v for k, v in on_4.items() if k != "batch.jobs.dlq"
    }
    assert topology(settings) == topology(settings, rabbitmq=3)


def test_definitions_file_for_rabbitmq_4_matches_default_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.chdir(DEFINITIONS_PATH.parent)  # no stray .env file
    shipped = json.loads(DEFINITIONS_4_PATH.read_text(encoding="utf-8"))
    assert shipped == json.loads(render_definitions(Settings(), rabbitmq=4))
    [dlq] = [q for q in shipped["queues"] if q["name"] == "batch.jobs.dlq"]
    assert dlq["arguments"]["x-delivery-limit"] == -1


@pytest.mark.integration
@pytest.mark.broker
def test_a_dlq_declared_without_the_limit_is_kept_with_a_warning(
    broker_url: str, amqp_names, caplog: pytest.LogCaptureFixture
) -> None:
    """A DLQ an earlier version declared (no x-delivery-limit): RabbitMQ refuses the
    redeclare with -1 and cannot change the queue's arguments; the worker carries on with
    it as it is and says what to do, rather than not starting at all."""
    settings = _settings(amqp_names, broker_url=broker_url)
    with connection(settings, purpose="test") as conn:
        declare_on_channel(conn.default_channel, topology(settings, rabbitmq=3))
        declare_on_channel(conn.default_channel, topology(settings, rabbitmq=4))
        # The channel py-amqp reopened after the refusal declares the rest as before.
        declare_on_channel(conn.default_channel, topology(settings, rabbitmq=3))
    [warning] = [r for r in caplog.records if r.name == "worker.wire.topology"]
    assert amqp_names.dlq in warning.getMessage()
    assert "delivery-limit -1" in warning.getMessage()


@pytest.mark.integration
@pytest.mark.broker
def test_the_declared_dlq_has_the_arguments_for_the_brokers_version(
    broker_url: str, amqp_names
) -> None:
    """Redeclaring with exactly the version's arguments passes; with the other version's,
    RabbitMQ refuses (PRECONDITION_FAILED): so the queue carries the version's."""
    settings = _settings(amqp_names, broker_url=broker_url)
    conn = ensure_connected(connection(settings, purpose="consume"))
    try:
        declare_topology(conn, settings)
        major = broker_major(conn)
    finally:
        conn.release()
    pc = pika.BlockingConnection(pika_params(broker_url))
    try:
        pc.channel().queue_declare(amqp_names.dlq, durable=True, arguments=dlq_arguments(major))
        other = dlq_arguments(4 if major < 4 else 3)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker, match="x-delivery-limit"):
            pc.channel().queue_declare(amqp_names.dlq, durable=True, arguments=other)
    finally:
        if pc.is_open:
            pc.close()
