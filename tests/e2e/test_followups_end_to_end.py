"""Re-runs of FATAL features end to end: worker processes, RabbitMQ, PostgreSQL, the
simulator writing to the S3 emulator; crashes included."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import boto3
import pytest

from tests.e2e.conftest import Events, Producer, Stack, WorkerProcess
from worker.lifecycle import attempt_tag, tag_for

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
GEOTIFF = "max-ndvi-geotiff.json"


def retrying_job(stack: Stack, markers: str) -> dict[str, Any]:
    job = stack.payload(GEOTIFF)
    job["request"]["description"] += markers
    job["retry_failed"] = 1
    return job


def requests_tagged(stack: Stack, tag: str) -> list[dict[str, Any]]:
    return [t for t in stack.upstream_requests() if tag in (t["request"].get("description") or "")]


def retry_inputs(stack: Stack) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=stack.bucket)
    return [o["Key"] for o in listing.get("Contents", []) if "failedFeatures-" in o["Key"]]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, events: Events) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; events: {events.summary()}")
        events.pump(0.1)


def assert_recovered(stack: Stack, events: Events, job: dict[str, Any]) -> dict[str, Any]:
    job_id = job["job_id"]
    fleet = stack.names.settings()["fleet_id"]
    final = events.wait_terminal(job_id, timeout=180)
    data = final["data"]
    terminal = [
        e
        for e in events.for_job(job_id)
        if e["type"] == "batchworker.job.status"
        and e["data"]["status"] in {"DONE", "FAILED", "STOPPED"}
    ]
    assert len(terminal) == 1 and data["status"] == "DONE", events.summary()
    first = requests_tagged(stack, tag_for(fleet, job_id))
    follow = requests_tagged(stack, attempt_tag(fleet, job_id, 1))
    assert len(first) == 1 and len(follow) == 1  # exactly one follow-up for the attempt
    assert data["attempt"] == 1 and data["batch_request_id"] == follow[0]["id"]
    assert [(r["batch_request_id"], r["attempt"]) for r in data["batch_requests"]] == [
        (first[0]["id"], 0),
        (follow[0]["id"], 1),
    ]
    # Features, not requests: the three FATAL ones re-ran and are processed now.
    tiles = data["tiles"]
    assert tiles["failed"] == 0 and tiles["processed"] == tiles["total"] > 3
    assert data["batch_requests"][0]["failed"] == 3 and data["batch_requests"][1]["features"] == 3
    assert data["cost_pu"] == pytest.approx(first[0]["costPU"] + follow[0]["costPU"])
    # The follow-up wrote to the first request's paths, over a GeoPackage in the bucket.
    url = follow[0]["request"]["output"]["delivery"]["s3"]["url"]
    assert url == f"s3://{stack.bucket}/{first[0]['id']}/<tileName>/<outputId>.<format>"
    assert follow[0]["request"]["output"]["overwrite"] is True
    assert retry_inputs(stack) == [f"{first[0]['id']}/failedFeatures-{first[0]['id']}.gpkg"]
    names = [
        e["data"]["batch_request_id"]
        for e in events.for_job(job_id)
        if e["type"] == "batchworker.job.progress"
    ]
    assert follow[0]["id"] in names  # a progress event named the follow-up
    return data


def test_fatal_features_are_recovered_by_one_follow_up(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker()
    job = retrying_job(stack, " [sim:fatal=3]")
    producer.publish(job)
    assert_recovered(stack, events, job)


def test_sigkill_while_the_follow_up_is_made_still_makes_one(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    """Killed once the follow-up's GeoPackage is in the bucket: creates are answered late
    (the request exists first), so the kill comes after writing the GeoPackage and before
    the follow-up is saved, whether or not its POST has landed (it nearly always has: the
    next worker finds it by the attempt's tag). Killed again once the follow-up exists.
    One follow-up all the same, and one end."""
    fleet = stack.names.settings()["fleet_id"]
    worker = start_worker()
    job = retrying_job(stack, " [sim:fatal=3]")
    follow_tag = attempt_tag(fleet, job["job_id"], 1)
    producer.publish(job)
    wait_until(
        lambda: requests_tagged(stack, tag_for(fleet, job["job_id"])) != [],
        60,
        "the first request",
        events,
    )
    # Every create now waits before it answers: the request exists first (as on a slow link).
    # Short enough that the simulator's shutdown does not wait long on the one left hanging.
    stack.simulator.configure(create_answer_delay=15.0)
    wait_until(lambda: retry_inputs(stack) != [], 120, "the follow-up's GeoPackage", events)
    worker.kill()
    assert events.terminal(job["job_id"]) is None

    worker = start_worker()  # takes the job once the dead worker's lease runs out
    wait_until(lambda: requests_tagged(stack, follow_tag) != [], 120, "the follow-up", events)
    worker.kill()  # its POST landed; its answer (and so its save) never came
    assert events.terminal(job["job_id"]) is None

    stack.simulator.configure(create_answer_delay=0.0)
    worker = start_worker()
    data = assert_recovered(stack, events, job)
    assert data["status"] == "DONE"


def test_a_follow_up_stopped_unhealthy_pauses_resumes_and_the_job_ends_once(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    """Only the follow-up meets the service's trouble: the simulator stops every request
    made while its UNHEALTHY rate is 1 (decided at create), which is the follow-up's."""
    fleet = stack.names.settings()["fleet_id"]
    stack.simulator.configure(restart_block=400.0)  # 2 s at the simulator's speed
    start_worker(restart_block="2.5", restart_jitter="0.5")
    job = retrying_job(stack, " [sim:fatal=3]")
    job["resume_on"] = {"UNHEALTHY": {"attempts": 1}}
    job_id = job["job_id"]
    producer.publish(job)
    wait_until(
        lambda: requests_tagged(stack, tag_for(fleet, job_id)) != [], 60, "the first", events
    )
    stack.simulator.configure(rate_unhealthy=1.0)
    follow_tag = attempt_tag(fleet, job_id, 1)
    wait_until(lambda: requests_tagged(stack, follow_tag) != [], 120, "the follow-up", events)
    stack.simulator.configure(rate_unhealthy=0.0)
    data = assert_recovered(stack, events, job)  # one end, DONE, every feature processed
    [first] = requests_tagged(stack, tag_for(fleet, job_id))
    [follow] = requests_tagged(stack, follow_tag)  # the same follow-up, started again
    assert first.get("stoppedStatusReason") is None
    assert data["resumes"] == 1
    job_statuses = [
        e["data"] for e in events.for_job(job_id) if e["type"] == "batchworker.job.status"
    ]
    [paused] = [d for d in job_statuses if d["status"] == "PAUSED"]
    assert (paused["batch_request_id"], paused["attempt"]) == (follow["id"], 1)
    assert paused["final"] is False and paused["stopped_reason"] == "UNHEALTHY"
    # Features, not requests, while paused too: the follow-up stopped before any of its
    # three (30 % of them) was DONE, so they are still the job's failed ones.
    total = data["tiles"]["total"]
    assert paused["tiles"] == {"total": total, "processed": total - 3, "failed": 3}
    statuses = [d["status"] for d in job_statuses]
    assert statuses[statuses.index("PAUSED") + 1 :] == ["PROCESSING", "DONE"]


def test_a_duplicate_of_a_follow_up_is_found_by_its_attempt_tag_and_stopped(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    """A second request carrying the follow-up's tag (what a lost create answer and a
    lagging list can make): the duplicate sweeps look for the attempt's tag too."""

    fleet = stack.names.settings()["fleet_id"]
    start_worker()
    job = retrying_job(stack, " [sim:fatal=3]")
    job_id = job["job_id"]
    follow_tag = attempt_tag(fleet, job_id, 1)
    producer.publish(job)
    wait_until(lambda: retry_inputs(stack) != [], 120, "the follow-up's GeoPackage", events)
    # The follow-up (made after its GeoPackage) runs long enough to meet the duplicate.
    stack.simulator.configure(speed=20.0)
    wait_until(lambda: requests_tagged(stack, follow_tag) != [], 60, "the follow-up", events)
    [follow] = requests_tagged(stack, follow_tag)
    copy = dict(follow["request"], description=f"copy {follow_tag}")
    with stack.api_client() as client:
        duplicate = client.create(copy)
        client.start(duplicate.id)
    data = events.wait_terminal(job_id, timeout=180)["data"]
    assert data["status"] == "DONE" and data["batch_request_id"] == follow["id"]
    assert duplicate.id in data["duplicates_stopped"]
    assert duplicate.id not in [r["batch_request_id"] for r in data["batch_requests"]]
    stopped = next(t for t in stack.upstream_requests() if t["id"] == duplicate.id)
    assert stopped["userAction"] == "STOP"
    terminal = [s for s in events.statuses(job_id) if s in {"DONE", "FAILED", "STOPPED"}]
    assert terminal == ["DONE"]
