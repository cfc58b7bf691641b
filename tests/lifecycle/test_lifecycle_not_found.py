"""The 404 window after create (batch-v2-api.md §3.3): an action the API answered 404 was not
taken, so it is sent again on the short schedule (``not_found_retries``), not after
``action_lag``; only past the window does the job end ``UPSTREAM_NOT_FOUND``."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from lifecycle_support import POLICY, RID, T0, Run, at, job, task

from worker.lifecycle import (
    UPSTREAM_NOT_FOUND,
    Analyse,
    CreateSucceeded,
    Phase,
    Poll,
    Start,
    TaskMissing,
    TaskSeen,
    Wake,
)


def created(*, auto_start: bool = True) -> Run:
    """Created at 0 (the 201 answers at 1); the step asked for the first start/analyse."""
    run = Run(job(auto_start=auto_start))
    run.feed(Wake(), at(0))
    t = run.feed(CreateSucceeded(task("CREATED")), at(1))
    assert t.actions == ((Start(RID),) if auto_start else (Analyse(RID),))
    return run


def test_a_start_answered_404_is_sent_again_at_once_then_on_the_schedule() -> None:
    run = created()
    t = run.feed(TaskMissing(action="start"), at(1))
    assert t.actions == (Start(RID),)  # the schedule's first delay is 0
    t = run.feed(TaskMissing(action="start"), at(1))
    assert t.actions == ()
    retry = at(1) + POLICY.not_found_retries[1]
    assert t.wake_at == retry  # seconds, not ACTION_LAG
    assert retry < at(1) + POLICY.action_lag
    # The wake reads the status first; the read shows the request now: start it at once.
    assert run.feed(Wake(), retry).actions == (Poll(RID, asap=True),)
    t = run.feed(TaskSeen(task("CREATED")), retry)
    assert Start(RID) in t.actions
    assert (t.state.not_found_count, t.state.resend_not_before) == (0, None)


def test_an_analyse_answered_404_is_sent_again_too() -> None:
    run = created(auto_start=False)
    t = run.feed(TaskMissing(action="analyse"), at(1))
    assert t.actions == (Analyse(RID),)


def test_an_accepted_start_is_still_not_resent_inside_the_action_lag() -> None:
    run = created()
    # The start went through; a later read answered 404 (the read side lags): no resend.
    t = run.feed(TaskMissing(), at(2))
    assert Start(RID) not in t.actions
    t = run.feed(TaskSeen(task("CREATED")), at(3))
    assert t.actions == ()
    assert t.wake_at == at(1) + POLICY.action_lag


def test_a_read_that_answers_404_keeps_the_resend_waiting_for_its_turn() -> None:
    run = created()
    run.feed(TaskMissing(action="start"), at(1))
    run.feed(TaskMissing(action="start"), at(1))  # resend not before 1 + 2 s
    t = run.feed(TaskMissing(), at(3))  # the wake's read: a third 404, 5 s more
    assert t.actions == ()
    assert t.state.resend_not_before == at(3) + POLICY.not_found_retries[2]
    assert t.wake_at == t.state.resend_not_before


def test_past_the_window_an_action_answered_404_ends_the_job_upstream_not_found() -> None:
    run = created()
    end = POLICY.not_found_window.total_seconds()  # the task's `created` is 0
    t = run.feed(TaskMissing(action="start"), at(end))
    assert (t.state.phase, t.state.status) == (Phase.ENDED, "FAILED")
    assert t.state.error is not None and t.state.error.code == UPSTREAM_NOT_FOUND
    assert t.actions == ()


answers = st.lists(
    st.tuples(
        st.integers(0, 30).map(lambda s: timedelta(seconds=s)),
        st.sampled_from([None, "start"]),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(history=answers, auto_start=st.booleans())
def test_inside_the_window_a_404_never_ends_the_job_and_the_action_comes_back_soon(
    history: list[tuple[timedelta, str | None]], auto_start: bool
) -> None:
    """Whatever run of 404s (reads and the action's own) comes inside the window: the job
    stays tracked, is woken (or re-reads at once) within the schedule's longest delay, and
    the action goes out again at the first read that finds the request, not ACTION_LAG on."""
    run = created(auto_start=auto_start)
    kind = "start" if auto_start else "analyse"
    action = Start(RID) if auto_start else Analyse(RID)
    window_end = T0 + POLICY.not_found_window
    longest = max(POLICY.not_found_retries)
    now = at(1)
    refused = False
    for delay, which in history:
        if now + delay >= window_end:
            break
        now += delay
        t = run.feed(TaskMissing(action=kind if which else None), now)
        refused = refused or which is not None
        assert t.state.phase is Phase.TRACKING
        resent = action in t.actions
        if resent:
            refused = False  # sent again in this very step (a zero delay)
        reread = Poll(RID, asap=True) in t.actions
        assert resent or reread or (t.wake_at is not None and t.wake_at <= now + longest)
    t = run.feed(TaskSeen(task("CREATED")), now)
    if refused:
        assert action in t.actions
    assert t.state.not_found_count == 0
