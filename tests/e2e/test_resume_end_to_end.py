"""Resume by policy against the real parts: the simulator's UNHEALTHY and OUT_OF_PU stops,
its restart block, the worker's pause and START, the resume and cancel commands."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.conftest import Events, Producer, Stack, WorkerProcess
from worker.commands.status import job_status
from worker.lifecycle import tag_for

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
GEOTIFF = "max-ndvi-geotiff.json"
# The simulator's block: 400 API seconds at speed 200, 2 s. The worker's is a little longer,
# as a deployment's would be.
RESUME_SETTINGS = {"restart_block": "2.5", "restart_jitter": "0.5"}


def paused_job(
    stack: Stack, marker: str, resume_on: dict[str, Any], *, features: int = 4
) -> dict[str, Any]:
    stack.simulator.configure(restart_block=400.0)
    job = stack.payload(GEOTIFF, features=features)
    job["request"]["description"] += f" {marker}"
    job["resume_on"] = resume_on
    return job


def job_events(events: Events, job_id: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events.for_job(job_id) if e["type"].startswith("batchworker.job.")]


def starts_sent(stack: Stack) -> int:
    stats = dict(stack.simulator.simulator.stats)
    return sum(count for name, count in stats.items() if name.startswith("start "))


def upstream(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    tag = tag_for(stack.names.settings()["fleet_id"], job_id)
    return [t for t in stack.upstream_requests() if tag in (t["request"].get("description") or "")]


def assert_one_final(events: Events, job_id: str) -> dict[str, Any]:
    finals = [d for d in job_events(events, job_id) if d["final"]]
    assert len(finals) == 1
    return finals[0]


def test_an_unhealthy_stop_pauses_and_the_same_request_resumes_to_done(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker(**RESUME_SETTINGS)
    job = paused_job(stack, "[sim:unhealthy]", {"UNHEALTHY": {"attempts": 2}})
    producer.publish(job)
    final = events.wait_terminal(job["job_id"], timeout=120)
    assert final["data"]["status"] == "DONE"
    assert final["data"]["final"] is True and final["data"]["resumes"] == 1
    statuses = events.statuses(job["job_id"])
    assert "PAUSED" in statuses
    # One processing run after the pause, at most: statuses are sampled (events.md), and a
    # restart that continues with the few features left may pass PROCESSING between reads.
    after = statuses[statuses.index("PAUSED") + 1 :]
    assert after.count("PROCESSING") <= 1 and after[-1] == "DONE"
    [paused] = [d for d in job_events(events, job["job_id"]) if d["status"] == "PAUSED"]
    assert paused["final"] is False and paused["stopped_reason"] == "UNHEALTHY"
    assert paused["resume_at"] is not None
    assert assert_one_final(events, job["job_id"]) == final["data"]
    [task] = upstream(stack, job["job_id"])  # the same request, started again
    assert task["status"] == "DONE" and task["id"] == final["data"]["batch_request_id"]
    assert final["data"]["cost_pu"] == task["costPU"]


# [sim:unhealthy] stops a run 30 % of the way through; eight features cost the 100 PU
# minimum of a request (batch-v2-api.md §14), accrued with completion.
FEATURES = 8
RUN_PU = 100.0
STOP_SHARE = 0.30


@pytest.mark.parametrize(
    ("restart_mode", "cost_pu"),
    [
        # START continues with the features not yet DONE: billed once.
        ("continue", RUN_PU),
        # START processes every feature again and bills it again: the stop's share on top.
        ("reprocess", STOP_SHARE * RUN_PU + RUN_PU),
    ],
)
def test_a_resumed_job_ends_with_every_feature_counted_and_its_whole_cost(
    stack: Stack,
    start_worker: StartWorker,
    events: Events,
    producer: Producer,
    restart_mode: str,
    cost_pu: float,
) -> None:
    # The demo's status lag (20 API s at its speed, 1 s): after the resume's START the
    # request still shows STOPPED for longer than the simulator's uploads take.
    stack.simulator.configure(restart_mode=restart_mode, status_lag=200.0)
    start_worker(**RESUME_SETTINGS)
    job = paused_job(stack, "[sim:unhealthy]", {"UNHEALTHY": {"attempts": 2}}, features=FEATURES)
    producer.publish(job)
    final = events.wait_terminal(job["job_id"], timeout=150)["data"]
    assert (final["status"], final["resumes"]) == ("DONE", 1), events.summary()
    assert final["tiles"] == {"total": FEATURES, "processed": FEATURES, "failed": 0}
    [task] = upstream(stack, job["job_id"])
    assert task["costPU"] == pytest.approx(cost_pu)
    assert final["cost_pu"] == pytest.approx(cost_pu)
    assert assert_one_final(events, job["job_id"]) == final


def test_unhealthy_stops_past_the_attempts_end_the_job_stopped(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker(**RESUME_SETTINGS)
    job = paused_job(stack, "[sim:unhealthy=2]", {"UNHEALTHY": {"attempts": 1}})
    producer.publish(job)
    final = events.wait_terminal(job["job_id"], timeout=120)
    assert (final["data"]["status"], final["data"]["stopped_reason"]) == ("STOPPED", "UNHEALTHY")
    assert final["data"]["resumes"] == 1
    assert events.statuses(job["job_id"]).count("PAUSED") == 1
    assert_one_final(events, job["job_id"])


def test_out_of_pu_parks_until_the_resume_command(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker(**RESUME_SETTINGS)
    job = paused_job(stack, "[sim:out-of-pu]", {"OUT_OF_PU": {"until": None}})
    producer.publish(job)
    job_id = job["job_id"]
    events.wait_for(lambda: "PAUSED" in events.statuses(job_id), 90, "PAUSED")
    [paused] = [d for d in job_events(events, job_id) if d["status"] == "PAUSED"]
    assert paused["resume_at"] is None and paused["stopped_reason"] == "OUT_OF_PU"
    # Parked: past the restart block (and many polls) nothing starts it by itself. A wait
    # for something not to happen has to be a wait; it only ever makes this test pass less.
    starts = starts_sent(stack)
    events.pump(4.0)
    assert starts_sent(stack) == starts
    assert events.statuses(job_id)[-1] == "PAUSED"
    status = job_status(stack.settings(), job_id)
    assert status is not None and status["paused"]["reason"] == "OUT_OF_PU"
    assert status["paused"]["resume_at"] is None and status["resumes"] == []
    producer.publish({"job_id": job_id, "action": "resume"})
    final = events.wait_terminal(job_id, timeout=120)
    assert final["data"]["status"] == "DONE" and final["data"]["resumes"] == 1
    accepted = events.of_type("command.accepted", job_id)
    assert [e["data"]["action"] for e in accepted] == ["submit", "resume"]
    assert_one_final(events, job_id)


def test_cancel_of_a_paused_job_ends_it_stopped(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker(**RESUME_SETTINGS)
    job = paused_job(stack, "[sim:out-of-pu]", {"OUT_OF_PU": {"until": None}})
    producer.publish(job)
    job_id = job["job_id"]
    events.wait_for(lambda: "PAUSED" in events.statuses(job_id), 90, "PAUSED")
    starts = starts_sent(stack)
    producer.publish({"job_id": job_id, "action": "cancel"})
    final = events.wait_terminal(job_id, timeout=60)
    assert (final["data"]["status"], final["data"]["stopped_reason"]) == ("STOPPED", "USER_ACTION")
    assert final["data"]["resumes"] == 0 and starts_sent(stack) == starts
    assert_one_final(events, job_id)
    [task] = upstream(stack, job_id)
    assert (task["status"], task["stoppedStatusReason"]) == ("STOPPED", "OUT_OF_PU")
