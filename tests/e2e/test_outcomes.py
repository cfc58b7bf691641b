"""Every row of the contract's table "What happens to what arrives", against the real parts."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest

from tests.e2e.conftest import (
    CLIENT_SECRET,
    Events,
    Producer,
    Stack,
    WorkerProcess,
    dlq_messages,
)
from worker.lifecycle import tag_for

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
GEOTIFF = "max-ndvi-geotiff.json"


@pytest.mark.parametrize(
    ("body", "content_type", "code", "job_id"),
    [
        (b"{not json", "application/json", "MALFORMED_JSON", None),
        (b"[1, 2, 3]", "application/json", "NOT_AN_OBJECT", None),
        (b'{"job_id": "has spaces", "request": {}}', "application/json", "INVALID_JOB_ID", None),
        (b'{"job_id": "j-1", "action": "explode"}', "application/json", "UNKNOWN_ACTION", "j-1"),
        (b'{"job_id": "j-2", "action": "submit"}', "application/json", "MISSING_REQUEST", "j-2"),
        (
            b'{"job_id": "j-3", "request": {"a": 1}, "batch_request_id": "x"}',
            "application/json",
            "CONFLICTING_FIELDS",
            "j-3",
        ),
        (
            b'{"schema_version": 2, "job_id": "j-4", "request": {"a": 1}}',
            "application/json",
            "UNSUPPORTED_SCHEMA_VERSION",
            "j-4",
        ),
        (b'{"job_id": "j-5", "request": {}}', "text/plain", "UNSUPPORTED_CONTENT_TYPE", None),
    ],
)
def test_unusable_messages_are_rejected_and_dead_lettered_whole(
    stack: Stack,
    start_worker: StartWorker,
    events: Events,
    producer: Producer,
    body: bytes,
    content_type: str,
    code: str,
    job_id: str | None,
) -> None:
    start_worker()
    sent = producer.publish(
        body,
        content_type=content_type,
        headers={"x-producer": "tests", "n": 7},
        correlation_id="corr-rejected",
        message_id="msg-rejected-1",
    )
    events.wait_for(
        lambda: bool(events.of_type("command.rejected")), 30, "a command.rejected event"
    )
    rejected = events.of_type("command.rejected")[0]
    assert rejected["data"]["code"] == code
    assert rejected["data"]["message"]
    if job_id is not None:
        assert rejected["data"]["job_id"] == job_id
    events.pump(0.5)
    assert not events.of_type("command.accepted")
    # Dead-lettered byte for byte, with its properties and headers, and the reason.
    deadline = time.monotonic() + 15
    letters = dlq_messages(stack)
    while not letters and time.monotonic() < deadline:
        time.sleep(0.2)
        letters = dlq_messages(stack)
    assert len(letters) == 1
    properties, dead_body = letters[0]
    assert dead_body == body
    assert properties.content_type == content_type
    assert properties.message_id == sent.message_id
    assert properties.correlation_id == "corr-rejected"
    assert properties.headers["x-producer"] == "tests"
    assert properties.headers["n"] == 7
    assert properties.headers["x-batch-worker-reason"] == code


def test_a_payload_the_worker_refuses_ends_failed_with_a_worker_error(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker()
    job = stack.payload(GEOTIFF)
    job["request"]["output"]["delivery"]["s3"]["url"] = "ftp://nowhere/at-all"
    producer.publish(job)
    final = events.wait_terminal(job["job_id"], timeout=30)
    assert final["data"]["status"] == "FAILED"
    error = final["data"]["error"]
    assert error["source"] == "worker"
    assert "output.delivery.s3.url" in error["message"]
    assert events.of_type("command.accepted", job["job_id"])


def test_a_payload_the_api_refuses_ends_failed_with_the_apis_code(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker()
    job = stack.payload(GEOTIFF)
    job["request"]["input"]["id"] = 424242  # no such tiling grid: the API says 400
    producer.publish(job)
    final = events.wait_terminal(job["job_id"], timeout=30)
    assert final["data"]["status"] == "FAILED"
    error = final["data"]["error"]
    assert error["source"] == "api"
    assert error["http_status"] == 400
    assert error["code"] == "COMMON_BAD_PAYLOAD"
    assert error["message"]


def test_resubmitting_the_same_request_is_idempotent(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker()
    job = stack.payload(GEOTIFF)
    producer.publish(job)
    final = events.wait_terminal(job["job_id"], timeout=60)
    producer.publish(job)
    events.wait_for(
        lambda: len(events.of_type("command.accepted", job["job_id"])) == 2, 30, "second accept"
    )
    # The latest status event again, with the same id.
    events.wait_for(
        lambda: sum(e["id"] == final["id"] for e in events.received) == 2, 30, "a re-publish"
    )
    tag = tag_for(stack.names.settings()["fleet_id"], job["job_id"])
    tagged = [
        t for t in stack.upstream_requests() if tag in (t["request"].get("description") or "")
    ]
    assert len(tagged) == 1


def test_resubmitting_a_different_request_is_a_conflict(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker()
    job = stack.payload(GEOTIFF)
    producer.publish(job)
    events.wait_for(lambda: bool(events.of_type("command.accepted", job["job_id"])), 30, "accept")
    changed = copy.deepcopy(job)
    changed["request"]["description"] = "something else entirely"
    producer.publish(changed)
    events.wait_for(lambda: bool(events.of_type("command.rejected", job["job_id"])), 30, "reject")
    assert events.of_type("command.rejected", job["job_id"])[0]["data"]["code"] == "JOB_CONFLICT"
    letters = dlq_messages(stack)
    assert [json.loads(body)["request"]["description"] for _, body in letters] == [
        "something else entirely"
    ]
    # The original job is untouched and ends normally.
    assert events.wait_terminal(job["job_id"], timeout=60)["data"]["status"] == "DONE"


def test_cancel_while_created_never_analyses_or_starts(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    # The create answers slowly, so the cancel arrives while the request is being created:
    # the worker must then leave it CREATED, never analysed or started.
    stack.simulator.configure(latency=2.0)
    start_worker()
    job = stack.payload(GEOTIFF)
    producer.publish(job)
    events.wait_for(lambda: bool(events.of_type("command.accepted", job["job_id"])), 30, "accept")
    producer.publish({"job_id": job["job_id"], "action": "cancel"})
    final = events.wait_terminal(job["job_id"], timeout=30)
    assert final["data"]["status"] == "STOPPED"
    assert final["data"]["stopped_reason"] == "USER_ACTION"
    stack.simulator.configure(latency=0.0)
    tag = tag_for(stack.names.settings()["fleet_id"], job["job_id"])
    for task in stack.upstream_requests():
        if tag in (task["request"].get("description") or ""):
            assert task["status"] == "CREATED"
            assert task.get("userAction") in (None, "NONE")


def test_cancel_during_processing_stops_the_request(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    stack.simulator.configure(speed=20.0)  # long enough to catch it processing
    start_worker()
    job = stack.payload(GEOTIFF, features=6)
    producer.publish(job)
    events.wait_for(lambda: "PROCESSING" in events.statuses(job["job_id"]), 60, "PROCESSING")
    producer.publish({"job_id": job["job_id"], "action": "cancel"})
    final = events.wait_terminal(job["job_id"], timeout=60)
    assert final["data"]["status"] == "STOPPED"
    assert final["data"]["stopped_reason"] == "USER_ACTION"


def test_auto_start_false_rests_after_analysis_until_start(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker()
    job = stack.payload(GEOTIFF)
    job["auto_start"] = False
    producer.publish(job)
    events.wait_for(lambda: "ANALYSIS_DONE" in events.statuses(job["job_id"]), 60, "analysis")
    resting = [
        e for e in events.for_job(job["job_id"]) if e["data"].get("status") == "ANALYSIS_DONE"
    ]
    events.pump(2.0)
    assert events.terminal(job["job_id"]) is None  # resting is not an end
    assert resting[-1]["data"]["tiles"]["total"] >= 1  # the manifest's tile count
    producer.publish({"job_id": job["job_id"], "action": "start"})
    assert events.wait_terminal(job["job_id"], timeout=60)["data"]["status"] == "DONE"


def test_adopting_an_existing_batch_request(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    from worker.api.client import BatchClient

    client = BatchClient(
        batch_url=stack.simulator.url + "/api/v2/batch",
        token_url=stack.simulator.token_url,
        client_id="test-client",
        client_secret=CLIENT_SECRET,
    )
    task = client.create(stack.payload(GEOTIFF)["request"])
    client.close()
    start_worker(adopt_foreign="true")  # the request is not the fleet's own
    producer.publish({"job_id": "adopted-1", "batch_request_id": task.id})
    final = events.wait_terminal("adopted-1", timeout=60)
    assert final["data"]["status"] == "DONE"
    assert final["data"]["batch_request_id"] == task.id


def test_adopting_a_request_that_does_not_exist_fails_upstream_not_found(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker(adopt_foreign="true")  # else refused at intake: no job of the fleet made it
    producer.publish(
        {"job_id": "ghost-1", "batch_request_id": "00000000-0000-4000-8000-000000000000"}
    )
    final = events.wait_terminal("ghost-1", timeout=60)
    assert final["data"]["status"] == "FAILED"
    assert final["data"]["error"]["code"] == "UPSTREAM_NOT_FOUND"


def test_deadline_stops_the_job(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    stack.simulator.configure(speed=20.0)
    start_worker()
    job = stack.payload(GEOTIFF, features=6)
    job["deadline"] = (datetime.now(UTC) + timedelta(seconds=6)).isoformat()
    producer.publish(job)
    final = events.wait_terminal(job["job_id"], timeout=60)
    assert final["data"]["status"] == "STOPPED"
    assert final["data"]["stopped_reason"] == "DEADLINE"


def test_cost_cap_stops_the_job(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    stack.simulator.configure(speed=20.0)
    start_worker()
    job = stack.payload(GEOTIFF, features=6)
    job["max_cost_pu"] = 1.0
    producer.publish(job)
    final = events.wait_terminal(job["job_id"], timeout=90)
    assert final["data"]["status"] == "STOPPED"
    assert final["data"]["stopped_reason"] == "COST_LIMIT"
    assert final["data"]["cost_pu"] > 1.0
