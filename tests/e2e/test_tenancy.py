"""Tenancy and credentials end to end: a worker process, RabbitMQ, PostgreSQL, the simulator
and the S3 emulator. Who may adopt which batch request, who may reach which job, and what a
job row keeps of the producer's keys once the job has ended."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from tests.cli_support import run_cli
from tests.e2e.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    Events,
    Producer,
    Stack,
    WorkerProcess,
    dlq_messages,
)

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
GEOTIFF = "max-ndvi-geotiff.json"
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ACCESS = "AKIAIOSFODNN7EXAMPLE"


def rejection(events: Events, job_id: str) -> dict[str, Any]:
    events.wait_for(
        lambda: bool(events.of_type("command.rejected", job_id)), 60, f"{job_id} rejected"
    )
    data: dict[str, Any] = events.of_type("command.rejected", job_id)[0]["data"]
    return data


def job_row_text(stack: Stack, job_id: str) -> str:
    with psycopg.connect(stack.database_url) as conn:
        row = conn.execute(
            "SELECT row_to_json(j)::text FROM bw_jobs j WHERE job_id = %s", (job_id,)
        )
        found = row.fetchone()
    assert found is not None
    return str(found[0])


def test_only_the_fleets_own_requests_are_adopted_and_an_ended_job_keeps_no_key(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    from worker.api.client import BatchClient

    client = BatchClient(
        batch_url=stack.simulator.url + "/api/v2/batch",
        token_url=stack.simulator.token_url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
    )
    foreign = client.create(stack.payload(GEOTIFF)["request"])  # another team's request
    start_worker()

    # A job of the fleet whose delivery is written with S3 keys of the producer's own.
    job = stack.payload(GEOTIFF, features=2)
    s3 = job["request"]["output"]["delivery"]["s3"]
    del s3["iamRoleARN"]
    s3.update(accessKey=ACCESS, secretAccessKey=SECRET)
    producer.publish(job)
    hostile = json.dumps({"job_id": "takeover-1", "batch_request_id": foreign.id}).encode()
    producer.publish(hostile)

    assert rejection(events, "takeover-1")["code"] == "ADOPTION_REFUSED"
    final = events.wait_terminal(job["job_id"], timeout=120)
    assert final["data"]["status"] == "DONE"
    # The ended job's row holds no key (the create sent them, or it would have failed).
    text = job_row_text(stack, job["job_id"])
    assert SECRET not in text and ACCESS not in text
    assert final["data"]["tiles"]["total"] == 2  # read with the worker's own identity

    # A request the fleet created is adopted; the foreign one was never touched.
    producer.publish({"job_id": "rerun-1", "batch_request_id": final["data"]["batch_request_id"]})
    assert events.wait_terminal("rerun-1", timeout=60)["data"]["status"] == "DONE"
    assert client.get(foreign.id).status == "CREATED"  # not analysed, not stopped
    client.close()
    [(properties, body)] = dlq_messages(stack)
    assert body == hostile  # byte for byte
    assert properties.headers["x-batch-worker-reason"] == "ADOPTION_REFUSED"


def test_a_tenant_reaches_only_its_own_jobs(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker(tenants=json.dumps({"team-a": {}, "team-b": {}}))
    job = stack.payload(GEOTIFF, features=2) | {"tenant": "team-a", "auto_start": False}
    job_id = job["job_id"]
    producer.publish(job)
    events.wait_for(lambda: "ANALYSIS_DONE" in events.statuses(job_id), 90, f"{job_id} to rest")
    producer.publish({"job_id": job_id, "action": "cancel", "tenant": "team-b"})
    producer.publish({"job_id": job_id, "action": "cancel"})
    events.wait_for(
        lambda: len(events.of_type("command.rejected", job_id)) == 2, 60, "two rejections"
    )
    codes = [e["data"]["code"] for e in events.of_type("command.rejected", job_id)]
    assert sorted(codes) == ["NOT_JOB_OWNER", "TENANT_REQUIRED"]

    env = stack.env()
    theirs = run_cli("status", job_id, "--tenant", "team-b", env=env)
    assert theirs.returncode == 1 and "no job" in theirs.stderr
    own = run_cli("status", job_id, "--tenant", "team-a", "--json", env=env)
    assert own.returncode == 0, own.stderr
    assert json.loads(own.stdout)["tenant"] == "team-a"

    producer.publish({"job_id": job_id, "action": "cancel", "tenant": "team-a"})
    final = events.wait_terminal(job_id, timeout=90)
    assert final["data"]["status"] == "STOPPED"
    # The job's events carry its tenant; a rejection, its sender's (none included).
    job_events = [e for e in events.for_job(job_id) if e["type"].startswith("batchworker.job.")]
    assert {e["data"]["tenant"] for e in job_events} == {"team-a"}
    assert {e["data"].get("tenant") for e in events.of_type("command.rejected", job_id)} == {
        "team-b",
        None,
    }
