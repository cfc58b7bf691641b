"""``python -m worker submit``: a producer on the command line, against the real stack."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pika
import pytest

pytest.register_assert_rewrite("tests.cli_support")

from tests.cli_support import (  # noqa: E402
    Events,
    Stack,
    WorkerProcess,
    run_cli,
    take_all,
    write_job,
)

# The e2e harness's fixtures (stack, start_worker, events, ...), through cli_support.
pytest_plugins = ("tests.cli_support",)
pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
GEOTIFF = "max-ndvi-geotiff.json"


def _queued(stack: Stack) -> list[tuple[pika.BasicProperties, bytes]]:
    """What waits in the jobs queue (taken off it)."""
    return take_all(stack, stack.names.jobs_queue)


def _summary_row(stdout: str, job_id: str) -> str:
    rows = [line for line in stdout.splitlines() if job_id in line and "│" in line]
    assert len(rows) == 1, stdout
    return rows[0]


def test_submit_publishes_the_file_as_is_persistent_and_exits_0(
    stack: Stack, tmp_path: Path
) -> None:
    job = stack.payload(GEOTIFF)
    path = write_job(tmp_path, job)
    result = run_cli("submit", str(path), env=stack.env())
    assert result.returncode == 0, result.stderr
    assert f"published submit of job {job['job_id']}" in result.stderr
    assert result.stdout == ""
    [(properties, body)] = _queued(stack)
    assert body == path.read_bytes()
    assert properties.content_type == "application/json"
    assert properties.delivery_mode == 2
    assert properties.message_id and properties.message_id in result.stderr


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"{not json", "MALFORMED_JSON"),
        (b'{"job_id": "has spaces", "request": {}}', "INVALID_JOB_ID"),
        (b'{"job_id": "j-1"}', "MISSING_REQUEST"),
        (b'{"job_id": "j-1", "action": "explode"}', "UNKNOWN_ACTION"),
    ],
)
def test_an_invalid_job_file_exits_2_with_the_reason_and_publishes_nothing(
    stack: Stack, tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    result = run_cli("submit", str(path), env=stack.env())
    assert result.returncode == 2
    assert reason in result.stderr
    assert "Traceback" not in result.stderr
    assert _queued(stack) == []


def test_a_missing_job_file_exits_2(stack: Stack, tmp_path: Path) -> None:
    result = run_cli("submit", str(tmp_path / "absent.json"), env=stack.env())
    assert result.returncode == 2
    assert "cannot read" in result.stderr and "absent.json" in result.stderr


def test_submit_without_the_jobs_queue_says_so_and_exits_1(stack: Stack, tmp_path: Path) -> None:
    path = write_job(tmp_path, stack.payload(GEOTIFF))
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    result = run_cli("submit", str(path), env=stack.env(jobs_queue=missing))
    assert result.returncode == 1
    assert f"no queue {missing!r}" in result.stderr
    assert "Traceback" not in result.stderr


def test_submit_with_the_broker_unreachable_exits_1_without_the_password(
    stack: Stack, tmp_path: Path
) -> None:
    path = write_job(tmp_path, stack.payload(GEOTIFF))
    env = stack.env(broker_url="amqp://guest:pw-Zq81x@127.0.0.1:1//")
    result = run_cli("submit", str(path), env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        'submit: not published: cannot reach RabbitMQ at 127.0.0.1:1 vhost "/" (no TLS):'
        " [Errno 111] Connection refused"
    )
    assert "pw-Zq81x" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_wait_follows_a_job_to_done_and_a_conflicting_resubmit_to_rejected(
    stack: Stack, start_worker: StartWorker, tmp_path: Path
) -> None:
    start_worker()
    job = stack.payload(GEOTIFF, features=2)
    path = write_job(tmp_path, job)
    done = run_cli("submit", str(path), "--wait", "--timeout", "90", env=stack.env(), timeout=120)
    assert done.returncode == 0, done.stderr
    row = _summary_row(done.stdout, job["job_id"])
    assert "DONE" in row
    assert "2/0/2" in row  # tiles done/failed/total from the delivery bucket

    job["request"]["description"] = "a different request under the same job id"
    conflict = run_cli(
        "submit", str(write_job(tmp_path, job, "conflict.json")), "--wait", env=stack.env()
    )
    assert conflict.returncode == 1, conflict.stderr
    assert "REJECTED" in _summary_row(conflict.stdout, job["job_id"])
    assert "JOB_CONFLICT" in conflict.stderr


def test_wait_exits_1_when_the_job_fails(
    stack: Stack, start_worker: StartWorker, tmp_path: Path
) -> None:
    start_worker()
    job = stack.payload(GEOTIFF, features=2)
    job["request"]["description"] += " [sim:fail-analysis]"
    result = run_cli(
        "submit", str(write_job(tmp_path, job)), "--wait", "--timeout", "90", env=stack.env()
    )
    assert result.returncode == 1, result.stderr
    assert "FAILED" in _summary_row(result.stdout, job["job_id"])


def test_wait_stops_at_analysis_done_without_auto_start(
    stack: Stack, start_worker: StartWorker, tmp_path: Path, events: Events
) -> None:
    start_worker()
    job = stack.payload(GEOTIFF, features=2)
    job["auto_start"] = False
    result = run_cli(
        "submit", str(write_job(tmp_path, job)), "--wait", "--timeout", "90", env=stack.env()
    )
    assert result.returncode == 0, result.stderr
    assert "ANALYSIS_DONE" in _summary_row(result.stdout, job["job_id"])
    assert "publish a `start`" in result.stderr
    events.pump(0.5)
    assert "PROCESSING" not in events.statuses(job["job_id"])


def test_start_by_id_carries_a_resting_job_to_done(
    stack: Stack, start_worker: StartWorker, tmp_path: Path
) -> None:
    start_worker()
    job = stack.payload(GEOTIFF, features=2)
    job["auto_start"] = False
    rest = run_cli(
        "submit", str(write_job(tmp_path, job)), "--wait", "--timeout", "90", env=stack.env()
    )
    assert rest.returncode == 0, rest.stderr
    done = run_cli(
        "start", job["job_id"], "--wait", "--timeout", "90", env=stack.env(), timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"published start of job {job['job_id']}" in done.stderr
    assert "DONE" in _summary_row(done.stdout, job["job_id"])


def test_cancel_by_id_publishes_the_request_a_producer_would(stack: Stack) -> None:
    # No worker runs: what reaches the jobs queue is the message itself.
    result = run_cli("cancel", "corsica-2019", env=stack.env())
    assert result.returncode == 0, result.stderr
    assert [json.loads(body) for _, body in _queued(stack)] == [
        {"schema_version": 1, "job_id": "corsica-2019", "action": "cancel"}
    ]


def test_an_id_no_job_could_have_is_refused_before_publishing(stack: Stack) -> None:
    result = run_cli("cancel", "no spaces allowed", env=stack.env())
    assert result.returncode == 2
    assert "is not a valid job request" in result.stderr
    assert _queued(stack) == []


def test_wait_gives_up_with_exit_3_after_the_timeout(stack: Stack, tmp_path: Path) -> None:
    # No worker runs: nothing will ever answer.
    job = stack.payload(GEOTIFF)
    result = run_cli(
        "submit", str(write_job(tmp_path, job)), "--wait", "--timeout", "1", env=stack.env()
    )
    assert result.returncode == 3, result.stderr
    assert "gave up waiting after 1 s" in result.stderr
    assert "SUBMITTED" in _summary_row(result.stdout, job["job_id"])
    assert [json.loads(body)["job_id"] for _, body in _queued(stack)] == [job["job_id"]]
