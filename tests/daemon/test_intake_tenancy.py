"""Tenancy through intake against a real PostgreSQL: who owns a job, who may adopt which
batch request (the lookup's origins), what the events and the job row say."""

from __future__ import annotations

from typing import Any

from psycopg_pool import ConnectionPool

from tests.daemon.test_intake import FLEET, T0, Recorder, get, msg, outbox_rows, submit
from worker.daemon.intake import Intake
from worker.lifecycle import JobState
from worker.settings import Settings
from worker.store import jobs

OURS = "0b1c7a52-3c09-4d0e-8e2a-2f4b1c9d7e01"
FOREIGN = "9f8e7d6c-5b4a-4392-8170-6e5d4c3b2a10"


def intake_for(pool: ConnectionPool, **settings: Any) -> Intake:
    config = Settings(
        fleet_id=FLEET, worker_name="w-test", dlq="t.dlq", events_exchange="t.ev", **settings
    )
    return Intake(config, pool, metrics=Recorder(), clock=lambda: T0)


def created_upstream(pool: ConnectionPool, job_id: str, tenant: str | None) -> None:
    """A job of the fleet that created batch request OURS (as the engine leaves it)."""
    state = JobState(
        job_id=job_id,
        fleet_id=FLEET,
        request_hash="h",
        request={"description": "x"},
        batch_request_id=OURS,
        tenant=tenant,
        accepted_at=T0,
    )
    with pool.connection() as conn:
        jobs.insert_jobs(conn, [jobs.job_row(state)], next_run_at=T0)


def rejections(pool: ConnectionPool) -> dict[str | None, str]:
    """job id -> the rejection code of its command.rejected event."""
    return {
        event["data"]["job_id"]: event["data"]["code"]
        for _, key, event, _ in outbox_rows(pool)
        if key == "command.rejected"
    }


def dead_letters(pool: ConnectionPool) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(body, headers) for _, key, body, headers in outbox_rows(pool) if key == "t.dlq"]


def test_without_tenancy_only_requests_the_fleet_created_are_adopted(
    pool: ConnectionPool,
) -> None:
    created_upstream(pool, "creator", None)
    intake = intake_for(pool)
    foreign = {"job_id": "adopt-foreign", "batch_request_id": FOREIGN}
    intake.handle_batch(
        [msg(foreign, message_id="m1"), msg({**foreign, "job_id": "adopt-ours",
                                             "batch_request_id": OURS}, message_id="m2")]
    )  # fmt: skip
    assert get(pool, "adopt-foreign") is None
    record = get(pool, "adopt-ours")
    assert record is not None and record.state.adopt_id == OURS
    assert rejections(pool) == {"adopt-foreign": "ADOPTION_REFUSED"}
    ((body, headers),) = dead_letters(pool)
    assert body == foreign  # the producer's message, whole
    assert headers["x-batch-worker-reason"] == "ADOPTION_REFUSED"
    # A job that adopted is no creator: what it adopted is still only the creator's.
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT job_id, adopted FROM bw_jobs WHERE fleet_id = %s ORDER BY job_id", (FLEET,)
        ).fetchall()
    assert rows == [("adopt-ours", True), ("creator", False)]


def test_adopt_foreign_lets_any_request_be_adopted(pool: ConnectionPool) -> None:
    intake_for(pool, adopt_foreign=True).handle_batch(
        [msg({"job_id": "j1", "batch_request_id": FOREIGN})]
    )
    assert get(pool, "j1") is not None
    assert rejections(pool) == {}


def test_jobs_are_stored_and_announced_with_their_tenant_and_only_it_reaches_them(
    pool: ConnectionPool,
) -> None:
    tenants = {"team-a": {}, "team-b": {"adopt": "fleet"}, "ops": {"manage": "any"}}
    intake = intake_for(pool, tenants=tenants)
    intake.handle_batch([msg(submit("j1", tenant="team-a"), message_id="m1")])
    record = get(pool, "j1")
    assert record is not None and record.state.tenant == "team-a"
    with pool.connection() as conn:
        assert conn.execute("SELECT tenant FROM bw_jobs WHERE job_id = 'j1'").fetchone() == (
            "team-a",
        )
    ((_, key, accepted, _),) = outbox_rows(pool)
    assert key == "command.accepted" and accepted["data"]["tenant"] == "team-a"

    intake.handle_batch(
        [
            msg({"job_id": "j1", "action": "cancel", "tenant": "team-b"}, message_id="m2"),
            msg({"job_id": "j1", "action": "start"}, message_id="m3"),
            msg(submit("j2", tenant="mallory"), message_id="m4"),
        ]
    )
    codes = [e["data"]["code"] for _, k, e, _ in outbox_rows(pool) if k == "command.rejected"]
    assert codes == ["NOT_JOB_OWNER", "TENANT_REQUIRED", "UNKNOWN_TENANT"]
    record = get(pool, "j1")
    assert record is not None and record.cancel_requested_at is None  # nothing reached it
    assert len(dead_letters(pool)) == 3

    intake.handle_batch(
        [msg({"job_id": "j1", "action": "cancel", "tenant": "ops"}, message_id="m5")]
    )
    record = get(pool, "j1")
    assert record is not None and record.cancel_requested_at == T0


def test_a_tenant_adopts_only_what_its_rule_allows(pool: ConnectionPool) -> None:
    created_upstream(pool, "creator", "team-b")
    intake = intake_for(pool, tenants={"team-a": {}, "team-b": {}})
    intake.handle_batch(
        [
            msg({"job_id": "a1", "batch_request_id": OURS, "tenant": "team-a"}, message_id="m1"),
            msg({"job_id": "b1", "batch_request_id": OURS, "tenant": "team-b"}, message_id="m2"),
        ]
    )
    assert rejections(pool) == {"a1": "ADOPTION_REFUSED"}
    assert get(pool, "b1") is not None


def test_the_tenant_can_come_from_the_brokers_user_id(pool: ConnectionPool) -> None:
    intake = intake_for(pool, tenants={"team-a": {}}, tenant_source="user_id")
    message = msg(submit("j1"))
    message.properties["user_id"] = "team-a"
    forged = msg(submit("j2", tenant="team-a"), message_id="m2")
    forged.properties["user_id"] = "team-b"
    intake.handle_batch([message, forged])
    record = get(pool, "j1")
    assert record is not None and record.state.tenant == "team-a"
    assert rejections(pool) == {"j2": "TENANT_MISMATCH"}
