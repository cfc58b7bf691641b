"""Producer AMQP properties never go where the broker acts on them, and unusable ones are a
``command.rejected`` like any bad message: the real worker, RabbitMQ and PostgreSQL."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator

import pika
import pytest

from tests.conftest import pika_parameters
from tests.e2e.conftest import Events, Producer, Stack, WorkerProcess, dlq_messages, take_all

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def victim(stack: Stack) -> Iterator[str]:
    """A queue a producer would like the worker to write into (named in CC)."""
    name = f"victim-{uuid.uuid4().hex[:8]}"
    conn = pika.BlockingConnection(pika_parameters(stack.broker_url))
    conn.channel().queue_declare(name)
    conn.close()
    yield name
    conn = pika.BlockingConnection(pika_parameters(stack.broker_url))
    conn.channel().queue_delete(name)
    conn.close()


def _rejected(events: Events) -> dict:
    events.wait_for(lambda: bool(events.of_type("command.rejected")), 60, "command.rejected")
    return events.of_type("command.rejected")[0]


def _dead_letter(stack: Stack) -> tuple[pika.BasicProperties, bytes]:
    deadline = time.monotonic() + 30
    letters = dlq_messages(stack)
    while not letters and time.monotonic() < deadline:
        time.sleep(0.2)
        letters = dlq_messages(stack)
    assert len(letters) == 1
    return letters[0]


def test_cc_bcc_expiration_and_user_id_are_kept_aside_on_the_dead_letter(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer, victim: str
) -> None:
    start_worker()
    body = b'{"job_id": "j-cc", "request": "not an object"}'
    producer.publish(
        body,
        headers={"CC": [victim], "BCC": [victim], "x-producer": "p"},
        expiration="600000",
        user_id="guest",  # the shared broker's login: accepted from the producer
    )
    assert _rejected(events)["data"]["code"] == "INVALID_FIELD"
    properties, dead_body = _dead_letter(stack)
    assert dead_body == body
    assert properties.expiration is None and properties.user_id is None
    headers = properties.headers
    assert "CC" not in headers and "BCC" not in headers
    assert headers["x-batch-worker-original-CC"] == [victim]
    # (RabbitMQ takes BCC off what it delivers; were it there, it would be kept aside too.)
    assert headers["x-batch-worker-original-expiration"] == "600000"
    assert headers["x-batch-worker-original-user-id"] == "guest"
    assert headers["x-producer"] == "p"
    events.pump(1.0)
    # The producer's own publish put one copy there (CC works for it, with its rights);
    # the worker's dead-letter publish put none (it would carry the reason header).
    copies = take_all(stack, victim)
    assert len(copies) == 1
    assert "x-batch-worker-reason" not in (copies[0][0].headers or {})


@pytest.mark.parametrize(
    ("headers", "properties", "code"),
    [
        ({"x-note": "a\x00b"}, {}, "INVALID_PROPERTY"),
        ({}, {"correlation_id": "c\x00"}, "INVALID_PROPERTY"),
        (
            {},
            {"reply_to": "amq.rabbitmq.reply-to.g2gCZAAsc2FzZEBsb2NhbGhvc3Q=.xx"},
            "INVALID_REPLY_TO",
        ),
    ],
    ids=["nul-header", "nul-property", "reply-to"],
)
def test_unusable_properties_are_rejected_and_dead_lettered_with_the_reason(
    stack: Stack,
    start_worker: StartWorker,
    events: Events,
    producer: Producer,
    headers: dict,
    properties: dict,
    code: str,
) -> None:
    start_worker()
    job = stack.payload("max-ndvi-geotiff.json")
    producer.publish(job, headers=headers or None, **properties)
    rejected = _rejected(events)
    assert (rejected["data"]["code"], rejected["data"]["job_id"]) == (code, job["job_id"])
    dead_properties, dead_body = _dead_letter(stack)
    assert dead_body == sent_body(job)
    assert dead_properties.headers["x-batch-worker-reason"] == code
    if "x-note" in headers:
        assert dead_properties.headers["x-note"] in (b"a\x00b", "a\x00b")  # the same bytes
    assert not events.of_type("command.accepted")


def sent_body(job: dict) -> bytes:
    return json.dumps(job).encode()
