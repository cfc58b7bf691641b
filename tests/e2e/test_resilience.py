"""Crashes, signals, restarts and a fleet: every accepted job ends exactly once."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.conftest import (
    Events,
    Producer,
    Stack,
    WorkerProcess,
    free_port,
    read_events,
)
from worker.lifecycle import tag_for

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
GEOTIFF = "max-ndvi-geotiff.json"
ZARR = "max-ndvi-zarr.json"


def terminal_ids(events: Events, job_id: str) -> set[str]:
    return {
        e["id"]
        for e in events.received
        if e.get("subject") == job_id
        and e["type"] == "batchworker.job.status"
        and e["data"]["status"] in {"DONE", "FAILED", "STOPPED"}
    }


def assert_no_forks(events: Events) -> None:
    """Two events with one id (a re-publish) must say the same thing: had two workers stepped
    one job at once, the same sequence would carry different states."""
    by_id: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
    for event in events.received:
        data = event["data"]
        by_id[event["id"]].add((data.get("status"), data.get("sequence")))
    forked = {event_id: seen for event_id, seen in by_id.items() if len(seen) > 1}
    assert not forked, forked


def tagged_requests(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    tag = tag_for(stack.names.settings()["fleet_id"], job_id)
    return [t for t in stack.upstream_requests() if tag in (t["request"].get("description") or "")]


def test_sigterm_exits_zero_within_the_grace_period_and_hands_jobs_back(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    stack.simulator.configure(speed=20.0)  # processing 4 features takes about 10 s
    worker = start_worker(grace_period=10)
    job = stack.payload(GEOTIFF, features=4)
    producer.publish(job)
    events.wait_for(lambda: "PROCESSING" in events.statuses(job["job_id"]), 60, "PROCESSING")
    worker.signal(signal.SIGTERM)
    # A bound, not a speed claim: the contract says exit within GRACE_PERIOD.
    assert worker.wait(timeout=15) == 0
    start_worker()
    final = events.wait_terminal(job["job_id"], timeout=60)
    assert final["data"]["status"] == "DONE"
    assert len(terminal_ids(events, job["job_id"])) == 1


def test_sigkill_during_intake_and_processing_loses_nothing(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    stack.simulator.configure(speed=50.0)
    worker = start_worker()
    jobs = [stack.payload(GEOTIFF if n % 2 else ZARR, features=3) for n in range(12)]
    for job in jobs[:6]:
        producer.publish(job)
    events.wait_for(
        lambda: any("PROCESSING" in events.statuses(j["job_id"]) for j in jobs[:6]),
        60,
        "some job processing",
    )
    for job in jobs[6:]:
        producer.publish(job)
    worker.kill()  # mid-intake of the second half, mid-processing of the first
    start_worker()
    for job in jobs:
        final = events.wait_terminal(job["job_id"], timeout=120)
        assert final["data"]["status"] == "DONE", final
        assert len(terminal_ids(events, job["job_id"])) == 1
        assert len(tagged_requests(stack, job["job_id"])) == 1
    assert_no_forks(events)


def test_sigkill_right_after_create_while_the_list_lags_still_one_batch_request(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    # The create's answer is held back (latency) and new requests stay out of the list for a
    # while (list lag): the worker is killed after the API created the request but before the
    # worker could record its id. The restarted worker must find it, not create another.
    stack.simulator.configure(latency=3.0, list_lag=4.0)
    worker = start_worker(list_lag_window=8)
    job = stack.payload(GEOTIFF)
    producer.publish(job)
    deadline = time.monotonic() + 30
    while not tagged_requests_raw(stack, job["job_id"]):
        assert time.monotonic() < deadline, "the create never reached the simulator"
        time.sleep(0.1)
    worker.kill()
    stack.simulator.configure(latency=0.0)
    start_worker(list_lag_window=8)
    final = events.wait_terminal(job["job_id"], timeout=90)
    assert final["data"]["status"] == "DONE"
    assert len(tagged_requests_raw(stack, job["job_id"])) == 1


def tagged_requests_raw(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    """Like tagged_requests, but reads the simulator's own state (the list lags on purpose)."""
    tag = tag_for(stack.names.settings()["fleet_id"], job_id)
    jobs = list(stack.simulator.simulator.store.order)  # a list copy is atomic
    return [
        {"id": job.id, "request": job.request}
        for job in jobs
        if tag in (job.request.get("description") or "")
    ]


@pytest.mark.serial  # restarts the shared broker: nothing else may run meanwhile
def test_broker_restart_reconnects_and_finishes(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    stack.simulator.configure(speed=20.0)
    port = free_port()
    worker = start_worker(metrics_port=port)
    job = stack.payload(GEOTIFF, features=4)
    producer.publish(job)
    events.wait_for(lambda: "PROCESSING" in events.statuses(job["job_id"]), 60, "PROCESSING")
    assert probe(port, "/readyz") == 200
    subprocess.run(["rabbitmqctl", "stop_app"], check=True, capture_output=True, timeout=60)
    try:
        # Not ready while the broker is away, but alive: a restart would not bring it back.
        wait_until(lambda: probe(port, "/readyz") == 503, 30, "/readyz to turn 503")
        assert probe(port, "/healthz") == 200
    finally:
        subprocess.run(["rabbitmqctl", "start_app"], check=True, capture_output=True, timeout=60)
    wait_until(lambda: probe(port, "/readyz") == 200, 60, "/readyz to recover")
    # Our own reader lost its connection too: read the job's end from a fresh one.
    fresh = read_events(stack)
    producer.publish(job)  # an idempotent re-submit re-publishes the latest status
    final = fresh.wait_terminal(job["job_id"], timeout=90)
    assert final["data"]["status"] == "DONE"
    assert worker.process.poll() is None


def probe(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_two_workers_on_one_queue_never_work_one_job_at_once(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    stack.simulator.configure(speed=100.0)
    start_worker(worker_name="worker-a")
    start_worker(worker_name="worker-b")
    jobs = [stack.payload(GEOTIFF if n % 2 else ZARR, features=3) for n in range(16)]
    for job in jobs:
        producer.publish(job)
    for job in jobs:
        final = events.wait_terminal(job["job_id"], timeout=120)
        assert final["data"]["status"] == "DONE"
        assert len(terminal_ids(events, job["job_id"])) == 1
        assert len(tagged_requests(stack, job["job_id"])) == 1
    assert_no_forks(events)


def _log_entries(worker: WorkerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]


def test_two_workers_on_one_host_name_themselves_apart(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    """Without WORKER_NAME (the chart sets the pod name), on one host: two names, each on
    its own process's events and on every line of its log."""
    workers = [start_worker(), start_worker()]
    jobs = [stack.payload(GEOTIFF, features=2) for _ in range(4)]
    for job in jobs:
        producer.publish(job)
    for job in jobs:
        events.wait_terminal(job["job_id"], timeout=120)

    def started(worker: WorkerProcess) -> list[str]:
        return [
            e["worker"] for e in _log_entries(worker) if e["message"] == "batch-worker starting"
        ]

    wait_until(lambda: all(started(w) for w in workers), 60, "both workers to start")
    names = [started(w)[0] for w in workers]
    assert names[0] != names[1]
    assert {e["data"]["worker"] for e in events.received} <= set(names)
    for worker, name in zip(workers, names, strict=True):
        assert {e.get("worker") for e in _log_entries(worker)} == {name}
