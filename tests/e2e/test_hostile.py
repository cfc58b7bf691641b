"""Hostile input against a running worker: generated job requests, AMQP properties and
headers, published with pika to the real broker. Each message ends accepted, or rejected
with a ``command.rejected`` and its byte-for-byte copy in the DLQ; never INTERNAL_ERROR,
and intake never stalls: a good job sent after them all is taken in. Bounded for CI (a
hundred messages); bench/bench_hostile.py is the longer campaign."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pika
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import pika_parameters
from tests.e2e.conftest import Events, Producer, Stack, WorkerProcess
from tests.e2e.hostile import Hostile, Outcomes, messages

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
BATCH = 25
# CI runs 4 batches; bench/bench_hostile.py runs the longer campaign through the same test,
# and reads the figures it writes to BATCH_WORKER_TEST_HOSTILE_REPORT.
BATCHES = int(os.environ.get("BATCH_WORKER_TEST_HOSTILE_BATCHES", "4"))
REPORT = os.environ.get("BATCH_WORKER_TEST_HOSTILE_REPORT")
SETTLE_TIMEOUT = 180.0


def memory_kib(pid: int) -> dict[str, int]:
    """The process's resident set now and at its peak (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


class Publisher:
    """One connection, confirms, mandatory: every message reaches the jobs queue."""

    def __init__(self, stack: Stack) -> None:
        self.connection = pika.BlockingConnection(pika_parameters(stack.broker_url))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.queue = stack.names.jobs_queue
        self.dlq = stack.names.dlq
        self.user = pika_parameters(stack.broker_url).credentials.username

    def publish(self, message: Hostile) -> None:
        self.channel.basic_publish(
            "", self.queue, message.body, message.properties(self.user), mandatory=True
        )

    def drain_dlq(self, outcomes: Outcomes) -> None:
        while True:
            method, properties, body = self.channel.basic_get(self.dlq, auto_ack=True)
            if method is None:
                return
            outcomes.take_dead_letter(properties, body)


def settle(events: Events, publisher: Publisher, outcomes: Outcomes, sent: list[Hostile]) -> None:
    deadline = time.monotonic() + SETTLE_TIMEOUT
    seen = 0
    while True:
        events.pump(0.3)
        for event in events.received[seen:]:
            outcomes.take_event(event)
        seen = len(events.received)
        publisher.drain_dlq(outcomes)
        if outcomes.settled(sent) or time.monotonic() > deadline:
            return


def test_hostile_messages_are_each_accepted_or_rejected_and_dead_lettered_whole(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    worker = start_worker(tenants='{"team-a": {}, "team-b": {"manage": "any"}}')
    publisher = Publisher(stack)
    started = time.monotonic()
    memory: list[dict[str, int]] = []
    outcomes = Outcomes()
    tried: list[Hostile] = []
    timings: list[tuple[float, float]] = []  # per batch: seconds publishing, settling

    # Generation only: shrinking would replay batches against the live worker for minutes;
    # a failure names every message that went wrong instead.
    @settings(
        max_examples=BATCHES,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(batch=st.lists(messages, min_size=BATCH, max_size=BATCH))
    def campaign(batch: list[Hostile]) -> None:
        begun = time.monotonic()
        for message in batch:
            publisher.publish(message)
        published = time.monotonic()
        tried.extend(batch)
        settle(events, publisher, outcomes, batch)
        timings.append((round(published - begun, 1), round(time.monotonic() - published, 1)))
        memory.append(memory_kib(worker.process.pid))
        problems = outcomes.problems(batch)
        assert problems == [], "\n".join(problems)

    try:
        campaign()
        # Intake is not stalled: a good job after them all is taken in.
        job = stack.payload("max-ndvi-geotiff.json", features=1) | {"tenant": "team-a"}
        producer.publish(job)
        events.wait_for(
            lambda: bool(events.of_type("command.accepted", job["job_id"])), 60, "a good job"
        )
    finally:
        publisher.connection.close()
        if REPORT:
            codes = Counter(outcomes.rejected.values()) + Counter(outcomes.property_refusals())
            figures = {
                "messages": len(tried),
                "accepted": len(outcomes.accepted),
                "rejected": dict(codes.most_common()),
                "seconds": round(time.monotonic() - started, 1),
                "worker_memory_kib": memory,
                "batch_seconds": timings,
            }
            Path(REPORT).write_text(json.dumps(figures, indent=2))
    assert len(tried) == BATCH * BATCHES
    assert outcomes.rejected and outcomes.accepted  # the strategies reach both outcomes
