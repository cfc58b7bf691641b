"""The transient 404 right after create (batch-v2-api.md §3.3), against a worker process and
the simulator's ``not_found_after_create``: the start that answers 404 is sent again within
seconds, not after ACTION_LAG; past the window the job ends UPSTREAM_NOT_FOUND."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.conftest import Events, Producer, Stack, WorkerProcess
from tests.e2e.test_resilience import tagged_requests

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
GEOTIFF = "max-ndvi-geotiff.json"


def sim_stats(stack: Stack) -> dict[str, Any]:
    with urllib.request.urlopen(stack.simulator.url + "/admin/stats", timeout=10) as answer:
        stats: dict[str, Any] = json.load(answer)
    return stats


def test_a_start_answered_404_after_create_is_sent_again_within_seconds(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    # Every new request answers 404 for 3 s. ACTION_LAG is an hour: had the 404'd start
    # counted as sent, the job would sit at CREATED far past this test's wait.
    stack.simulator.configure(not_found_after_create=3.0)
    start_worker(ACTION_LAG="3600", NOT_FOUND_WINDOW="60", NOT_FOUND_RETRIES="0,1,2")
    job = stack.payload(GEOTIFF, features=2)
    producer.publish(job)
    end = events.wait_terminal(job["job_id"], timeout=180)
    assert end["data"]["status"] == "DONE", end
    answered = sim_stats(stack)["requests"]
    assert answered.get("start 404", 0) >= 1, answered  # the window was hit
    assert answered.get("start 204", 0) >= 1, answered  # and the start sent again
    assert len(tagged_requests(stack, job["job_id"])) == 1


def test_past_the_window_the_job_ends_upstream_not_found(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    stack.simulator.configure(not_found_after_create=600.0)  # never found in this test
    start_worker(ACTION_LAG="3600", NOT_FOUND_WINDOW="4", NOT_FOUND_RETRIES="0,1")
    job = stack.payload(GEOTIFF, features=2)
    producer.publish(job)
    end = events.wait_terminal(job["job_id"], timeout=120)
    assert end["data"]["status"] == "FAILED", end
    assert end["data"]["error"]["code"] == "UPSTREAM_NOT_FOUND", end
