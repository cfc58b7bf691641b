"""The cost guard end to end: worker processes, RabbitMQ, PostgreSQL, the simulator, S3."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.conftest import Events, Producer, Stack, WorkerProcess
from worker.lifecycle import tag_for

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
CAP = 300.0


def costly(stack: Stack, guard: str) -> dict[str, Any]:
    """A job that would cost 3x its cap. 300 features process for ~30 s at the stack's
    speed (a poll every ~2 % of completion), but the cost is the marker's."""
    job = stack.payload("max-ndvi-geotiff.json", features=300)
    job["request"]["description"] += f" [sim:cost={int(3 * CAP)}]"
    job.update(max_cost_pu=CAP, cost_guard=guard)
    return job


def test_a_job_forecast_at_three_times_its_cap_is_stopped_having_spent_under_half(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker()
    forecast, spent = costly(stack, "forecast"), costly(stack, "spent")
    producer.publish(forecast)
    producer.publish(spent)

    final = events.wait_terminal(forecast["job_id"], timeout=120)
    data = final["data"]
    assert (data["status"], data["stopped_reason"]) == ("STOPPED", "COST_FORECAST")
    assert 0 < data["cost_pu"] <= CAP / 2
    # The progress that decided it carried the forecast: the whole cost, made from 5 % on.
    made = [
        e["data"]
        for e in events.for_job(forecast["job_id"])
        if e["data"].get("cost_forecast_pu") is not None
    ]
    assert made, events.summary()
    first = made[0]
    assert first["cost_forecast"]["method"] == "linear"
    assert first["cost_forecast"]["at_completion"] >= 5.0
    assert first["cost_forecast_pu"] == pytest.approx(3 * CAP, rel=0.02)

    # The same job held only to its spend runs until it has spent its cap.
    final = events.wait_terminal(spent["job_id"], timeout=180)
    data = final["data"]
    assert (data["status"], data["stopped_reason"]) == ("STOPPED", "COST_LIMIT")
    assert data["cost_pu"] > CAP
    assert data["cost_forecast_pu"] == pytest.approx(3 * CAP, rel=0.02)  # told, not acted on

    upstream = stack.upstream_requests()
    fleet = stack.names.settings()["fleet_id"]
    for job in (forecast, spent):
        tag = tag_for(fleet, job["job_id"])
        (task,) = [t for t in upstream if tag in (t["request"].get("description") or "")]
        assert task["status"] == "STOPPED"
