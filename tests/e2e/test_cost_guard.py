"""The cost guard end to end: worker processes, RabbitMQ, PostgreSQL, the simulator, S3."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.e2e.conftest import Events, Producer, Stack, WorkerProcess, free_port
from tests.e2e.test_lifecycle_end_to_end import _metric
from worker.lifecycle import tag_for
from worker.store import jobs

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
    # The progress that decided it carried the forecast: the whole cost, made from 5 % on
    # (before, the events carried the bound known before START: the 100 PU minimum).
    told = [
        e["data"]
        for e in events.for_job(forecast["job_id"])
        if e["type"] != "batchworker.command.accepted"
    ]
    assert told[0]["cost_forecast"] is None  # CREATED: nothing known yet
    made = [d for d in told if (d["cost_forecast"] or {}).get("method") == "linear"]
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

    for job in (forecast, spent):
        (task,) = _tagged(stack, job["job_id"])
        assert task["status"] == "STOPPED"


def test_an_auto_start_job_whose_bound_exceeds_its_cap_rests_analysed_until_started(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    port = free_port()
    start_worker(metrics_port=port)
    # 300 GeoPackage features of 1000 x 1000 px: at least 127.2 PU by the documented rules
    # at their cheapest (the simulator bills 381.5), against a cap of 120.
    job = stack.payload("geopackage-fields.json", features=300)
    job.update(max_cost_pu=120.0, cost_guard="forecast")
    producer.publish(job)

    def analysed() -> bool:
        return "ANALYSIS_DONE" in events.statuses(job["job_id"])

    events.wait_for(analysed, 90, "ANALYSIS_DONE")
    (event,) = [
        e["data"]
        for e in events.for_job(job["job_id"])
        if e["type"] == "batchworker.job.status" and e["data"]["status"] == "ANALYSIS_DONE"
    ]
    assert event["cost_forecast"] == {"method": "manifest", "at_completion": 0.0}
    assert event["cost_forecast_pu"] == pytest.approx(127.157, abs=1e-3)
    assert event["tiles"]["total"] == 300
    # Decided in the step that published it: resting, as with auto_start false.
    with psycopg.connect(stack.database_url) as conn:
        found = jobs.get_job(conn, stack.names.settings()["fleet_id"], job["job_id"])
    assert found is not None
    assert (found.state.cost_held, found.state.start_wanted) == (True, False)
    (task,) = _tagged(stack, job["job_id"])
    assert (task["status"], task["userAction"]) == ("ANALYSIS_DONE", "ANALYSE")
    events.wait_for(
        lambda: _metric(port, "batch_worker_starts_withheld_total") == 1, 30, "the metric"
    )

    # The producer's start is its decision; the forecast guard still holds.
    producer.publish({"job_id": job["job_id"], "action": "start"})
    final = events.wait_terminal(job["job_id"], timeout=120)
    data = final["data"]
    assert (data["status"], data["stopped_reason"]) == ("STOPPED", "COST_FORECAST")
    assert data["cost_pu"] <= 120.0 / 2
    stopped = 'batch_worker_jobs_finished_total{reason="COST_FORECAST",status="STOPPED"'
    events.wait_for(lambda: _metric(port, stopped) == 1, 30, "the finished metric")


def _tagged(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    tag = tag_for(stack.names.settings()["fleet_id"], job_id)
    return [t for t in stack.upstream_requests() if tag in (t["request"].get("description") or "")]
