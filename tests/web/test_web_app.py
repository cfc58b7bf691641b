"""The status API against the whole product: worker processes, RabbitMQ, PostgreSQL, the
simulator and the S3 emulator. Every answer is held to the API's own OpenAPI document."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import requests

pytest.register_assert_rewrite("tests.web.web_support")

from tests.cli_support import Events, Producer, Stack, WorkerProcess, run_cli  # noqa: E402
from tests.e2e.conftest import free_port  # noqa: E402
from tests.web.web_support import conforms, get, web_server  # noqa: E402

pytest_plugins = ("tests.cli_support",)
pytestmark = [pytest.mark.integration, pytest.mark.slow]

StartWorker = Callable[..., WorkerProcess]
# The simulator's features of the Corsica examples, in WGS 84 (lon, lat), with a margin.
CORSICA = (7.5, 40.5, 10.5, 44.0)


def _inside(ring: list[list[float]]) -> bool:
    return all(
        CORSICA[0] <= lon <= CORSICA[2] and CORSICA[1] <= lat <= CORSICA[3] for lon, lat in ring
    )


def test_jobs_events_and_features_as_the_document_says(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker()
    done = stack.payload("max-ndvi-geotiff.json", features=6)
    done["request"]["description"] += " [sim:fatal=2]"
    failed = stack.payload("max-ndvi-zarr.json", features=2)
    failed["request"]["description"] += " [sim:fail-analysis]"
    for job in (done, failed):
        producer.publish(job)
    final = events.wait_terminal(done["job_id"], timeout=120)
    events.wait_terminal(failed["job_id"], timeout=120)
    assert final["data"]["status"] == "DONE"

    with web_server(stack) as server:
        from openapi_spec_validator import validate

        document = get(server, "/api/openapi.json").json()
        validate(document)

        listed = conforms(get(server, "/api/v1/jobs").json(), "JobList")
        assert listed["total"] == 2 and listed["next_offset"] is None
        assert {job["job_id"] for job in listed["jobs"]} == {done["job_id"], failed["job_id"]}

        only_done = get(server, "/api/v1/jobs", params={"status": "DONE"}).json()
        assert [job["job_id"] for job in only_done["jobs"]] == [done["job_id"]]
        by_text = get(server, "/api/v1/jobs", params={"q": failed["job_id"][-6:].upper()}).json()
        assert [job["job_id"] for job in by_text["jobs"]] == [failed["job_id"]]
        later = get(server, "/api/v1/jobs", params={"since": "2999-01-01T00:00:00Z"}).json()
        assert later["jobs"] == [] and later["total"] == 0
        first = get(server, "/api/v1/jobs", params={"limit": 1}).json()
        assert len(first["jobs"]) == 1 and first["total"] == 2 and first["next_offset"] == 1
        second = get(server, "/api/v1/jobs", params={"limit": 1, "offset": 1}).json()
        assert {first["jobs"][0]["job_id"], second["jobs"][0]["job_id"]} == {
            done["job_id"],
            failed["job_id"],
        }

        detail = conforms(get(server, f"/api/v1/jobs/{done['job_id']}").json(), "JobDetail")
        assert detail["status"] == "DONE"
        assert detail["batch_requests"] == [
            {"id": final["data"]["batch_request_id"], "role": "job"}
        ]
        assert detail["tiles"] == final["data"]["tiles"]
        assert detail["cost_pu"] == final["data"]["cost_pu"]
        # The whole history: every event the job published, in sequence order, none more.
        published = [event["id"] for event in events.for_job(done["job_id"])]
        kept = [event["id"] for event in detail["events"]]
        assert sorted(kept) == sorted(published)
        sequences = [e["data"]["sequence"] for e in detail["events"] if "sequence" in e["data"]]
        assert sequences == sorted(sequences)

        features = conforms(
            get(server, f"/api/v1/jobs/{done['job_id']}/features").json(), "FeatureCollection"
        )
        assert features["counts"] == {"DONE": 4, "FATAL": 2, "PENDING": 0}
        assert len(features["features"]) == 6
        assert final["data"]["tiles"] == {"total": 6, "processed": 4, "failed": 2}
        rings = [f["geometry"]["coordinates"][0] for f in features["features"]]
        assert all(_inside(ring) for ring in rings), rings[:2]
        assert features["delivery"]["base"].startswith(f"s3://{stack.bucket}/")
        assert all(f["properties"]["paths"] for f in features["features"])
        assert features["problems"] == []

        never = get(server, f"/api/v1/jobs/{failed['job_id']}/features").json()
        assert never["features"] == [] and never["problems"]

        overview = conforms(get(server, "/api/v1/fleet").json(), "FleetOverview")
        assert overview["jobs"] == 2
        assert overview["by_status"]["DONE"]["jobs"] == 1
        assert overview["by_status"]["FAILED"]["jobs"] == 1
        assert [job["job_id"] for job in overview["failing"]] == [failed["job_id"]]
        assert overview["tiles"]["failed"] == 2

        missing = get(server, "/api/v1/jobs/never-submitted")
        assert missing.status_code == 404
        assert conforms(missing.json(), "Error")["error"]["code"] == "NO_SUCH_JOB"
        bad = get(server, "/api/v1/jobs", params={"since": "yesterday"})
        assert bad.status_code == 400 and "since" in bad.json()["error"]["message"]
        conforms(get(server, "/api/v1/config").json(), "Config")


def test_credentials_are_asked_for_and_never_answered(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    secret_key = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYWEBKEY"
    start_worker()
    job = stack.payload("max-ndvi-zarr.json", features=2)
    job["request"]["output"]["delivery"]["s3"] = {
        "url": job["request"]["output"]["delivery"]["s3"]["url"],
        "accessKey": "AKIAIOSFODNN7WEBTEST",
        "secretAccessKey": secret_key,
    }
    producer.publish(job)
    assert events.wait_terminal(job["job_id"], timeout=120)["data"]["status"] == "DONE"

    token = "api-token-0123456789abcdef"
    with web_server(stack, web_token=token) as server:
        path = f"/api/v1/jobs/{job['job_id']}"
        assert get(server, path).status_code == 401
        wrong = get(server, path, headers={"Authorization": "Bearer not-it"})
        assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"].startswith("Bearer")
        assert get(server, "/api/openapi.json").status_code == 200  # the document holds no data
        bearer = {"Authorization": f"Bearer {token}"}
        answers = [
            get(server, p, headers=bearer)
            for p in (path, f"{path}/features", "/api/v1/jobs", "/api/v1/fleet")
        ]
        assert [answer.status_code for answer in answers] == [200, 200, 200, 200]
        text = "".join(answer.text for answer in answers)
        assert secret_key not in text and "AKIAIOSFODNN7WEBTEST" not in text
        assert token not in text
        detail = answers[0].json()
        # Masked, or gone: the worker drops a create's credentials once the request exists.
        assert detail["request"]["output"]["delivery"]["s3"].get("secretAccessKey", "***") == "***"
        collection = json.loads(answers[1].text)
        assert collection["counts"]["DONE"] == 2, collection["problems"]

    with web_server(stack, web_basic_auth="ops:pass-word") as server:
        good = base64.b64encode(b"ops:pass-word").decode()
        bad = base64.b64encode(b"ops:guess").decode()
        assert get(server, "/api/v1/jobs", headers={"Authorization": f"Basic {good}"}).ok
        refused = get(server, "/api/v1/jobs", headers={"Authorization": f"Basic {bad}"})
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Basic")


def _wait_healthy(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            if requests.get(url + "healthz", timeout=5).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError("batch-worker web did not answer within 60 s")


def test_the_web_command_serves_until_sigterm_and_refuses_a_taken_port(stack: Stack) -> None:
    port = free_port()
    env = stack.env(WEB_PORT=port, LOG_FORMAT="text")
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "web"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_healthy(url, process)
        # No worker has made the tables yet: no job, not an error.
        answer = requests.get(url + "api/v1/jobs", timeout=10)
        assert answer.status_code == 200 and answer.json()["total"] == 0
        assert requests.get(url, timeout=10).status_code == 200

        taken = run_cli("web", env=env)
        assert taken.returncode == 2, taken.stderr
        assert f"cannot listen on 127.0.0.1:{port}" in taken.stderr
        assert "Traceback" not in taken.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        output, errors = process.communicate(timeout=30)
    assert process.returncode == 0, errors
    assert f"status API and pages at {url}" in output + errors
