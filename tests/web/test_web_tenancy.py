"""The status API scoped by tenant: the real server over loopback, reading real PostgreSQL.

Jobs of three owners (two tenants and none) and their events go in through the store's own
statements; each caller, identified by a per-tenant token or by the header an
authenticating proxy sets, sees its own tenant's jobs and events only, and another's job id
is answered as no job at all (404), so a tenant cannot learn which ids others use."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

pytest.register_assert_rewrite("tests.web.web_support")

from tests.cli_support import Stack, run_cli  # noqa: E402
from tests.web.web_support import conforms, get, web_server  # noqa: E402
from worker.lifecycle import JobState  # noqa: E402
from worker.settings import TenantRule  # noqa: E402
from worker.store import db, history, jobs  # noqa: E402
from worker.wire.events import CONTENT_TYPE  # noqa: E402
from worker.wire.outgoing import OutboxMessage  # noqa: E402

pytest_plugins = ("tests.cli_support",)
pytestmark = pytest.mark.integration

TENANTS = {"team-a": TenantRule(), "team-b": TenantRule(), "ops": TenantRule(manage="any")}
TOKENS = {"team-a": "token-of-team-a-0001", "team-b": "token-of-team-b-0002"}
T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def _event(fleet: str, job_id: str, sequence: int) -> OutboxMessage:
    body = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": f"/batch-worker/{fleet}",
        "subject": job_id,
        "type": "job.accepted",
        "time": (T0 + timedelta(seconds=sequence)).isoformat(),
        "data": {"sequence": sequence},
    }
    return OutboxMessage(
        exchange="batch.events",
        routing_key="job.accepted",
        body=json.dumps(body).encode(),
        properties={"content_type": CONTENT_TYPE},
    )


@pytest.fixture
def owned(stack: Stack) -> Iterator[dict[str | None, str]]:
    """One job per owner (tenant -> job id; None: no tenant), each with one event."""
    fleet = stack.names.settings()["fleet_id"]
    ids: dict[str | None, str] = {
        owner: f"job-{owner or 'none'}-{uuid.uuid4().hex[:6]}"
        for owner in ("team-a", "team-b", None)
    }
    states = [
        JobState.model_validate(
            {
                "job_id": job_id,
                "fleet_id": fleet,
                "request_hash": "h",
                "request": {"description": f"of {owner}"},
                "accepted_at": T0,
                "tenant": owner,
            }
        )
        for owner, job_id in ids.items()
    ]
    pool = db.open_pool(stack.settings(), min_size=1, max_size=1)
    try:
        db.ensure_schema(pool)
        with pool.connection() as conn:
            jobs.insert_jobs(conn, [jobs.job_row(s) for s in states], next_run_at=T0)
            history.record(conn, [_event(fleet, job_id, 1) for job_id in ids.values()])
        yield ids
    finally:
        pool.close()
        with psycopg.connect(stack.database_url, autocommit=True) as conn:
            conn.execute("DELETE FROM bw_jobs WHERE fleet_id = %s", (fleet,))
            conn.execute("DELETE FROM bw_event_history WHERE fleet_id = %s", (fleet,))


def _listed(answer: dict[str, Any]) -> set[str]:
    return {job["job_id"] for job in answer["jobs"]}


def test_a_tenant_token_sees_its_own_jobs_and_events_and_no_other(
    stack: Stack, owned: dict[str | None, str]
) -> None:
    with web_server(
        stack, tenants=TENANTS, web_tenant_tokens=TOKENS, web_token="operator-token-0003"
    ) as server:
        a = {"Authorization": f"Bearer {TOKENS['team-a']}"}
        listed = conforms(get(server, "/api/v1/jobs", headers=a).json(), "JobList")
        assert _listed(listed) == {owned["team-a"]} and listed["total"] == 1
        assert listed["jobs"][0]["tenant"] == "team-a"

        detail = conforms(
            get(server, f"/api/v1/jobs/{owned['team-a']}", headers=a).json(), "JobDetail"
        )
        assert [e["subject"] for e in detail["events"]] == [owned["team-a"]]

        # Another tenant's job, and one of no tenant: no such job, the same answer as an id
        # nobody uses, for the job, its events and its features alike.
        for suffix in ("", "/features"):
            nobody = get(server, f"/api/v1/jobs/no-such-job{suffix}", headers=a)
            assert nobody.status_code == 404 and nobody.json()["error"]["code"] == "NO_SUCH_JOB"
            for other in (owned["team-b"], owned[None]):
                answer = get(server, f"/api/v1/jobs/{other}{suffix}", headers=a)
                assert answer.status_code == 404, (other, answer.text)
                assert answer.text.replace(other, "no-such-job") == nobody.text

        overview = conforms(get(server, "/api/v1/fleet", headers=a).json(), "FleetOverview")
        assert overview["jobs"] == 1
        config = conforms(get(server, "/api/v1/config", headers=a).json(), "Config")
        assert config["tenant"] == "team-a"

        b = {"Authorization": f"Bearer {TOKENS['team-b']}"}
        assert _listed(get(server, "/api/v1/jobs", headers=b).json()) == {owned["team-b"]}

        # The operators' token sees the fleet whole, as without tenancy.
        operator = {"Authorization": "Bearer operator-token-0003"}
        everything = get(server, "/api/v1/jobs", headers=operator).json()
        assert _listed(everything) == set(owned.values())
        assert get(server, "/api/v1/config", headers=operator).json()["tenant"] is None

        for wrong in ({}, {"Authorization": "Bearer token-of-nobody"}):
            refused = get(server, "/api/v1/jobs", headers=wrong)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "UNAUTHORISED"


def test_a_proxy_header_names_the_tenant_and_an_operators_tenant_sees_all(
    stack: Stack, owned: dict[str | None, str]
) -> None:
    header = "X-Auth-Request-User"
    with web_server(stack, tenants=TENANTS, web_tenant_header=header) as server:
        b = get(server, "/api/v1/jobs", headers={header: "team-b"}).json()
        assert _listed(b) == {owned["team-b"]}
        assert (
            get(server, f"/api/v1/jobs/{owned['team-a']}", headers={header: "team-b"}).status_code
            == 404
        )
        ops = get(server, "/api/v1/jobs", headers={header: "ops"}).json()
        assert _listed(ops) == set(owned.values())

        # No identity, or one the settings do not know: refused, not shown everything.
        missing = get(server, "/api/v1/jobs")
        assert missing.status_code == 401
        unknown = get(server, "/api/v1/jobs", headers={header: "team-z"})
        assert unknown.status_code == 403 and unknown.json()["error"]["code"] == "UNKNOWN_TENANT"
        # The pages and the document hold no data: open still.
        assert get(server, "/api/openapi.json").status_code == 200


def test_without_tenancy_configured_every_job_is_shown_as_before(
    stack: Stack, owned: dict[str | None, str]
) -> None:
    with web_server(stack, tenants=TENANTS) as server:
        assert _listed(get(server, "/api/v1/jobs").json()) == set(owned.values())
        for job_id in owned.values():
            assert get(server, f"/api/v1/jobs/{job_id}").status_code == 200


def test_the_jobs_command_takes_a_tenant(stack: Stack, owned: dict[str | None, str]) -> None:
    listed = run_cli("jobs", "--tenant", "team-a", env=stack.env())
    assert listed.returncode == 0, listed.stderr
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == [owned["team-a"]]
    every = run_cli("jobs", env=stack.env())
    assert {line.split("\t")[0] for line in every.stdout.splitlines()} == set(owned.values())
    status = run_cli("status", owned["team-b"], "--tenant", "team-a", env=stack.env())
    assert status.returncode != 0
