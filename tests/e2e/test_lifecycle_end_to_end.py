"""Jobs through the whole product: producer → RabbitMQ → worker → simulator → events."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable

import pytest

from tests.e2e.conftest import (
    CLIENT_SECRET,
    TERMINAL,
    Events,
    Producer,
    Stack,
    WorkerProcess,
    free_port,
)
from worker.lifecycle import tag_for

StartWorker = Callable[..., WorkerProcess]

pytestmark = pytest.mark.integration

EXAMPLES = ("max-ndvi-geotiff.json", "max-ndvi-zarr.json", "geopackage-fields.json")


def assert_well_ordered(events: Events, job_id: str) -> None:
    """accepted first, sequences rising by one, exactly one terminal status, last."""
    mine = events.for_job(job_id)
    assert mine[0]["type"] == "batchworker.command.accepted", mine[0]
    job_events = [e for e in mine if e["type"].startswith("batchworker.job.")]
    sequences = [e["data"]["sequence"] for e in job_events]
    assert sequences == list(range(1, len(sequences) + 1)), sequences
    terminal = [
        e
        for e in job_events
        if e["type"] == "batchworker.job.status" and e["data"]["status"] in TERMINAL
    ]
    assert len(terminal) == 1
    assert job_events[-1] is terminal[0]


def test_the_three_examples_end_done_with_events_in_order(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    worker = start_worker()
    # 30 features: processing lasts ~3.6 s at the stack's speed, several poll intervals, so
    # PROCESSING is seen however loaded the machine (a status shorter than a poll round can
    # go unseen, by design: docs/design.md "Reading statuses within a budget").
    jobs = [stack.payload(name, features=30) for name in EXAMPLES]
    for job in jobs:
        producer.publish(job, correlation_id=f"corr-{job['job_id']}")
    for job in jobs:
        final = events.wait_terminal(job["job_id"], timeout=90)
        assert final["data"]["status"] == "DONE", final
        assert final["data"]["batch_request_id"]
        tiles = final["data"]["tiles"]
        assert tiles is not None and tiles["total"] >= 1
        assert tiles["processed"] + tiles["failed"] == tiles["total"]
        assert final["data"]["cost_pu"] > 0
        assert_well_ordered(events, job["job_id"])
        statuses = events.statuses(job["job_id"])
        assert statuses[0] == "CREATED"
        assert "PROCESSING" in statuses
    # AMQP properties of every event: the contract's list.
    for event, props in zip(events.received, events.properties, strict=True):
        assert props.message_id == event["id"]
        assert props.type == event["type"]
        assert props.app_id == "batch-worker"
        assert props.content_type == "application/cloudevents+json"
        assert props.delivery_mode == 2
        assert props.timestamp
        assert props.correlation_id == f"corr-{event['subject']}"
    # One batch request per job, never more.
    upstream = stack.upstream_requests()
    for job in jobs:
        tag = tag_for(stack.names.settings()["fleet_id"], job["job_id"])
        tagged = [t for t in upstream if tag in (t["request"].get("description") or "")]
        assert len(tagged) == 1
        # The producer's own description is kept; the tag is appended.
        assert tagged[0]["request"]["description"].startswith(job["request"]["description"])
    assert CLIENT_SECRET not in worker.log()


def test_metrics_and_probes_are_served(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    port = free_port()
    worker = start_worker(metrics_port=port)
    job = stack.payload(EXAMPLES[0])
    producer.publish(job)
    events.wait_terminal(job["job_id"], timeout=90)
    events.wait_for(lambda: _metric(port, "batch_worker_jobs_finished_total") > 0, 30, "metrics")
    # Every event the broker confirmed is counted once (a reply_to copy would not count).
    events.wait_for(
        lambda: (
            _metric(port, "batch_worker_events_published_total")
            == len({e["id"] for e in events.received})
        ),
        30,
        "events_published_total to match the events read",
    )
    text = _get(port, "/metrics")
    for name in (
        "batch_worker_commands_total",
        "batch_worker_jobs_finished_total",
        "batch_worker_jobs_in_flight",
        "batch_worker_job_duration_seconds",
        "batch_worker_tiles_processed_total",
        "batch_worker_tiles_failed_total",
        "batch_worker_api_requests_total",
        "batch_worker_api_request_duration_seconds",
        "batch_worker_api_budget_wait_seconds_total",
        "batch_worker_status_lag_seconds",
        "batch_worker_events_published_total",
        "batch_worker_broker_connected",
        "batch_worker_duplicates_stopped_total",
    ):
        assert name in text, name
    assert job["job_id"] not in text  # no job ids as label values
    assert CLIENT_SECRET not in text
    assert _get(port, "/healthz")
    assert _get(port, "/readyz")
    assert worker.process.poll() is None


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        body: bytes = response.read()
        return body.decode()


def _metric(port: int, name: str) -> float:
    try:
        text = _get(port, "/metrics")
    except OSError:
        return 0.0
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_event_bodies_are_cloudevents(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker()
    job = stack.payload(EXAMPLES[1])
    producer.publish(job)
    events.wait_terminal(job["job_id"], timeout=90)
    for event in events.for_job(job["job_id"]):
        assert event["specversion"] == "1.0"
        assert event["source"] == f"/batch-worker/{stack.names.settings()['fleet_id']}"
        assert event["datacontenttype"] == "application/json"
        assert event["time"].endswith("Z")
        json.dumps(event)  # plain JSON all the way down


def test_reply_to_receives_a_copy_of_every_event_of_the_job(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    import pika

    from tests.conftest import pika_parameters

    conn = pika.BlockingConnection(pika_parameters(stack.broker_url))
    channel = conn.channel()
    replies = channel.queue_declare("", exclusive=True).method.queue
    start_worker()
    job = stack.payload(EXAMPLES[0], features=2)
    producer.publish(job, reply_to=replies, correlation_id="corr-reply")
    events.wait_terminal(job["job_id"], timeout=60)
    events.pump(1.0)
    copies = []
    while True:
        method, props, body = channel.basic_get(replies, auto_ack=True)
        if method is None:
            break
        copies.append((props, json.loads(body)))
    conn.close()
    published = {e["id"] for e in events.received if e.get("subject") == job["job_id"]}
    assert {event["id"] for _, event in copies} == published
    assert all(props.correlation_id == "corr-reply" for props, _ in copies)


def test_a_duplicate_batch_request_is_stopped_and_reported(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:

    stack.simulator.configure(speed=20.0)  # long enough for the scan to meet the duplicate
    port = free_port()
    start_worker(metrics_port=port)
    job = stack.payload(EXAMPLES[0], features=6)
    producer.publish(job)
    events.wait_for(lambda: "PROCESSING" in events.statuses(job["job_id"]), 60, "PROCESSING")
    # Someone (a lagging list, a crash at the worst moment) made a second request with the
    # job's tag: the worker must stop it and say so.
    tag = tag_for(stack.names.settings()["fleet_id"], job["job_id"])
    duplicate_payload = dict(job["request"], description=f"copy {tag}")
    with stack.api_client() as client:
        duplicate = client.create(duplicate_payload)
        client.start(duplicate.id)
    final = events.wait_terminal(job["job_id"], timeout=90)
    assert final["data"]["status"] == "DONE"
    reported = [
        e
        for e in events.for_job(job["job_id"])
        if duplicate.id in e["data"].get("duplicates_stopped", [])
    ]
    assert reported
    assert final["data"]["batch_request_id"] != duplicate.id
    events.wait_for(
        lambda: _metric(port, "batch_worker_duplicates_stopped_total") >= 1, 30, "the metric"
    )
    stopped = next(t for t in stack.upstream_requests() if t["id"] == duplicate.id)
    assert stopped["userAction"] == "STOP"


def test_credentials_inside_a_request_never_leave_the_worker(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    secret_key = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    worker = start_worker()
    job = stack.payload(EXAMPLES[0], features=2)
    job["request"]["output"]["delivery"]["s3"] = {
        "url": job["request"]["output"]["delivery"]["s3"]["url"],
        "accessKey": "AKIAIOSFODNN7EXAMPLE",
        "secretAccessKey": secret_key,
    }
    producer.publish(job)
    events.wait_terminal(job["job_id"], timeout=60)
    everything = json.dumps(events.received) + worker.log()
    assert secret_key not in everything
    assert "AKIAIOSFODNN7EXAMPLE" not in everything
