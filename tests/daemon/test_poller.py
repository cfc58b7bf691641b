"""The poller's choice between list pages and GETs, and what a round observes (unit tests)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from worker import lifecycle
from worker.api.errors import NotFound
from worker.api.models import Page, Task
from worker.daemon.actions import snapshot
from worker.daemon.poller import (
    Poller,
    PollResult,
    SweepSchedule,
    due_targets,
    jobs_read,
    jobs_to_step,
    sweep_reach,
)
from worker.lifecycle import DuplicateFound, TaskMissing, TaskSeen
from worker.store.jobs import PollTarget

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
FLEET = "f"


class ListingApi:
    def __init__(self, tasks: list[Task], page_size: int) -> None:
        self.tasks = sorted(tasks, key=lambda t: t.created or T0, reverse=True)
        self.page_size = page_size
        self.pages = 0
        self.gets = 0

    def iter_pages(
        self, *, sort: str = "created:desc", search: str | None = None, count: int | None = None
    ) -> Iterator[Page]:
        for start in range(0, len(self.tasks), self.page_size):
            self.pages += 1
            more = start + self.page_size < len(self.tasks)
            yield Page(
                tasks=self.tasks[start : start + self.page_size],
                next_token="t" if more else None,
            )

    def get(self, task_id: str, *, created_at: datetime | None = None) -> Task:
        self.gets += 1
        for task in self.tasks:
            if task.id == task_id:
                return task
        raise NotFound("gone", http_status=404)


def target(i: int, status: str = "PROCESSING", seen: datetime | None = None) -> PollTarget:
    return PollTarget(
        job_id=f"j{i}",
        batch_request_id=f"b{i}",
        upstream_created=T0 + timedelta(seconds=i),
        status=status,
        completion=0.0,
        cost_pu=None,
        last_seen_at=seen,
    )


def task(i: int, status: str = "PROCESSING", description: str = "") -> Task:
    return Task(
        id=f"b{i}",
        status=status,
        created=T0 + timedelta(seconds=i),
        request={"description": description},
    )


def test_many_due_jobs_are_read_from_list_pages() -> None:
    targets = [target(i) for i in range(50)]
    tasks = [task(i, "DONE" if i == 7 else "PROCESSING") for i in range(50)]
    api = ListingApi(tasks, page_size=20)
    result = Poller(api, FLEET, initial_page_size=20).round(targets, targets)
    assert result.method == "list"
    assert (api.pages, api.gets) == (3, 0)
    assert list(result.observations) == ["j7"]
    assert isinstance(result.observations["j7"][0], TaskSeen)
    assert len(result.unchanged) == 49


def test_one_old_job_due_is_cheaper_with_a_get() -> None:
    targets = [target(i, seen=T0) for i in range(50)]
    due = [target(0)]
    api = ListingApi([task(i) for i in range(50)], page_size=20)
    result = Poller(api, FLEET, initial_page_size=20).round(targets, due)
    assert result.method == "get"
    assert (api.pages, api.gets) == (0, 1)
    assert result.unchanged == ["j0"]


def test_missing_task_and_duplicates_become_observations() -> None:
    targets = [target(i) for i in range(10)]
    tag = lifecycle.tag_for(FLEET, "j3")
    tasks = [task(i) for i in range(10) if i != 5]
    tasks.append(
        Task(
            id="dup",
            status="ANALYSING",
            created=T0 + timedelta(seconds=9),
            request={"description": f"same job {tag}"},
        )
    )
    api = ListingApi(tasks, page_size=100)
    result = Poller(api, FLEET, initial_page_size=100).round(targets, targets)
    assert result.observations["j3"] == [DuplicateFound(batch_request_id="dup")]
    # j5 was not in the list: the poller falls back to a GET, which answers 404.
    assert result.observations["j5"] == [TaskMissing()]
    assert api.gets == 1


def test_a_new_status_is_urgent_and_moved_completion_is_only_progress() -> None:
    targets = [target(i) for i in range(4)]
    tasks = [
        task(0, "DONE"),  # a new status
        task(1).model_copy(update={"completion_percentage": 40.0}),  # progress
        task(2).model_copy(update={"cost_pu": 12.0}),  # progress
        task(3),  # unchanged
    ]
    api = ListingApi(tasks, page_size=100)
    result = Poller(api, FLEET, initial_page_size=100).round(targets, targets)
    assert set(result.observations) == {"j0", "j1", "j2"}
    assert result.urgent == {"j0"}
    assert result.progress_only() == ["j2", "j1"]  # the order read: newest first
    assert result.unchanged == ["j3"]


def test_missing_and_duplicates_are_urgent() -> None:
    result = PollResult()
    result.add("a", TaskMissing())
    result.add("b", DuplicateFound(batch_request_id="x"))
    result.add("b", TaskSeen(snapshot(task(1))), progress=True)  # progress too, still urgent
    result.add("c", TaskSeen(snapshot(task(2))), progress=True)
    assert result.urgent == {"a", "b"}
    assert result.progress_only() == ["c"]


def test_steps_take_every_urgent_job_and_progress_while_there_is_room() -> None:
    targets = [
        target(1, seen=T0 + timedelta(seconds=30)),
        target(2, seen=T0 + timedelta(seconds=10)),
        target(3, seen=T0 + timedelta(seconds=20)),
        target(4),
    ]
    result = PollResult()
    for job_id in ("j1", "j2", "j3"):
        result.add(job_id, TaskSeen(snapshot(task(1))), progress=True)
    result.add("j4", TaskSeen(snapshot(task(4, "DONE"))))
    assert jobs_to_step(result, targets, progress_room=10) == ["j4", "j1", "j2", "j3"]
    # No room for all: the least recently seen first.
    assert jobs_to_step(result, targets, progress_room=2) == ["j4", "j2", "j3"]
    assert jobs_to_step(result, targets, progress_room=0) == ["j4"]


def test_what_a_round_read_and_does_not_step_counts_as_seen() -> None:
    result = PollResult(unchanged=["j5", "j6"])
    for job_id in ("j1", "j2", "j3"):
        result.add(job_id, TaskSeen(snapshot(task(1))), progress=True)
    result.add("j4", TaskSeen(snapshot(task(4, "DONE"))))
    # Progress with no room to step: read all the same, not read again next round.
    assert jobs_read(result, ["j4", "j2"]) == ["j5", "j6", "j1", "j3"]
    # A new status is never marked seen unstepped: its step records it.
    assert jobs_read(result, []) == ["j5", "j6", "j1", "j2", "j3"]


def test_due_targets_are_the_stale_ones_stalest_first() -> None:
    fresh, stale, never = target(1, seen=T0), target(2, seen=T0 - timedelta(minutes=1)), target(3)
    staler = target(4, seen=T0 - timedelta(minutes=2))
    due = due_targets([fresh, stale, never, staler], now=T0, interval=timedelta(seconds=30))
    assert due == [never, staler, stale]


def test_a_resting_job_is_due_only_after_the_rest_interval() -> None:
    seen = T0 - timedelta(minutes=1)
    resting = replace(target(1, "ANALYSIS_DONE", seen=seen), resting=True)
    working = target(2, seen=seen)
    due = due_targets(
        [resting, working],
        now=T0,
        interval=timedelta(seconds=30),
        rest_interval=timedelta(minutes=10),
    )
    assert due == [working]


def test_a_job_with_a_read_time_of_its_own_is_due_from_that_time() -> None:
    seen = T0 - timedelta(minutes=1)
    later, sooner, clock = target(1, seen=seen), target(2, seen=seen), target(3, seen=seen)
    read_at = {"j1": T0 + timedelta(seconds=1), "j2": T0 - timedelta(seconds=1)}
    due = due_targets(
        [later, sooner, clock, target(4)],
        now=T0,
        interval=timedelta(seconds=30),
        read_at=read_at,
    )
    assert [t.job_id for t in due] == ["j4", "j2", "j3"]  # never read, then stalest first


def test_a_round_spends_no_more_than_its_requests_stalest_first() -> None:
    targets = [target(i, seen=T0 - timedelta(seconds=100 - i)) for i in range(10)]
    api = ListingApi([task(i) for i in range(10)], page_size=1)
    result = Poller(api, FLEET, initial_page_size=1).round(targets, targets, max_requests=3)
    assert (result.method, result.requests, api.gets) == ("get", 3, 3)
    assert result.unchanged == ["j0", "j1", "j2"]


def test_a_list_scan_stops_at_the_request_limit() -> None:
    targets = [target(i) for i in range(50)]
    api = ListingApi([task(i) for i in range(50)], page_size=10)
    result = Poller(api, FLEET, initial_page_size=10).round(targets, targets, max_requests=2)
    assert (result.method, api.pages, api.gets, result.requests) == ("list", 2, 0, 2)
    assert len(result.unchanged) == 20


def test_only_duplicates_that_can_still_run_are_reported() -> None:
    targets = [target(i) for i in range(5)]
    tag = lifecycle.tag_for(FLEET, "j0")
    extra = [
        Task(
            id=f"dup-{status}",
            status=status,
            created=T0 + timedelta(seconds=1),
            request={"description": f"x {tag}"},
        )
        for status in ("CREATED", "ANALYSING", "ANALYSIS_DONE", "PROCESSING", "DONE", "STOPPED")
    ]
    api = ListingApi([*(task(i) for i in range(5)), *extra], page_size=100)
    result = Poller(api, FLEET).round(targets, targets)
    assert result.observations["j0"] == [
        DuplicateFound(batch_request_id=f"dup-{s}")
        for s in ("ANALYSING", "ANALYSIS_DONE", "PROCESSING")
    ]


# -- duplicate sweeps ------------------------------------------------------------------------


def duplicate_of(job_id: str, created: datetime, status: str = "ANALYSING") -> Task:
    tag = lifecycle.tag_for(FLEET, job_id)
    return Task(id=f"dup-{job_id}", status=status, created=created, request={"description": tag})


def test_a_sweep_lists_for_duplicates_where_gets_would_be_cheaper() -> None:
    targets = [target(i, seen=T0) for i in range(3)]
    due = [target(0)]
    tasks = [task(i) for i in range(3)]
    tasks.append(duplicate_of("j1", T0 + timedelta(seconds=5)))
    api = ListingApi(tasks, page_size=100)
    poller = Poller(api, FLEET)
    assert poller.round(targets, due).method == "get"  # without a sweep: one GET, blind
    api.gets = 0
    result = poller.round(targets, due, sweep=True)
    assert (result.method, result.swept, api.pages, api.gets) == ("sweep", True, 1, 0)
    assert result.observations == {"j1": [DuplicateFound(batch_request_id="dup-j1")]}
    assert sorted(result.unchanged) == ["j0", "j1", "j2"]  # the scan read their statuses


def test_a_sweep_finds_a_duplicate_of_a_follow_up_by_its_attempt_tag() -> None:
    """A follow-up carries its attempt's tag, not the job's first one; the job's own earlier
    requests (DONE, over) carry theirs and are no duplicates."""
    follow = replace(target(1, seen=T0), batch_request_id="follow", attempt=2)
    first_tag = lifecycle.tag_for(FLEET, "j1")
    tasks = [
        task(0),
        Task(id="b1", status="DONE", created=T0, request={"description": first_tag}),
        Task(
            id="follow",
            status="PROCESSING",
            created=T0 + timedelta(seconds=3),
            request={"description": lifecycle.attempt_tag(FLEET, "j1", 2)},
        ),
        *(
            Task(
                id=f"dup-{attempt}",
                status="ANALYSING",
                created=T0 + timedelta(seconds=4 + attempt),
                request={"description": f"copy {lifecycle.attempt_tag(FLEET, 'j1', attempt)}"},
            )
            for attempt in (1, 2)
        ),
    ]
    api = ListingApi(tasks, page_size=100)
    result = Poller(api, FLEET).round([target(0, seen=T0), follow], [], sweep=True)
    # Newest first, as the list reads.
    assert result.observations == {
        "j1": [DuplicateFound(batch_request_id="dup-2"), DuplicateFound(batch_request_id="dup-1")]
    }


def test_a_sweep_runs_with_nothing_due_and_reaches_back_past_a_doubtful_create() -> None:
    skew = timedelta(seconds=30)
    accepted = T0 - timedelta(minutes=5)
    doubtful = replace(target(0, seen=T0), create_doubtful=True, accepted_at=accepted)
    others = [target(i, seen=T0) for i in (1, 2)]
    # The lost POST made its request minutes before the one the job found by its tag.
    lost = duplicate_of("j0", accepted + timedelta(seconds=1), status="PROCESSING")
    api = ListingApi([*(task(i) for i in range(3)), lost], page_size=2)
    assert sweep_reach([doubtful, *others]) == accepted
    assert sweep_reach(others) == T0 + timedelta(seconds=1)
    result = Poller(api, FLEET, clock_skew=skew).round([doubtful, *others], [], sweep=True)
    assert result.swept and api.pages == 2
    assert result.observations == {"j0": [DuplicateFound(batch_request_id="dup-j0")]}


def test_a_sweep_stays_inside_the_round_budget() -> None:
    targets = [target(i, seen=T0) for i in range(30)]
    api = ListingApi([task(i) for i in range(30)], page_size=10)
    result = Poller(api, FLEET).round(targets, targets[:1], max_requests=2, sweep=True)
    assert (result.requests, api.pages, api.gets, result.swept) == (2, 2, 0, False)


def test_sweeps_come_every_interval_and_soon_after_a_doubtful_create() -> None:
    every, lag = timedelta(minutes=2), timedelta(minutes=1)
    schedule = SweepSchedule(every=every, list_lag=lag)
    plain = [target(1, seen=T0)]
    assert not schedule.wanted([], T0)  # no active job, nothing to sweep for
    assert schedule.wanted(plain, T0)  # the first round after a start
    schedule.done(plain, started=T0, complete=True)
    assert not schedule.wanted(plain, T0 + every - timedelta(seconds=1))
    assert schedule.next_at(plain) == T0 + every
    # A doubtful create turns up: a sweep at once, and one more when the list has settled.
    created = T0 + timedelta(seconds=10)
    doubtful = replace(target(2), upstream_created=created, create_doubtful=True)
    jobs = [*plain, doubtful]
    assert schedule.wanted(jobs, T0 + timedelta(seconds=11))
    schedule.done(jobs, started=T0 + timedelta(seconds=11), complete=False)
    assert schedule.wanted(jobs, T0 + timedelta(seconds=12))  # cut short: not reached yet
    schedule.done(jobs, started=T0 + timedelta(seconds=12), complete=True)
    assert schedule.next_at(jobs) == created + lag
    assert not schedule.wanted(jobs, created + lag - timedelta(seconds=1))
    assert schedule.wanted(jobs, created + lag)
    schedule.done(jobs, started=created + lag, complete=True)
    assert schedule.next_at(jobs) == created + lag + every  # only the regular ones now


# -- ended jobs whose create was doubtful ----------------------------------------------------


def ended_target(job_id: str = "j9", intent: datetime = T0) -> PollTarget:
    """A job cancelled while its create was uncertain: no request of its own is known."""
    return PollTarget(
        job_id=job_id,
        batch_request_id=None,
        upstream_created=None,
        status="STOPPED",
        completion=0.0,
        cost_pu=None,
        last_seen_at=None,
        create_doubtful=True,
        accepted_at=intent - timedelta(seconds=5),
        ended=True,
        intent_at=intent,
    )


def test_an_ended_doubtful_job_is_swept_until_one_complete_sweep_after_its_create_settled() -> None:
    every, lag = timedelta(minutes=2), timedelta(minutes=1)
    schedule = SweepSchedule(every=every, list_lag=lag)
    ended = schedule.lingering([ended_target()])
    assert schedule.wanted(ended, T0)  # at once
    schedule.done(ended, started=T0, complete=True)
    # Once more when its last POST shows in the list, not on the regular cadence.
    assert schedule.next_at(ended) == T0 + lag
    assert schedule.lingering([ended_target()]) == ended  # the list may not show it yet
    schedule.done(ended, started=T0 + lag, complete=False)  # cut short by the budget
    assert schedule.lingering([ended_target()]) == ended
    assert schedule.wanted(ended, T0 + lag)
    schedule.done(ended, started=T0 + lag, complete=True)
    assert schedule.lingering([ended_target()]) == []
    assert schedule.next_at([]) is None


def test_a_sweep_reports_a_running_request_of_an_ended_job_and_logs_a_created_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = duplicate_of("j8", T0, status="PROCESSING")
    created = duplicate_of("j9", T0, status="CREATED").model_copy(update={"id": "dup-created"})
    api = ListingApi([running, created], page_size=100)
    targets = [ended_target("j8"), ended_target("j9")]
    poller = Poller(api, FLEET)
    with caplog.at_level(logging.WARNING, logger="worker.daemon.poller"):
        result = poller.round(targets, [], sweep=True)
        assert result.observations == {"j8": [DuplicateFound(batch_request_id="dup-j8")]}
        assert result.unchanged == []  # an ended job's status is never read
        poller.round(targets, [], sweep=True)  # the CREATED one is logged once, not per sweep
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "j9" in warnings[0] and "dup-created" in warnings[0] and "CREATED" in warnings[0]


def test_an_ended_jobs_own_request_is_neither_read_nor_a_duplicate() -> None:
    own = task(9, status="CREATED", description=lifecycle.tag_for(FLEET, "j9"))
    ended = replace(ended_target(), batch_request_id=own.id, upstream_created=own.created)
    api = ListingApi([own], page_size=100)
    result = Poller(api, FLEET).round([ended], [], sweep=True)
    assert (result.observations, result.unchanged, api.pages) == ({}, [], 1)


def test_a_list_scan_reaches_on_to_older_jobs_that_will_soon_be_due() -> None:
    # Jobs 0-9 are old and not due yet; 20-59 are due. The scan for the due ones would
    # stop at job 20; it goes on to the soon-due 5, so that job 5 does not cost a scan of
    # its own through the same pages when it comes due.
    targets = [target(i, seen=T0) for i in range(60)]
    due = [target(i) for i in range(20, 60)]
    api = ListingApi([task(i) for i in range(60)], page_size=10)
    poller = Poller(api, FLEET, initial_page_size=10, clock_skew=timedelta(0))
    result = poller.round(targets, due, due_soon=[target(5, seen=T0)])
    assert result.method == "list"
    assert api.pages == 6  # 59..50, ..., 9..0: down to job 5's page
    assert {f"j{i}" for i in range(5, 60)} <= set(result.unchanged)
    # Without it, the scan stops at job 20's page.
    api = ListingApi([task(i) for i in range(60)], page_size=10)
    Poller(api, FLEET, initial_page_size=10, clock_skew=timedelta(0)).round(targets, due)
    assert api.pages == 5


def test_soon_due_jobs_never_turn_a_round_of_gets_into_a_scan() -> None:
    targets = [target(i, seen=T0) for i in range(50)]
    api = ListingApi([task(i) for i in range(50)], page_size=20)
    result = Poller(api, FLEET, initial_page_size=20).round(
        targets, [target(40)], due_soon=[target(i) for i in range(10)]
    )
    assert result.method == "get"
    assert (api.pages, api.gets) == (0, 1)
