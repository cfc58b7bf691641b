"""``python -m worker jobs``: the fleet's jobs from the durable state, as a user runs it,
and the same answer as the status API's."""

from __future__ import annotations

import json
from collections.abc import Callable

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
from tests.web.web_support import get, web_server  # noqa: E402

pytest_plugins = ("tests.cli_support",)
pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]


def test_jobs_lists_filters_and_pages_as_the_api_does(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    before = run_cli("jobs", env=stack.env())  # no worker yet: no table, no job, no traceback
    assert before.returncode == 0 and before.stdout == "", before.stderr

    start_worker()
    done, failed, final = done_and_failed(stack, producer, events)

    # Off a terminal: one tab-separated line per job, whole ids, newest first.
    listed = run_cli("jobs", env=stack.env())
    assert listed.returncode == 0, listed.stderr
    lines = [line.split("\t") for line in listed.stdout.splitlines()]
    assert [line[0] for line in lines] == [failed["job_id"], done["job_id"]]
    assert lines[1][1] == "DONE" and lines[1][-1] == final["data"]["batch_request_id"]
    assert lines[0][1] == "FAILED"

    only_failed = run_cli("jobs", "--status", "failed", env=stack.env())
    assert [line.split("\t")[0] for line in only_failed.stdout.splitlines()] == [failed["job_id"]]
    by_text = run_cli("jobs", "--text", done["job_id"][-6:], "--ended", env=stack.env())
    assert [line.split("\t")[0] for line in by_text.stdout.splitlines()] == [done["job_id"]]
    none_active = run_cli("jobs", "--active", env=stack.env())
    assert none_active.stdout == ""

    as_json = run_cli("jobs", "--json", "--limit", "1", env=stack.env())
    assert as_json.returncode == 0, as_json.stderr
    page = json.loads(as_json.stdout)
    assert page["total"] == 2 and page["next_offset"] == 1
    assert [job["job_id"] for job in page["jobs"]] == [failed["job_id"]]
    with web_server(stack) as server:
        api = get(server, "/api/v1/jobs", params={"limit": 1}).json()
    # One query for both: the same page, field for field (durations move with the clock).
    for answer in (page, api):
        for job in answer["jobs"]:
            job.pop("duration_seconds")
    assert page == api

    bad = run_cli("jobs", "--since", "yesterday", env=stack.env())
    assert bad.returncode == 2 and "--since" in bad.stderr and "Traceback" not in bad.stderr
    naive = run_cli("jobs", "--until", "2026-01-02T03:04:05", env=stack.env())
    assert naive.returncode == 2 and "--until" in naive.stderr
    # Refused by the status API's rule, named as the option it came from.
    before_first = run_cli("jobs", "--offset", "-1", env=stack.env())
    assert before_first.returncode == 2 and before_first.stdout == ""
    assert "jobs: --offset: must be from 0 to 10000000" in before_first.stderr
