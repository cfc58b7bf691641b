"""The examples, run as their users run them, against the real RabbitMQ."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pika
import pytest

from tests.conftest import AmqpNames
from worker.lifecycle import Echo, JobState
from worker.wire.events import command_event, job_event
from worker.wire.job_requests import JobRequest, parse_job_request
from worker.wire.outgoing import OutboxMessage

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
Channel = pika.adapters.blocking_connection.BlockingChannel
NOW = datetime(2026, 11, 25, 21, 30, tzinfo=UTC)


def run(script: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def pika_url(url: str) -> str:
    return url[:-2] + "/%2F" if url.endswith("//") else url


@pytest.fixture
def channel(broker_url: str, amqp_names: AmqpNames) -> Iterator[Channel]:
    connection = pika.BlockingConnection(pika.URLParameters(pika_url(broker_url)))
    try:
        yield connection.channel()
        cleanup = connection.channel()
        cleanup.queue_delete(amqp_names.jobs_queue)
        cleanup.exchange_delete(amqp_names.events_exchange)
    finally:
        connection.close()


# --- producer ------------------------------------------------------------------------------------


def test_the_producers_message_arrives_whole_with_its_properties(
    broker_url: str, amqp_names: AmqpNames, channel: Channel, tmp_path: Path
) -> None:
    channel.queue_declare(amqp_names.jobs_queue, durable=True)
    body = (
        '{"job_id": "corsica-ndvi-2019-q2",\n  "request": {"description": "Île de Beauté"},'
        '  "max_cost_pu": 5000}\n'
    ).encode()
    job = tmp_path / "job.json"
    job.write_bytes(body)

    result = run(
        "producer.py", str(job), "--url", broker_url, "--queue", amqp_names.jobs_queue,
        "--message-id", "m-1", "--correlation-id", "c-1", "--reply-to", "replies",
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "m-1" in result.stdout
    method, properties, received = channel.basic_get(amqp_names.jobs_queue, auto_ack=True)
    assert method is not None
    assert received == body
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert (properties.message_id, properties.correlation_id, properties.reply_to) == (
        "m-1",
        "c-1",
        "replies",
    )
    assert isinstance(parse_job_request(received, properties.content_type), JobRequest)


def test_the_producer_makes_a_message_id_when_none_is_given(
    broker_url: str, amqp_names: AmqpNames, channel: Channel, tmp_path: Path
) -> None:
    channel.queue_declare(amqp_names.jobs_queue, durable=True)
    job = tmp_path / "job.json"
    job.write_text('{"job_id": "j", "action": "cancel"}')
    assert (
        run(
            "producer.py", str(job), "--url", broker_url, "--queue", amqp_names.jobs_queue
        ).returncode
        == 0
    )
    _, properties, _ = channel.basic_get(amqp_names.jobs_queue, auto_ack=True)
    assert properties.message_id and len(properties.message_id) == 36
    assert properties.correlation_id is None and properties.reply_to is None


def test_the_producer_fails_when_no_queue_takes_the_message(
    broker_url: str, amqp_names: AmqpNames, tmp_path: Path
) -> None:
    job = tmp_path / "job.json"
    job.write_text('{"job_id": "j", "request": {}}')
    result = run("producer.py", str(job), "--url", broker_url, "--queue", amqp_names.jobs_queue)
    assert result.returncode == 1
    assert "no queue" in result.stderr


# --- consumer ------------------------------------------------------------------------------------


def status_event(names: AmqpNames, sequence: int, status: str = "PROCESSING") -> OutboxMessage:
    state = JobState(
        job_id="job-1",
        fleet_id=names.settings()["fleet_id"],
        request_hash="0" * 64,
        accepted_at=NOW,
        batch_request_id="b-1",
        status=status,
        sequence=sequence,
    )
    [message] = job_event(state, "status", exchange=names.events_exchange, worker="w", now=NOW)
    return message


def publish(channel: Channel, message: OutboxMessage) -> None:
    channel.basic_publish(
        message.exchange,
        message.routing_key,
        message.body,
        pika.BasicProperties(**message.properties),
    )


def test_the_consumer_prints_each_new_event_once_in_sequence(
    broker_url: str, amqp_names: AmqpNames, channel: Channel
) -> None:
    channel.exchange_declare(amqp_names.events_exchange, "topic", durable=True)
    consumer = subprocess.Popen(
        [
            sys.executable, str(EXAMPLES / "consumer.py"), "--url", broker_url,
            "--exchange", amqp_names.events_exchange, "--max-events", "4", "--idle-timeout", "10",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        # Publish only once its queue is bound, or the exchange would drop the events.
        assert consumer.stderr is not None
        assert "following" in consumer.stderr.readline()

        first, later, stale, last = (status_event(amqp_names, n) for n in (1, 3, 2, 4))
        [accepted] = command_event(
            "accepted", fleet_id="f", exchange=amqp_names.events_exchange, worker="w",
            now=NOW, job_id="job-1", action="submit", echo=Echo(message_id="m"),
        )  # fmt: skip
        for message in (first, first, accepted, later, stale, last):
            publish(channel, message)
        out, err = consumer.communicate(timeout=30)
    finally:
        consumer.kill()
        consumer.wait()

    assert consumer.returncode == 0, err
    printed_ids = [line.rsplit("id=", 1)[1] for line in out.splitlines()]
    expected = [first, accepted, later, last]
    assert printed_ids == [message.properties["message_id"] for message in expected]
    assert "PROCESSING  seq=3" in out


def test_the_consumer_says_so_when_the_exchange_is_missing(
    broker_url: str, amqp_names: AmqpNames
) -> None:
    result = run("consumer.py", "--url", broker_url, "--exchange", amqp_names.events_exchange)
    assert result.returncode == 1
    assert "no exchange" in result.stderr
