"""``python -m worker submit``: a producer on the command line, against the real stack."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pika
import pytest

pytest.register_assert_rewrite("tests.cli_support", "tests.rabbitmq_node")

from tests.cli_support import (  # noqa: E402
    REPO,
    Events,
    Stack,
    WorkerProcess,
    run_cli,
    take_all,
    write_job,
)
from tests.e2e.conftest import FAST  # noqa: E402
from tests.rabbitmq_node import RabbitNode  # noqa: E402
from worker.broker import connection, declare_topology  # noqa: E402
from worker.commands.follow import read_stored_job  # noqa: E402
from worker.commands.status import job_status  # noqa: E402
from worker.settings import Settings  # noqa: E402
from worker.simulator import SimulatorConfig, start_background  # noqa: E402

# The e2e harness's fixtures (stack, start_worker, events, ...), through cli_support; a
# RabbitMQ node of the test's own (rabbit_node) for a broker restart.
pytest_plugins = ("tests.cli_support", "tests.rabbitmq_node")
pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
GEOTIFF = "max-ndvi-geotiff.json"


def _queued(stack: Stack) -> list[tuple[pika.BasicProperties, bytes]]:
    """What waits in the jobs queue (taken off it)."""
    return take_all(stack, stack.names.jobs_queue)


def _summary_row(stdout: str, job_id: str) -> str:
    # Off a terminal (as here) the summary is tab-separated lines, ids whole.
    rows = [line for line in stdout.splitlines() if line.split("\t")[0] == job_id]
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
    row = _summary_row(result.stdout, job["job_id"])
    assert "FAILED" in row
    # The error's text, not only its code, right under the job's row.
    lines = result.stdout.splitlines()
    error = lines[lines.index(row) + 1]
    assert error.startswith("  error: [api] ") and len(error) > len("  error: [api] X: "), error


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


@pytest.mark.parametrize("verb", ["cancel", "resume"])
def test_cancel_by_id_publishes_the_request_a_producer_would(stack: Stack, verb: str) -> None:
    # No worker runs: what reaches the jobs queue is the message itself.
    result = run_cli(verb, "corsica-2019", env=stack.env())
    assert result.returncode == 0, result.stderr
    assert [json.loads(body) for _, body in _queued(stack)] == [
        {"schema_version": 1, "job_id": "corsica-2019", "action": verb}
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


def test_wait_keeps_its_connection_through_a_long_silence(stack: Stack, tmp_path: Path) -> None:
    """No worker, so no event at all: eight heartbeat intervals with nothing to read. A
    follower that sent no heartbeats of its own lost its connection after about three."""
    job = stack.payload(GEOTIFF)
    result = run_cli(
        "submit",
        str(write_job(tmp_path, job)),
        "--wait",
        "--timeout",
        "8",
        env=stack.env(heartbeat=1),
    )
    assert result.returncode == 3, result.stderr
    assert "gave up waiting after 8 s" in result.stderr
    assert "lost the broker connection" not in result.stderr


def test_wait_on_a_request_for_an_ended_job_answers_at_once(
    stack: Stack, start_worker: StartWorker, tmp_path: Path
) -> None:
    """A cancel of an ended job changes nothing and no status event follows its
    command.accepted: the job's stored end is the answer, without waiting for --timeout."""
    start_worker()
    job = stack.payload(GEOTIFF, features=2)
    path = write_job(tmp_path, job)
    first = run_cli("submit", str(path), "--wait", "--timeout", "90", env=stack.env(), timeout=120)
    assert first.returncode == 0, first.stderr

    cancel = write_job(tmp_path, {"job_id": job["job_id"], "action": "cancel"}, "cancel.json")
    again = [
        run_cli("submit", str(request), "--wait", "--timeout", "60", env=stack.env(), timeout=90)
        for request in (cancel, path)
    ]
    for result in again:
        assert result.returncode == 0, result.stderr
        assert "DONE" in _summary_row(result.stdout, job["job_id"])
        assert f"job {job['job_id']} had already ended" in result.stderr

    # By id, with the result as JSON for a script: the whole state on one line.
    by_id = run_cli("cancel", job["job_id"], "--wait", "--json", env=stack.env(), timeout=90)
    assert by_id.returncode == 0, by_id.stderr
    (line,) = by_id.stdout.splitlines()
    state = json.loads(line)
    assert state["job_id"] == job["job_id"] and state["status"] == "DONE"
    assert state["tiles"] == {"processed": 2, "failed": 0, "total": 2}


def _status_lines(stderr: str, job_id: str, status: str) -> list[str]:
    return re.findall(rf"^\d\d:\d\d:\d\d {re.escape(job_id)} {status}$", stderr, re.MULTILINE)


@pytest.mark.timeout(600)
def test_wait_follows_a_long_job_across_a_broker_restart(
    stack: Stack, start_worker: StartWorker, tmp_path: Path, rabbit_node: RabbitNode
) -> None:
    """Heartbeats of 2 s, a job of about half a minute, and the broker (a node of this
    test's own) restarted while it runs: the follower reconnects, keeps its place, and
    shows the job's end exactly once."""
    heartbeat = 2
    on_node = Settings(broker_url=rabbit_node.url, **stack.names.settings())
    with connection(on_node, purpose="test") as conn:
        declare_topology(conn, on_node)
    # Some 290 API seconds for two features (analysis, processing, status lags), at x10.
    slow = SimulatorConfig(**{**FAST, "speed": 10.0})
    with start_background(slow) as simulator:
        env = stack.env(
            broker_url=rabbit_node.url,
            api_url=simulator.url,
            token_url=simulator.token_url,
            heartbeat=heartbeat,
        )
        start_worker(
            broker_url=rabbit_node.url,
            api_url=simulator.url,
            token_url=simulator.token_url,
            heartbeat=heartbeat,
        )
        job = stack.payload(GEOTIFF, features=2)
        follower = subprocess.Popen(
            [sys.executable, "-m", "worker", "submit", str(write_job(tmp_path, job)), "--wait"],
            cwd=REPO,
            env={**env, "COLUMNS": "200"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while (stored := read_stored_job(stack.settings(), job["job_id"])) is None or (
                (stored.latest_status_event or {}).get("data", {}).get("status") != "PROCESSING"
            ):
                assert time.monotonic() < deadline, f"the job never got to PROCESSING: {stored}"
                assert follower.poll() is None, follower.communicate()
                time.sleep(0.5)
            stopping = time.monotonic()
            rabbit_node.stop()
            time.sleep(heartbeat)  # the worker's events wait in its outbox meanwhile
            booted = rabbit_node.start()
            print(f"broker away {time.monotonic() - stopping:.1f} s (boot {booted:.1f} s)")
            stdout, stderr = follower.communicate(timeout=300)
        finally:
            if follower.poll() is None:
                follower.kill()
                follower.communicate()
    assert follower.returncode == 0, stderr
    row = _summary_row(stdout, job["job_id"])
    assert "DONE" in row and "2/0/2" in row
    assert len(_status_lines(stderr, job["job_id"], "DONE")) == 1, stderr
    assert "lost the broker connection" in stderr
    [outage] = re.findall(r"reconnected to the broker after ([\d.]+) s", stderr)
    print(f"follower reconnected {outage} s after losing the broker")
    ended = job_status(stack.settings(), job["job_id"])
    assert ended is not None
    span = datetime.fromisoformat(ended["ended_at"]) - datetime.fromisoformat(ended["accepted_at"])
    took = span.total_seconds()
    print(f"the job took {took:.0f} s: {took / heartbeat:.0f} heartbeat intervals")
    # The premise, not a speed: the job outlived many heartbeat timeouts.
    assert took > 10 * heartbeat
