"""``python -m worker status JOB_ID``: what the durable state says, for a late reader."""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

import pytest

pytest.register_assert_rewrite("tests.cli_support")

from tests.cli_support import (  # noqa: E402
    Events,
    Producer,
    Stack,
    WorkerProcess,
    done_and_failed,
    run_cli,
)

# The e2e harness's fixtures (stack, start_worker, events, producer), through cli_support.
pytest_plugins = ("tests.cli_support",)
pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]


def _field(text: str, name: str) -> str:
    [line] = [line for line in text.splitlines() if line.startswith(name + " ")]
    return line[len(name) :].strip()


def test_status_of_ended_jobs_as_text_and_json(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    start_worker()
    done, failed, final = done_and_failed(stack, producer, events)

    text = run_cli("status", done["job_id"], env=stack.env())
    assert text.returncode == 0, text.stderr
    assert _field(text.stdout, "status") == "DONE (ENDED)"
    assert _field(text.stdout, "batch request") == final["data"]["batch_request_id"]
    tiles = final["data"]["tiles"]
    assert _field(text.stdout, "tiles") == (
        f"{tiles['processed']} done, {tiles['failed']} failed, {tiles['total']} total"
    )
    assert _field(text.stdout, "completion") == "100.0 %"
    assert text.stderr == ""

    as_json = run_cli("status", done["job_id"], "--json", env=stack.env())
    assert as_json.returncode == 0, as_json.stderr
    state = json.loads(as_json.stdout)
    assert state["job_id"] == done["job_id"]
    assert state["status"] == "DONE" and state["phase"] == "ENDED"
    assert state["tiles"] == tiles
    assert state["sequence"] == final["data"]["sequence"]
    # The late reader gets the very event it missed, id and all.
    assert state["latest_status_event"]["id"] == final["id"]
    assert state["pending"] == {"start": False, "cancel": False}
    # The forecast from the last read: at 100 %, what it cost.
    assert state["cost_guard"] == "spent" and state["cost_held"] is False
    assert state["cost_forecast"]["method"] == "linear"
    assert state["cost_forecast"]["pu"] == pytest.approx(final["data"]["cost_pu"], abs=1e-3)
    assert _field(text.stdout, "forecast") == f"{state['cost_forecast']['pu']} PU (linear)"

    failure = run_cli("status", failed["job_id"], env=stack.env())
    assert failure.returncode == 0, failure.stderr
    assert _field(failure.stdout, "status") == "FAILED (ENDED)"
    assert _field(failure.stdout, "error").startswith("[api] ")

    unknown = run_cli("status", "never-submitted", env=stack.env())
    assert unknown.returncode == 1
    assert unknown.stdout == ""
    assert "no job 'never-submitted'" in unknown.stderr


def test_an_unknown_job_exits_1_even_before_any_worker_ran(stack: Stack) -> None:
    # Before any worker has run, the database has no tables yet: still simply "no job".
    before = run_cli("status", "never-submitted", env=stack.env())
    assert before.returncode == 1
    assert before.stdout == ""
    assert "no job 'never-submitted'" in before.stderr
    assert "Traceback" not in before.stderr


def test_status_with_postgresql_unreachable_exits_1_without_the_password(stack: Stack) -> None:
    env = stack.env(database_url="postgresql://postgres:pw-Zq81x@127.0.0.1:1/jobs")
    result = run_cli("status", "any-job", env=env)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "cannot reach PostgreSQL at 127.0.0.1:1/jobs: Connection refused"
        " (BATCH_WORKER_DATABASE_URL)"
    )
    assert "pw-Zq81x" not in result.stderr + result.stdout


def test_status_against_a_database_that_does_not_exist_says_so(stack: Stack) -> None:
    parts = urlsplit(stack.database_url)
    missing = urlunsplit(parts._replace(path="/bw_no_such_database"))
    result = run_cli("status", "any-job", env=stack.env(database_url=missing))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"PostgreSQL at {parts.hostname}:{parts.port or 5432}/bw_no_such_database:"
        " the database does not exist (BATCH_WORKER_DATABASE_URL)"
    )
