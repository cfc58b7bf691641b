"""The engine, with the status loop beside it, against a real PostgreSQL and a small
scripted Batch API fake (tests/daemon/engine_support.py).
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from tests.daemon.engine_support import (
    FAST,
    FLEET,
    PAYLOAD,
    FakeApi,
    Recorder,
    Worker,
    add_job,
    job_events,
    make_engine,
    make_worker,
    record,
    run_until_ended,
    statuses,
)
from tests.fakes import FakeClock
from tests.store.store_support import request_action
from worker import lifecycle
from worker.api.models import Task
from worker.daemon.engine import STEPS_LOOP, Engine
from worker.daemon.health import Health
from worker.store import leases

POOL_SIZE = 12  # the pool fixture's (tests/conftest.py): each step holds a connection


def test_submitted_job_runs_to_done_with_events_in_order(pool: ConnectionPool) -> None:
    api, metrics = FakeApi(), Recorder()
    add_job(pool)
    run_until_ended(pool, make_worker(pool, api, metrics=metrics))
    seen = statuses(pool)
    assert seen[-1][1] == "DONE"
    assert [s for s, _ in seen] == sorted(s for s, _ in seen)  # sequence only rises
    assert seen[0][1] == "CREATED"
    assert api.calls.count("create") == 1
    assert metrics.finished == [("DONE", None)]
    assert record(pool).last_status_event is not None
    assert record(pool).next_run_at is None


def test_each_status_change_and_action_sent_is_one_info_line_with_its_fields(
    pool: ConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    api = FakeApi()
    add_job(pool)
    with caplog.at_level(logging.INFO, logger="worker.daemon.engine"):
        run_until_ended(pool, make_worker(pool, api))
    lines = [r for r in caplog.records if r.getMessage().startswith("job j1:")]
    sent = [r for r in lines if r.getMessage().endswith(" sent")]
    assert sent[0].getMessage() == "job j1: create sent"
    assert {r.getMessage() for r in sent} == {"job j1: create sent", "job j1: start sent"}
    assert len(sent) == len([c for c in api.calls if c in ("create", "analyse", "start")])
    changes = [r for r in lines if not r.getMessage().endswith(" sent")]
    shown = [r.status for r in changes]  # type: ignore[attr-defined]
    assert shown[0] == "CREATED" and shown[-1] == "DONE"
    assert len(shown) == len(set(shown))  # one line per change, none for progress alone
    done = changes[-1]
    assert done.job_id == "j1"  # type: ignore[attr-defined]
    assert done.batch_request_id == record(pool).state.batch_request_id  # type: ignore[attr-defined]


def test_payload_refused_by_the_worker_fails_with_source_worker(pool: ConnectionPool) -> None:
    api = FakeApi()
    add_job(pool, request={**PAYLOAD, "input": {"type": "no-such-input"}})
    run_until_ended(pool, make_worker(pool, api))
    state = record(pool).state
    assert state.status == "FAILED"
    assert state.error is not None and state.error.source == "worker"
    assert api.calls == []


def test_payload_refused_by_the_api_fails_with_its_code(pool: ConnectionPool) -> None:
    api = FakeApi()
    api.refuse_create = True
    add_job(pool)
    run_until_ended(pool, make_worker(pool, api))
    state = record(pool).state
    assert state.status == "FAILED"
    assert state.error is not None
    assert (state.error.source, state.error.http_status, state.error.code) == (
        "api",
        400,
        "COMMON_BAD_PAYLOAD",
    )


def test_uncertain_create_is_found_by_tag_not_created_twice(pool: ConnectionPool) -> None:
    api = FakeApi()
    api.create_times_out = True
    add_job(pool)
    run_until_ended(pool, make_worker(pool, api))
    assert api.calls.count("create") == 1
    assert "list" in api.calls
    assert len(api.tasks) == 1
    assert record(pool).state.batch_request_id == next(iter(api.tasks))
    assert record(pool).state.status == "DONE"


def test_adopting_an_unknown_request_fails_upstream_not_found(pool: ConnectionPool) -> None:
    add_job(pool, request=None, adopt_id=str(uuid.uuid4()))
    run_until_ended(pool, make_worker(pool, FakeApi()))
    state = record(pool).state
    assert state.status == "FAILED"
    assert state.error is not None and state.error.code == lifecycle.UPSTREAM_NOT_FOUND


def test_cancel_before_create_never_analyses(pool: ConnectionPool) -> None:
    api = FakeApi()
    add_job(pool)
    with pool.connection() as conn:
        request_action(conn, FLEET, "j1", "cancel", now=datetime.now(UTC))
    run_until_ended(pool, make_worker(pool, api))
    state = record(pool).state
    assert state.status == "STOPPED" and state.stopped_reason == "USER_ACTION"
    assert "analyse" not in api.calls and "start" not in api.calls


def test_lost_lease_means_no_action_runs(pool: ConnectionPool) -> None:
    api = FakeApi()
    add_job(pool)
    now = datetime.now(UTC)
    with pool.connection() as conn:
        (stale,) = leases.claim_due(conn, FLEET, "w1", now=now, lease=timedelta(seconds=1), limit=1)
        # The lease runs out (w1 paused) and w2 takes the job over.
        (fresh,) = leases.claim_due(
            conn, FLEET, "w2", now=now + timedelta(seconds=5), lease=timedelta(seconds=30), limit=1
        )
    assert fresh.generation == stale.generation + 1
    engine = make_engine(pool, api, name="w1")
    with pytest.raises(leases.LeaseLost):
        engine.drive(stale, [])
    assert api.calls == []
    assert record(pool).state == stale.state
    assert record(pool).lease_owner == "w2"


def test_two_engines_never_hold_one_job_at_once(pool: ConnectionPool) -> None:
    api = FakeApi()
    job_ids = [f"j{i}" for i in range(12)]
    for job_id in job_ids:
        add_job(pool, job_id)
    first, second = make_worker(pool, api, "w1"), make_worker(pool, api, "w2")
    other = threading.Thread(target=second.run)
    other.start()
    try:
        run_until_ended(pool, first, *job_ids)
    finally:
        second.request_stop()
        other.join(10)
    # Every job ran exactly one batch request; generations only ever rose (fenced saves).
    assert api.calls.count("create") == len(job_ids)
    for job_id in job_ids:
        events = statuses(pool, job_id)
        assert events[-1][1] == "DONE"
        assert len({s for s, _ in events}) == len(events)  # no sequence written twice


def test_request_stop_hands_jobs_back_at_once(pool: ConnectionPool) -> None:
    api = FakeApi()
    add_job(pool, auto_start=False)
    worker = make_worker(pool, api)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        for _ in range(200):
            if record(pool).state.status == "ANALYSIS_DONE":
                break
            threading.Event().wait(0.05)
    finally:
        worker.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    assert record(pool).lease_owner is None
    assert record(pool).state.status == "ANALYSIS_DONE"
    # Start it now; another engine carries it to the end.
    with pool.connection() as conn:
        request_action(conn, FLEET, "j1", "start", now=datetime.now(UTC))
    run_until_ended(pool, make_worker(pool, api, "w2"))
    assert record(pool).state.status == "DONE"


class CostlyAnalysis(FakeApi):
    """Analysis that has already cost 150 PU (the real API bills while processing)."""

    def _advance(self, task: Task) -> Task:
        task = super()._advance(task)
        return self._put(task, cost_pu=150.0) if task.status == "ANALYSIS_DONE" else task


def test_the_gauges_report_the_share_of_its_cost_cap_a_job_has_spent(
    pool: ConnectionPool,
) -> None:
    api, metrics = CostlyAnalysis(), Recorder()
    add_job(pool, auto_start=False, max_cost_pu=200.0)  # rests after analysis, in flight
    add_job(pool, "uncapped", auto_start=False)
    worker = make_worker(pool, api, metrics=metrics)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        for _ in range(200):
            if 0.75 in metrics.cost_shares:
                break
            threading.Event().wait(0.05)
    finally:
        worker.request_stop()
        thread.join(10)
    assert record(pool).state.cost_pu == 150.0
    assert 0.75 in metrics.cost_shares
    assert max(metrics.cost_shares) == 0.75  # the uncapped job counts for nothing


class CreateWaitsForTheTest(FakeApi):
    """A create that answers only once the test says so: a request can land mid-create."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.answer = threading.Event()

    def create(self, payload: dict[str, Any]) -> Task:
        self.entered.set()
        assert self.answer.wait(10)  # a hang guard; the test answers at once
        return super().create(payload)


def drive_with_request_during_create(
    pool: ConnectionPool, api: CreateWaitsForTheTest, action: str
) -> None:
    with pool.connection() as conn:
        (claim,) = leases.claim_due(
            conn, FLEET, "w1", now=datetime.now(UTC), lease=timedelta(seconds=30), limit=1
        )
    engine = make_engine(pool, api)
    driving = threading.Thread(target=engine.drive, args=(claim, []))
    driving.start()
    try:
        assert api.entered.wait(10)
        with pool.connection() as conn:  # intake, committed while the POST is in flight
            assert request_action(conn, FLEET, "j1", action, now=datetime.now(UTC))
    finally:
        api.answer.set()
        driving.join(10)
    assert not driving.is_alive()


def test_cancel_during_the_create_never_analyses_or_starts(pool: ConnectionPool) -> None:
    api = CreateWaitsForTheTest()
    add_job(pool, auto_start=False)
    drive_with_request_during_create(pool, api, "cancel")
    assert api.calls == ["create"]  # the Analyse decided before the cancel was never sent
    job = record(pool)
    assert (job.state.status, job.state.stopped_reason) == ("STOPPED", "USER_ACTION")
    assert job.state.batch_request_id == next(iter(api.tasks))
    assert job.state.duplicates_stopped == ()  # its own request is no duplicate
    assert job.cancel_requested_at is None and job.next_run_at is None
    assert statuses(pool) == [(1, "STOPPED")]


def test_start_during_the_create_starts_instead_of_analysing(pool: ConnectionPool) -> None:
    api = CreateWaitsForTheTest()
    add_job(pool, auto_start=False)
    drive_with_request_during_create(pool, api, "start")
    assert api.calls == ["create", "start"]
    job = record(pool)
    assert job.state.start_wanted and job.start_requested_at is None
    assert job.state.analyse_sent_at is None and job.state.start_sent_at is not None


class CreateAlsoLeavesADuplicate(FakeApi):
    """Each create also leaves an earlier request carrying the same tag, as a lost POST
    would; someone analysed it, so it can be stopped (ANALYSIS_DONE stays put here)."""

    def create(self, payload: dict[str, Any]) -> Task:
        with self.lock:
            lost = Task(
                id=f"lost-{uuid.uuid4()}",
                request=payload,
                status="ANALYSIS_DONE",
                created=datetime.now(UTC),
            )
            self.tasks[lost.id] = lost
        return super().create(payload)


def test_a_single_job_read_by_get_still_has_its_duplicates_swept(pool: ConnectionPool) -> None:
    api, metrics = CreateAlsoLeavesADuplicate(), Recorder()
    add_job(pool)
    run_until_ended(pool, make_worker(pool, api, metrics=metrics))
    (lost,) = (t for t in api.tasks.values() if t.id.startswith("lost-"))
    state = record(pool).state
    assert state.status == "DONE" and state.duplicates_stopped == (lost.id,)
    assert lost.id != state.batch_request_id
    assert api.tasks[lost.id].status == "STOPPED"
    assert metrics.duplicates >= 1
    assert "get" in api.calls  # one job: statuses are read by GET, the sweep lists anyway


def test_without_sweeps_a_single_job_never_lists(pool: ConnectionPool) -> None:
    # The baseline the test above improves on: GETs alone never see a duplicate.
    api = CreateAlsoLeavesADuplicate()
    add_job(pool)
    run_until_ended(pool, make_worker(pool, api, sweep_every_polls=None))
    assert record(pool).state.duplicates_stopped == ()
    assert "list" not in api.calls


# -- a request an uncertain create made, found after the job was cancelled --------------------

# The list lag is long here so nothing scans for the tag before the cancel ends the job (the
# steps below are driven one by one; no test waits for it).
SLOW_LIST = replace(FAST, list_lag_window=timedelta(seconds=30))


def cancelled_while_the_create_was_uncertain(
    pool: ConnectionPool, api: FakeApi, metrics: Recorder
) -> Worker:
    """The POST lands but times out; a cancel then ends the job before it learns of it."""
    api.create_times_out = True
    add_job(pool)
    worker = make_worker(pool, api, policy=SLOW_LIST, metrics=metrics)
    engine = worker.engine
    now = datetime.now(UTC)
    with pool.connection() as conn:
        (claim,) = leases.claim_due(
            conn, FLEET, "w1", now=now, lease=timedelta(seconds=30), limit=1
        )
    engine.drive(claim, [])  # Wake -> Create -> CreateUncertain; released to scan later
    with pool.connection() as conn:
        assert request_action(conn, FLEET, "j1", "cancel", now=now)
        (claim,) = leases.claim_due(
            conn, FLEET, "w1", now=now, lease=timedelta(seconds=30), limit=1, job_ids=["j1"]
        )
    engine.drive(claim, [])
    state = record(pool).state
    assert (state.status, state.batch_request_id, state.create_doubtful) == ("STOPPED", None, True)
    assert api.calls == ["create"]
    return worker


def test_a_running_request_found_after_the_cancel_is_stopped_and_reported(
    pool: ConnectionPool,
) -> None:
    api, metrics = FakeApi(), Recorder()
    worker = cancelled_while_the_create_was_uncertain(pool, api, metrics)
    (landed,) = api.tasks.values()
    api.tasks[landed.id] = landed.model_copy(update={"status": "ANALYSIS_DONE"})  # someone ran it
    worker.status.poll_once()  # a sweep at once for the ended doubtful job
    assert api.tasks[landed.id].status == "STOPPED"
    state = record(pool).state
    assert (state.status, state.duplicates_stopped) == ("STOPPED", (landed.id,))
    kinds = [
        (e["type"], e["data"]["status"], e["data"]["duplicates_stopped"]) for e in job_events(pool)
    ]
    assert kinds == [
        ("batchworker.job.status", "STOPPED", []),
        ("batchworker.job.progress", "STOPPED", [landed.id]),
    ]
    assert metrics.duplicates == 1
    assert metrics.finished == [("STOPPED", "USER_ACTION")]  # the job ended once
    assert record(pool).next_run_at is None


def test_a_created_request_found_after_the_cancel_is_left_alone_and_logged(
    pool: ConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    api, metrics = FakeApi(), Recorder()
    worker = cancelled_while_the_create_was_uncertain(pool, api, metrics)
    (landed,) = api.tasks.values()
    with caplog.at_level(logging.WARNING, logger="worker.daemon.poller"):
        worker.status.poll_once()
    assert "list" in api.calls and "stop" not in api.calls
    assert api.tasks[landed.id].status == "CREATED"
    assert record(pool).state.duplicates_stopped == ()
    assert [e["data"]["status"] for e in job_events(pool)] == ["STOPPED"]
    assert any(landed.id in r.getMessage() and "j1" in r.getMessage() for r in caplog.records)
    assert metrics.duplicates == 0


# --- liveness of the step threads -----------------------------------------------------


class HangingCreate(FakeApi):
    """A create that does not return until released: a call without a timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def create(self, payload: dict[str, Any]) -> Task:
        self.entered.set()
        assert self.release.wait(30), "never released"
        return super().create(payload)


class BrokenCreate(FakeApi):
    def create(self, payload: dict[str, Any]) -> Task:
        raise RuntimeError("a bug in a step")


def watched(pool: ConnectionPool, api: FakeApi) -> tuple[Engine, Health, FakeClock]:
    clock = FakeClock()
    health = Health(clock=clock)
    health.register(STEPS_LOOP, 100, per_thread=True)
    engine = make_engine(pool, api, on_progress=health.beat, on_idle=health.idle)
    return engine, health, clock


def test_a_step_that_hangs_stalls_the_step_loop_by_name(pool: ConnectionPool) -> None:
    api = HangingCreate()
    engine, health, clock = watched(pool, api)
    thread = threading.Thread(target=engine.run)
    thread.start()
    try:
        clock.now += 1000  # running with nothing to step: no thread is busy
        assert health.stalled() == []
        add_job(pool)
        assert api.entered.wait(10)
        clock.now += 99
        assert health.stalled() == []
        clock.now += 2
        assert [name for name, _, _ in health.stalled()] == ["engine-steps"]
        ok, detail = health.liveness()
        assert not ok
        assert detail == "loop engine-steps stalled: no progress for 101s (bound 100s)"
    finally:
        api.release.set()
    engine.request_stop()
    thread.join(10)
    assert not thread.is_alive()
    # Every step thread, the released one too, ended idle: nothing is left to go stale.
    clock.now += 1000
    assert health.stalled() == []
    assert health.progress()[STEPS_LOOP] == (0.0, 100)


def test_a_step_that_fails_leaves_its_thread_idle(pool: ConnectionPool) -> None:
    engine, health, clock = watched(pool, BrokenCreate())
    add_job(pool)
    with pool.connection() as conn:
        (claim,) = leases.claim_due(
            conn, FLEET, "w1", now=datetime.now(UTC), lease=timedelta(seconds=30), limit=1
        )
    with pytest.raises(RuntimeError):
        engine.drive(claim, [])  # marked busy at its first step, then the create raised
    clock.now += 1000
    assert health.stalled() == []
