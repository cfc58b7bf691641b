"""The status loop against a real PostgreSQL and the scripted Batch API fake: what a round
reads, marks as seen and hands to the driver; the loop's stop and its errors."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from psycopg_pool import ConnectionPool

from tests.daemon.engine_support import (
    FAST,
    PAYLOAD,
    FakeApi,
    PollsOnAClock,
    add_job,
    make_status,
    make_worker,
    new_state,
    record,
    statuses,
)
from tests.store.store_support import insert_job
from worker import lifecycle
from worker.api.models import Task
from worker.daemon import status_loop
from worker.lifecycle import Observation, Phase, TaskSeen
from worker.store import leases

POOL_SIZE = 12  # the pool fixture's (tests/conftest.py): each step holds a connection


class RecordingDriver:
    """Takes the loop's claims and steps nothing: what the loop hands over, and how."""

    def __init__(self, *, hold: bool = False) -> None:
        self.driven: list[tuple[leases.Claim, list[Observation], threading.Event | None]] = []
        self.hold = hold  # keep each step until the loop's stop is set
        self.holding = threading.Event()

    def drive_safely(
        self,
        claim: leases.Claim,
        observations: list[Observation],
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self.driven.append((claim, observations, stop))
        if self.hold and stop is not None:
            self.holding.set()
            assert stop.wait(10)  # a hang guard: the test stops the loop at once


def tracked(pool: ConnectionPool, api: FakeApi, job_id: str, status: str, seen: datetime) -> None:
    """A job whose request exists upstream with ``status``, last read at ``seen``."""
    created = datetime.now(UTC) - timedelta(minutes=5)
    task = Task(id=f"req-{job_id}", request=PAYLOAD, status=status, created=created)
    api.tasks[task.id] = task
    state = new_state(job_id, now=created).model_copy(
        update={
            "phase": Phase.TRACKING,
            "batch_request_id": task.id,
            "upstream_created": created,
            "status": status,
            "upstream_status": status,
            "furthest_rank": lifecycle.STATUS_RANK[status],
            "last_seen_at": seen,
        }
    )
    with pool.connection() as conn:
        assert insert_job(conn, state, next_run_at=created)
        # Tracked jobs have no timed wake-up: only a status round claims them.
        conn.execute("UPDATE bw_jobs SET next_run_at = NULL")


def test_a_round_hands_the_moved_job_to_the_driver_and_marks_the_other_seen(
    pool: ConnectionPool,
) -> None:
    api, driver = FakeApi(), RecordingDriver()
    stale = datetime.now(UTC) - timedelta(hours=1)
    tracked(pool, api, "moves", "ANALYSING", stale)  # the fake's next read: ANALYSIS_DONE
    tracked(pool, api, "stays", "CREATED", stale)  # nobody analysed it: CREATED again
    now = datetime.now(UTC)
    loop = make_status(pool, api, driver, "w9", clock=lambda: now)
    assert loop.poll_once() == 0.2
    ((claim, observations, stop),) = driver.driven
    assert claim.state.job_id == "moves"
    assert [type(o) for o in observations] == [TaskSeen]
    assert isinstance(observations[0], TaskSeen)
    assert observations[0].task.status == "ANALYSIS_DONE"
    assert stop is loop._stop  # a stopping loop's steps take on no new action
    moved, stayed = record(pool, "moves"), record(pool, "stays")
    assert (moved.lease_owner, moved.generation) == ("w9", 1)  # claimed under a lease
    assert moved.last_seen_at == stale  # the step records its read, not the round
    assert (stayed.lease_owner, stayed.last_seen_at) == (None, now)


def test_a_round_with_nothing_due_reads_nothing_and_waits_for_the_soonest(
    pool: ConnectionPool,
) -> None:
    api, driver = FakeApi(), RecordingDriver()
    now = datetime.now(UTC)
    tracked(pool, api, "processing", "PROCESSING", now - timedelta(seconds=7))
    policy = replace(
        FAST, poll_interval=timedelta(seconds=10), rest_poll_interval=timedelta(seconds=60)
    )
    loop = make_status(pool, api, driver, clock=lambda: now, policy=policy, sweep_every_polls=None)
    assert loop.poll_once() == pytest.approx(3.0)  # read 7 s ago, due 10 s after its read
    assert api.calls == [] and driver.driven == []
    with pool.connection() as conn:  # now read less often: waiting for a start (60 s)
        conn.execute("UPDATE bw_jobs SET resting = true")
    assert loop.poll_once() == pytest.approx(10.0)  # never longer than one poll interval


def test_the_loop_beats_each_round_and_stops_its_steps_with_it(pool: ConnectionPool) -> None:
    api, driver = FakeApi(), RecordingDriver(hold=True)
    tracked(pool, api, "moves", "ANALYSING", datetime.now(UTC) - timedelta(hours=1))
    beats: list[float] = []
    loop = make_status(pool, api, driver, on_progress=lambda: beats.append(time.monotonic()))
    thread = threading.Thread(target=loop.run)
    thread.start()
    try:
        assert driver.holding.wait(10)  # a step in hand on the loop's own thread pool
        assert beats
    finally:
        loop.request_stop()
        thread.join(10)
    assert not thread.is_alive()  # the step in hand saw the stop, and the loop ended
    ((claim, _, stop),) = driver.driven
    assert claim.state.job_id == "moves" and stop is not None and stop.is_set()


def test_a_failed_round_is_logged_and_the_loop_goes_on(
    pool: ConnectionPool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    class FailsOnce(FakeApi):
        def get(self, task_id: str, *, created_at: datetime | None = None) -> Task:
            if not self.calls:
                self.calls.append("boom")
                raise RuntimeError("a bug in a round")
            return super().get(task_id, created_at=created_at)

    monkeypatch.setattr(status_loop, "ERROR_WAIT", 0.05)
    api, driver = FailsOnce(), RecordingDriver()
    tracked(pool, api, "moves", "ANALYSING", datetime.now(UTC) - timedelta(hours=1))
    loop = make_status(pool, api, driver, sweep_every_polls=None)
    thread = threading.Thread(target=loop.run)
    with caplog.at_level(logging.ERROR, logger="worker.daemon.status_loop"):
        thread.start()
        try:
            for _ in range(200):  # a hang guard: the second round comes 50 ms later
                if driver.driven:
                    break
                time.sleep(0.05)
        finally:
            loop.request_stop()
            thread.join(10)
    assert api.calls[:2] == ["boom", "get"]
    assert [c.state.job_id for c, _, _ in driver.driven] == ["moves"]
    assert any("a bug in a round" in r.getMessage() for r in caplog.records)


class Crawling(FakeApi):
    """Running tasks never finish: each read finds their completion a step further on."""

    def _advance(self, task: Task) -> Task:
        if task.status == "PROCESSING":
            return self._put(task, completion_percentage=(task.completion_percentage or 0) + 1)
        return super()._advance(task)


def test_progress_with_no_room_to_step_counts_as_read(pool: ConnectionPool) -> None:
    api, job_ids = Crawling(), ("j1", "j2", "j3")
    for job_id in job_ids:
        add_job(pool, job_id)
    running = make_worker(pool, api)
    thread = threading.Thread(target=running.run)
    thread.start()
    try:
        for _ in range(400):  # a hang guard: well under 2 s
            if all(record(pool, j).state.status == "PROCESSING" for j in job_ids):
                break
            time.sleep(0.05)
    finally:
        running.request_stop()
        thread.join(10)
    assert all(record(pool, j).state.status == "PROCESSING" for j in job_ids)
    with pool.connection() as conn:
        conn.execute("UPDATE bw_jobs SET last_seen_at = now() - interval '1 hour'")
    now = datetime.now(UTC)
    worker = make_worker(pool, api, clock=lambda: now)  # time stands still
    worker.status._progress_backlog = 0  # no room for a step that only shows progress
    events = statuses(pool, "j1")
    worker.status.poll_once()
    assert "list" in api.calls  # three due: one page
    with pool.connection() as conn:
        seen = dict(conn.execute("SELECT job_id, last_seen_at FROM bw_jobs").fetchall())
    assert seen == {job_id: now for job_id in job_ids}  # read, and counted as read
    assert statuses(pool, "j1") == events  # not stepped
    # Nothing is due now: the next round reads nothing (left due, all three were read again).
    calls = len(api.calls)
    worker.status.poll_once()
    assert len(api.calls) == calls


def test_a_processing_job_is_read_by_its_rate_not_every_interval(pool: ConnectionPool) -> None:
    api = FakeApi()
    start = datetime.now(UTC) - timedelta(hours=1)
    tracked(pool, api, "slow", "PROCESSING", start)
    polls = PollsOnAClock(
        pool, api, RecordingDriver(), start=start, requests=lambda: len(api.calls)
    )
    read_at = polls.read_at

    def seen(after: float, completion: float) -> None:
        with pool.connection() as conn:
            conn.execute(
                "UPDATE bw_jobs SET last_seen_at = %s, completion = %s",
                (start + timedelta(seconds=after), completion),
            )

    seen(0, 10.0)
    assert not read_at(1)  # the processing run's first read: no rate yet
    seen(60, 20.0)  # 10 points a minute: the end is 8 minutes off
    assert not read_at(60 + 11)  # due on the fixed clock, not by the rate
    assert not read_at(60 + 119)
    assert read_at(60 + 120)  # the freshness bound
    seen(500, 90.0)  # 80 points in 500 s: 62.5 s to go
    assert not read_at(500 + 52)
    assert read_at(500 + 53)  # an interval before the predicted end


class AtTheEnd(FakeApi):
    """Processing tasks stay at 100 %, their DONE still to come (the API's lag, §3.3)."""

    def _advance(self, task: Task) -> Task:
        if task.status == "PROCESSING":
            return self._put(task, completion_percentage=100.0)
        return super()._advance(task)


def test_a_read_at_100_percent_not_yet_stepped_is_followed_soon(pool: ConnectionPool) -> None:
    api, driver = AtTheEnd(), RecordingDriver()
    start = datetime.now(UTC) - timedelta(hours=1)
    tracked(pool, api, "ending", "PROCESSING", start)
    polls = PollsOnAClock(pool, api, driver, start=start, requests=lambda: len(api.calls))
    polls.loop._progress_backlog = 0  # no room: the 100 % is read, not stepped (nor saved)

    assert polls.read_at(10)  # due on the fixed clock
    assert driver.driven == []
    assert record(pool, "ending").state.completion == 0.0  # what was saved stays behind
    # Every tile is done: DONE follows by the API's lag, so the next read comes at half an
    # interval, not at the interval the saved 0 % would have given.
    assert not polls.read_at(10 + 4.9)
    assert polls.read_at(10 + 5)
