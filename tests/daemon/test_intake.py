"""Intake against a real PostgreSQL: what each message leaves in the job table and outbox."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from worker.daemon.inbound import InboundMessage
from worker.daemon.intake import Intake
from worker.settings import Settings
from worker.store import capacity, db, jobs, leases
from worker.wire import job_requests

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
FLEET = "fleet-a"
PAYLOAD = {
    "processRequest": {"input": {"data": [{"type": "sentinel-2-l2a"}]}, "evalscript": "x"},
    "input": {"type": "tiling-grid", "id": 1, "resolution": 10},
    "output": {"type": "raster", "delivery": {"s3": {"url": "s3://b/out"}}},
    "description": "corsica",
}


@pytest.fixture
def intake(pool: ConnectionPool) -> Intake:
    settings = Settings(fleet_id=FLEET, worker_name="w-test", dlq="t.dlq", events_exchange="t.ev")
    return Intake(settings, pool, metrics=Recorder(), clock=lambda: T0)


class Recorder:
    def __init__(self) -> None:
        self.commands: list[tuple[str, str]] = []

    def command(self, action: str, outcome: str, tenant: str | None = None) -> None:
        self.commands.append((action, outcome))


def msg(body: Any, *, message_id: str = "m1", reply_to: str | None = None) -> InboundMessage:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    props: dict[str, Any] = {"message_id": message_id, "correlation_id": "c-" + message_id}
    if reply_to:
        props["reply_to"] = reply_to
    return InboundMessage(
        body=raw,
        content_type="application/json",
        properties=props,
        headers={"x-producer": "p"},
        delivery_tag=1,
        redelivered=False,
    )


def submit(job_id: str = "j1", **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "request": PAYLOAD, **extra}


def outbox_rows(pool: ConnectionPool) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT exchange, routing_key, body, headers FROM bw_outbox ORDER BY id"
        ).fetchall()
    out = []
    for exchange, key, body, headers in rows:
        try:
            parsed = json.loads(bytes(body))
        except (ValueError, RecursionError):  # dead letters hold whatever was sent
            parsed = {"raw": bytes(body).decode("utf-8", "replace")}
        out.append((exchange, key, parsed, headers))
    return out


def routing_keys(pool: ConnectionPool) -> list[str]:
    return [key for _, key, _, _ in outbox_rows(pool)]


def get(pool: ConnectionPool, job_id: str) -> jobs.JobRecord | None:
    with pool.connection() as conn:
        return jobs.get_job(conn, FLEET, job_id)


def test_new_submit_inserts_a_due_job_and_accepts(intake: Intake, pool: ConnectionPool) -> None:
    intake.handle_batch([msg(submit(auto_start=False, max_cost_pu=50))])
    record = get(pool, "j1")
    assert record is not None
    assert record.next_run_at == T0
    assert record.state.auto_start is False
    assert record.state.max_cost_pu == 50
    assert record.state.echo.message_id == "m1"
    ((exchange, key, event, _),) = outbox_rows(pool)
    assert (exchange, key) == ("t.ev", "command.accepted")
    assert event["data"]["job_id"] == "j1"


def test_garbage_is_rejected_and_dead_lettered_whole(intake: Intake, pool: ConnectionPool) -> None:
    intake.handle_batch([msg(b"\xff not json")])
    (rejected, dead) = outbox_rows(pool)
    assert rejected[1] == "command.rejected"
    assert dead[0] == "" and dead[1] == "t.dlq"
    assert dead[2] == {"raw": "\ufffd not json"}
    assert dead[3]["x-producer"] == "p"
    assert any("MALFORMED" in str(v) for v in dead[3].values())
    assert intake._metrics.commands == [("", "rejected")]  # type: ignore[union-attr]


def test_resubmit_same_request_is_idempotent_and_republishes_last_status(
    intake: Intake, pool: ConnectionPool
) -> None:
    intake.handle_batch([msg(submit())])
    # Give the job a last status event, as the engine would after its first step.
    with pool.connection() as conn:
        (claim,) = leases.claim_due(conn, FLEET, "w", now=T0, lease=timedelta(seconds=30), limit=1)
        from worker.wire.outgoing import OutboxMessage

        event = OutboxMessage(exchange="t.ev", routing_key="job.created", body=b'{"id":"e7"}')
        leases.save_step(
            conn, claim.state, generation=claim.generation, owner="w", status_event=event
        )
    before = len(outbox_rows(pool))
    intake.handle_batch([msg(submit(), message_id="m2", reply_to="my.replies")])
    new = outbox_rows(pool)[before:]
    assert [(e, k) for e, k, _, _ in new] == [
        ("t.ev", "command.accepted"),
        ("", "my.replies"),  # the accepted event's copy for the new reply_to
        ("t.ev", "job.created"),
        ("", "my.replies"),
    ]
    assert new[2][2] == {"id": "e7"}
    with pool.connection() as conn:
        count = conn.execute("SELECT count(*) FROM bw_jobs").fetchone()
        # Both copies for reply_to are mandatory: a vanished reply queue returns them.
        mandatory = conn.execute(
            "SELECT mandatory FROM bw_outbox WHERE routing_key = 'my.replies' ORDER BY id"
        ).fetchall()
    assert count is not None and count[0] == 1
    assert mandatory == [(True,), (True,)]


def test_resubmit_with_other_request_conflicts(intake: Intake, pool: ConnectionPool) -> None:
    other = {**PAYLOAD, "description": "different"}
    intake.handle_batch([msg(submit()), msg({"job_id": "j1", "request": other}, message_id="m2")])
    keys = routing_keys(pool)
    assert keys == ["command.accepted", "command.rejected", "t.dlq"]
    (_, _, rejected, _) = outbox_rows(pool)[1]
    assert rejected["data"]["code"] == "JOB_CONFLICT"
    record = get(pool, "j1")
    assert record is not None and record.state.request is not None
    assert record.state.request["description"].startswith("corsica ")  # tagged, kept


def test_two_submits_in_one_batch_behave_sequentially(intake: Intake, pool: ConnectionPool) -> None:
    intake.handle_batch([msg(submit()), msg(submit(), message_id="m2")])
    assert routing_keys(pool) == ["command.accepted", "command.accepted"]


def test_cancel_and_start_set_requests_without_touching_state(
    intake: Intake, pool: ConnectionPool
) -> None:
    intake.handle_batch([msg(submit(auto_start=False))])
    before = get(pool, "j1")
    intake.handle_batch(
        [
            msg({"job_id": "j1", "action": "start"}, message_id="m2"),
            msg({"job_id": "j1", "action": "cancel"}, message_id="m3"),
            msg({"job_id": "ghost", "action": "cancel"}, message_id="m4"),
        ]
    )
    after = get(pool, "j1")
    assert before is not None and after is not None
    assert after.state == before.state
    assert after.start_requested_at == T0 and after.cancel_requested_at == T0
    assert routing_keys(pool)[1:] == [
        "command.accepted",
        "command.accepted",
        "command.rejected",
        "t.dlq",
    ]
    (_, _, rejected, _) = outbox_rows(pool)[3]
    assert rejected["data"]["code"] == "JOB_NOT_FOUND"
    assert intake._metrics.commands[-3:] == [  # type: ignore[union-attr]
        ("start", "accepted"),
        ("cancel", "accepted"),
        ("cancel", "rejected"),
    ]


def test_an_error_on_one_message_rejects_only_that_message(
    intake: Intake, pool: ConnectionPool
) -> None:
    class Boom(Exception):
        pass

    original = jobs.request_actions

    def explode(conn: Any, fleet_id: str, requests: Any, *, now: datetime) -> None:
        if requests:  # only the cancel provokes it
            raise Boom
        original(conn, fleet_id, requests, now=now)

    intake.handle_batch([msg(submit("j0"))])
    jobs.request_actions = explode  # type: ignore[assignment]
    try:
        # An unexpected error on one message rejects that message only.
        intake.handle_batch(
            [msg(submit("j2"), message_id="m2"), msg({"job_id": "j0", "action": "cancel"})]
        )
    finally:
        jobs.request_actions = original
    assert get(pool, "j2") is not None
    assert routing_keys(pool)[-2:] == ["command.rejected", "t.dlq"]


def test_new_jobs_beyond_max_in_flight_are_deferred_but_commands_are_not(
    pool: ConnectionPool,
) -> None:
    settings = Settings(
        fleet_id=FLEET, worker_name="w-test", dlq="t.dlq", events_exchange="t.ev", max_in_flight=2
    )
    intake = Intake(settings, pool, clock=lambda: T0)
    first = [msg(submit("j1"), message_id="a"), msg(submit("j2"), message_id="b")]
    assert intake.handle_batch(first) == []
    extra = msg(submit("j3"), message_id="c")
    resubmit = msg(submit("j1"), message_id="d")
    cancel = msg({"job_id": "j2", "action": "cancel"}, message_id="e")
    deferred = intake.handle_batch([extra, resubmit, cancel])
    assert deferred == [extra]
    with pool.connection() as conn:
        assert jobs.get_job(conn, FLEET, "j3") is None
        assert capacity.count_active(conn, FLEET) == 2
        j2 = jobs.get_job(conn, FLEET, "j2")
    assert j2 is not None and j2.cancel_requested_at == T0  # the cancel went through


def test_a_submit_and_a_cancel_for_one_new_job_in_one_batch(
    intake: Intake, pool: ConnectionPool
) -> None:
    intake.handle_batch(
        [msg(submit("j7"), message_id="a"), msg({"job_id": "j7", "action": "cancel"})]
    )
    with pool.connection() as conn:
        record = jobs.get_job(conn, FLEET, "j7")
    assert record is not None and record.cancel_requested_at == T0
    assert routing_keys(pool) == ["command.accepted", "command.accepted"]


@contextmanager
def first_lookup_blind() -> Iterator[list[set[str]]]:
    """Intake's first lookup misses every row, as if another intake's transaction had not
    committed yet; yields the job ids of each lookup made meanwhile."""
    original, calls = jobs.start_intake_lookup, []

    def blind_once(conn: Any, fleet_id: str, job_ids: Any, adopting: Any = ()) -> Any:
        calls.append(set(job_ids))
        lookup = original(conn, fleet_id, job_ids, adopting)
        return (lambda: lookup()._replace(known={})) if len(calls) == 1 else lookup

    jobs.start_intake_lookup = blind_once  # type: ignore[assignment]
    try:
        yield calls
    finally:
        jobs.start_intake_lookup = original


def test_a_job_created_by_another_intake_meanwhile_is_taken_as_a_resubmit(
    intake: Intake, pool: ConnectionPool
) -> None:
    intake.handle_batch([msg(submit("j8"), message_id="first")])
    with first_lookup_blind() as calls:
        assert intake.handle_batch([msg(submit("j8"), message_id="second")]) == []
    assert len(calls) == 2  # the insert found the row taken, and the batch looked again
    with pool.connection() as conn:
        assert capacity.count_active(conn, FLEET) == 1
    assert routing_keys(pool) == ["command.accepted", "command.accepted"]


def test_a_job_stored_with_a_version_1_hash_knows_its_resubmit_and_its_conflict(
    intake: Intake, pool: ConnectionPool
) -> None:
    intake.handle_batch([msg(submit())])
    # As a worker before version 2 of the hash stored it.
    (v1,) = {
        job_requests.request_hash_v1(r)
        for r in [job_requests.parse_job_request(json.dumps(submit()).encode(), None)]
        if isinstance(r, job_requests.JobRequest)
    }
    with pool.connection() as conn:
        conn.execute("UPDATE bw_jobs SET request_hash = %s", (v1,))
    other = {**PAYLOAD, "description": "different"}
    intake.handle_batch(
        [msg(submit(), message_id="m2"), msg({"job_id": "j1", "request": other}, message_id="m3")]
    )
    assert routing_keys(pool) == [
        "command.accepted",
        "command.accepted",  # the same request: an idempotent re-submit
        "command.rejected",
        "t.dlq",
    ]
    assert outbox_rows(pool)[2][2]["data"]["code"] == "JOB_CONFLICT"


def test_a_string_that_is_not_text_is_refused_and_the_rest_of_its_batch_taken(
    intake: Intake, pool: ConnectionPool
) -> None:
    lone = b'{"job_id": "j1", "request": {"description": "\\ud800"}}'
    intake.handle_batch([msg(lone), msg(submit("j2"), message_id="m2")])
    assert routing_keys(pool) == ["command.rejected", "t.dlq", "command.accepted"]
    rejected = outbox_rows(pool)[0][2]["data"]
    assert (rejected["code"], rejected["job_id"]) == ("INVALID_FIELD", "j1")
    assert get(pool, "j1") is None and get(pool, "j2") is not None


def test_a_bug_reading_one_message_rejects_that_message_alone(
    intake: Intake, pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = job_requests.request_hash

    def explode(req: job_requests.JobRequest) -> str:
        if req.job_id == "j1":
            raise RuntimeError("a bug")
        return original(req)

    monkeypatch.setattr(job_requests, "request_hash", explode)
    batch = [msg(submit("j1")), msg(submit("j2"), message_id="m2")]
    read = intake.read(batch)
    assert intake.take(read) == []
    assert routing_keys(pool) == ["command.rejected", "t.dlq", "command.accepted"]
    assert outbox_rows(pool)[0][2]["data"]["code"] == "INTERNAL_ERROR"
    assert outbox_rows(pool)[1][2] == submit("j1")  # dead-lettered whole


def test_a_raced_batch_whose_commit_was_already_sent_leaves_nothing_behind(
    database_url: str,
) -> None:
    pool = db.open_pool(database_url, max_size=1)  # one connection: the one that raced
    try:
        db.ensure_schema(pool)
        settings = Settings(fleet_id=FLEET, worker_name="w", dlq="t.dlq", events_exchange="t.ev")
        intake = Intake(settings, pool, clock=lambda: T0)
        intake.handle_batch([msg(submit("j8"), message_id="first")])
        with first_lookup_blind() as calls:
            batch = [msg(submit("j9"), message_id="new"), msg(submit("j8"), message_id="again")]
            assert intake.handle_batch(batch) == []
        assert len(calls) == 2
        # The first attempt's insert of j9 and its events went with the failed transaction.
        assert routing_keys(pool) == ["command.accepted"] * 3
        with pool.connection() as conn:
            # The connection went back to the pool as it came: no transaction, no autocommit.
            assert conn.autocommit is False
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            assert capacity.count_active(conn, FLEET) == 2
    finally:
        pool.close()


_DEEP = b'{"job_id": "j1", "request": ' + b'{"a": ' * 40 + b"1" + b"}" * 40 + b"}"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (_DEEP, "REQUEST_TOO_DEEP"),
        (
            b'{"job_id": "j1", "request": {"d": ' + b"[" * 3000 + b"]" * 3000 + b"}}",
            "REQUEST_TOO_DEEP",
        ),
        (b'{"job_id": "j1", "request": {"description": "a\\u0000b"}}', "INVALID_FIELD"),
        (b'{"job_id": "j1", "request": {"\\u0000": 1}}', "INVALID_FIELD"),
        (
            b'{"job_id": "j1", "request": {}, "deadline": "9999-12-31T23:59:59-23:59"}',
            "INVALID_FIELD",
        ),
        (
            b'{"job_id": "j1", "request": {}, "deadline": "0001-01-01T00:00:00+23:59"}',
            "INVALID_FIELD",
        ),
        (b'{"job_id": "j1", "batch_request_id": "."}', "INVALID_FIELD"),
        (b'{"job_id": "j1", "batch_request_id": ".."}', "INVALID_FIELD"),
        (
            b'{"job_id": "j1", "request": {"evalscript": "' + b"x" * (256 * 1024) + b'"}}',
            "REQUEST_TOO_LARGE",
        ),
    ],
    ids=["deep", "deeper", "nul", "nul-key", "late-offset", "early-offset", "dot", "dotdot", "big"],
)
def test_hostile_bodies_get_their_own_code_and_the_rest_of_the_batch_goes_on(
    intake: Intake, pool: ConnectionPool, body: bytes, code: str
) -> None:
    intake.handle_batch([msg(body), msg(submit("j2"), message_id="m2")])
    assert routing_keys(pool) == ["command.rejected", "t.dlq", "command.accepted"]
    rejected = outbox_rows(pool)[0][2]["data"]
    assert rejected["code"] == code
    with pool.connection() as conn:
        (dead,) = conn.execute("SELECT body FROM bw_outbox WHERE routing_key = 't.dlq'").fetchone()
    assert bytes(dead) == body  # dead-lettered byte for byte
    assert get(pool, "j1") is None and get(pool, "j2") is not None


def test_a_connection_that_carried_a_large_message_is_replaced_quietly(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # libpq keeps a connection's buffers as large as the largest message through it: after
    # a 5 MiB dead letter the connection is closed and the pool opens another.
    one = db.open_pool(database_url, min_size=1, max_size=1)
    try:
        db.ensure_schema(one)
        taken = Intake(Settings(fleet_id=FLEET, dlq="t.dlq", events_exchange="t.ev"), one)

        def backend() -> int:
            with one.connection() as conn:
                return conn.info.backend_pid

        first = backend()
        taken.handle_batch([msg(submit("small"))])
        assert backend() == first
        huge = json.dumps({"job_id": "huge", "request": {"x": "y" * (5 * 2**20)}}).encode()
        taken.handle_batch([msg(huge, message_id="m2")])
        assert backend() != first
        assert "discarding closed connection" not in caplog.text
        # Nothing was lost with the connection: the refusal and its dead letter are kept.
        with one.connection() as conn:
            rows = conn.execute("SELECT length(body) FROM bw_outbox").fetchall()
        assert max(length for (length,) in rows) >= 5 * 2**20
    finally:
        one.close()
