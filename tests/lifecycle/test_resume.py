"""Resume by policy: an API stop named in resume_on pauses the job, then STARTs it again."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifecycle_support import RID, T0, Run, at, job, task

from worker.lifecycle import (
    PAUSED,
    TERMINAL,
    ActionRefused,
    CancelRequested,
    JobError,
    JobState,
    OutOfPuRule,
    Phase,
    Policy,
    Poll,
    ResumeOn,
    Start,
    StartRequested,
    Stop,
    TaskMissing,
    TaskSeen,
    Tiles,
    TilesSeen,
    UnhealthyRule,
    Wake,
    fold_requests,
    poll_view,
)
from worker.lifecycle.resume import jitter

POLICY = Policy(
    poll_interval=timedelta(seconds=5),
    action_lag=timedelta(seconds=8),
    tiles_wait=timedelta(seconds=1),
    restart_block=timedelta(seconds=60),
    restart_jitter=timedelta(seconds=10),
)
UNHEALTHY_TWICE = ResumeOn(UNHEALTHY=UnhealthyRule(attempts=2))
PARKED = ResumeOn(OUT_OF_PU=OutOfPuRule(until=None))


def with_rules(state: JobState, rules: ResumeOn | None) -> JobState:
    return state.model_copy(update={"resume_on": rules})


def stopped(reason: str, cost: float = 50.0) -> TaskSeen:
    return TaskSeen(task("STOPPED", stopped_reason=reason, completion_percentage=30, cost_pu=cost))


def track(state: JobState) -> JobState:
    return state.model_copy(update={"phase": Phase.TRACKING, "batch_request_id": RID})


def resumed_run(rules: ResumeOn | None, **kwargs: object) -> Run:
    run = Run(track(with_rules(job(**kwargs), rules)), policy=POLICY)  # type: ignore[arg-type]
    run.feed(TaskSeen(task("PROCESSING", completion_percentage=30, cost_pu=50)), at(0))
    run.feed(TilesSeen(Tiles(total=4, processed=1)), at(1))
    return run


def test_an_unhealthy_stop_pauses_then_starts_again_after_the_block_and_ends_done() -> None:
    run = resumed_run(UNHEALTHY_TWICE)
    t = run.feed(stopped("UNHEALTHY"), at(10))
    pause = t.state.pause
    assert pause is not None and pause.reason == "UNHEALTHY"
    assert t.state.phase is Phase.TRACKING and t.state.status == PAUSED
    assert t.state.stopped_reason == "UNHEALTHY"
    assert [e.kind for e in t.emits] == ["status"]
    # After the block, within the jitter; the wake is the resume.
    block_ends = at(10) + POLICY.restart_block
    assert pause.resume_at is not None
    assert block_ends <= pause.resume_at < block_ends + POLICY.restart_jitter
    assert t.wake_at == pause.resume_at
    assert not any(isinstance(a, Start) for a in t.actions)
    assert poll_view(t.state).resting  # read at the rest interval meanwhile

    # Woken early (a lease run out): nothing is sent inside the block.
    early = run.feed(Wake(), at(30))
    assert early.actions == () and early.wake_at == pause.resume_at
    t = run.feed(Wake(), pause.resume_at)
    assert t.actions == (Start(RID),)
    assert t.state.resumed == ("UNHEALTHY",) and t.emits == ()
    assert not poll_view(t.state).resting
    sent = pause.resume_at
    # A stale STOPPED read (the status lags the START) changes nothing.
    t = run.feed(stopped("UNHEALTHY"), sent + timedelta(seconds=2))
    assert t.state.status == PAUSED and t.actions == () and t.emits == ()
    # The restart shows: ANALYSIS_DONE, then PROCESSING from where it stopped, then DONE.
    t = run.feed(
        TaskSeen(task("ANALYSIS_DONE", completion_percentage=30, cost_pu=50)),
        sent + timedelta(seconds=4),
    )
    assert t.state.pause is None and t.state.status == "ANALYSIS_DONE"
    assert t.state.stopped_reason is None
    run.feed(
        TaskSeen(task("PROCESSING", completion_percentage=60, cost_pu=80)),
        sent + timedelta(seconds=20),
    )
    t = run.feed(
        TaskSeen(task("DONE", completion_percentage=100, cost_pu=120)), sent + timedelta(seconds=40)
    )
    t = run.feed(TilesSeen(Tiles(total=4, processed=4)), sent + timedelta(seconds=41))
    assert t.state.phase is Phase.ENDED and t.state.status == "DONE"
    statuses = [s for kind, s in run.emitted if kind == "status"]
    assert statuses == ["PROCESSING", PAUSED, "ANALYSIS_DONE", "PROCESSING", "DONE"]
    assert sum(s in TERMINAL for s in statuses) == 1


def test_a_done_read_out_of_a_pause_ends_the_pause_and_the_job_done_after_its_tiles() -> None:
    # Found by the property below: the request went on by itself (someone else started it)
    # and finished. The pause ends with that read; PAUSED stays published only while the
    # end waits for the final tile counts, then DONE is the one terminal event.
    run = resumed_run(UNHEALTHY_TWICE)
    run.feed(stopped("UNHEALTHY"), at(10))
    t = run.feed(TaskSeen(task("DONE", completion_percentage=100, cost_pu=90)), at(11))
    assert t.state.pause is None and t.state.ending_since is not None
    assert t.state.status == PAUSED and t.emits == ()
    t = run.feed(TilesSeen(Tiles(total=4, processed=4)), at(12))
    assert t.state.phase is Phase.ENDED and t.state.status == "DONE"
    assert t.state.tiles is not None and t.state.tiles.processed == 4
    statuses = [s for kind, s in run.emitted if kind == "status"]
    assert statuses == ["PROCESSING", PAUSED, "DONE"]


def test_unhealthy_stops_beyond_the_attempts_end_the_job_stopped() -> None:
    run = resumed_run(ResumeOn(UNHEALTHY=UnhealthyRule(attempts=1)))
    pause = run.feed(stopped("UNHEALTHY"), at(10)).state.pause
    assert pause is not None and pause.resume_at is not None
    run.feed(Wake(), pause.resume_at)
    later = pause.resume_at + timedelta(seconds=5)
    run.feed(TaskSeen(task("PROCESSING", completion_percentage=40, cost_pu=60)), later)
    # Stopped again: no attempt left, so the job ends as before (after its last tile read).
    t = run.feed(stopped("UNHEALTHY", cost=70), later + timedelta(seconds=5))
    assert t.state.pause is None and t.state.ending_since is not None
    t = run.feed(TilesSeen(Tiles(total=4, processed=1)), later + timedelta(seconds=6))
    assert (t.state.phase, t.state.status, t.state.stopped_reason) == (
        Phase.ENDED,
        "STOPPED",
        "UNHEALTHY",
    )


def test_a_restart_that_stopped_again_between_two_reads_counts_as_a_new_stop() -> None:
    run = resumed_run(UNHEALTHY_TWICE)
    first = run.feed(stopped("UNHEALTHY"), at(10)).state.pause
    assert first is not None and first.resume_at is not None
    run.feed(Wake(), first.resume_at)
    # The next read is STOPPED again, but it billed more: it ran and stopped again.
    t = run.feed(stopped("UNHEALTHY", cost=90), first.resume_at + timedelta(seconds=30))
    second = t.state.pause
    assert second is not None and second.since == first.resume_at + timedelta(seconds=30)
    assert second.restart_sent_at is None and t.state.resumed == ("UNHEALTHY",)


def test_out_of_pu_parks_until_a_resume_then_starts_once_the_block_allows() -> None:
    run = resumed_run(PARKED)
    t = run.feed(stopped("OUT_OF_PU"), at(10))
    pause = t.state.pause
    assert pause is not None and pause.resume_at is None and pause.next_start_at is None
    assert t.wake_at is None  # nothing but a resume (or a deadline) moves it
    assert run.feed(Wake(), at(5000)).actions == ()
    # A resume inside the block waits for its end; one after it starts at once.
    t = run.feed(StartRequested(), at(20))
    assert t.actions == () and t.wake_at == pause.earliest
    assert t.state.pause is not None and t.state.pause.next_start_at == pause.earliest
    t = run.feed(Wake(), pause.earliest)
    assert t.actions == (Start(RID),) and t.state.resumed == ("OUT_OF_PU",)


def test_out_of_pu_with_a_date_starts_then_and_a_resume_folded_mid_step_counts() -> None:
    until = at(3600)
    run = resumed_run(ResumeOn(OUT_OF_PU=OutOfPuRule(until=until)))
    t = run.feed(stopped("OUT_OF_PU"), at(10))
    assert t.state.pause is not None and t.state.pause.resume_at == until
    assert t.wake_at == until
    folded = fold_requests(t.state, cancel=False, start=True)
    assert folded.pause is not None and folded.pause.resume_requested
    assert folded.pause.next_start_at == folded.pause.earliest


def test_cancel_of_a_paused_job_ends_it_stopped_at_once() -> None:
    run = resumed_run(UNHEALTHY_TWICE)
    run.feed(stopped("UNHEALTHY"), at(10))
    t = run.feed(CancelRequested(), at(20))
    assert (t.state.phase, t.state.status, t.state.stopped_reason) == (
        Phase.ENDED,
        "STOPPED",
        "USER_ACTION",
    )
    assert t.actions == () and [e.kind for e in t.emits] == ["status"]


def test_cancel_just_after_the_restart_stops_it_and_waits_out_the_lag() -> None:
    run = resumed_run(UNHEALTHY_TWICE)
    pause = run.feed(stopped("UNHEALTHY"), at(10)).state.pause
    assert pause is not None and pause.resume_at is not None
    sent = pause.resume_at
    run.feed(Wake(), sent)
    t = run.feed(CancelRequested(), sent + timedelta(seconds=1))
    assert t.actions == (Stop(RID),) and t.state.phase is Phase.TRACKING
    assert t.wake_at == sent + POLICY.action_lag
    t = run.feed(Wake(), sent + POLICY.action_lag)
    assert (t.state.phase, t.state.stopped_reason) == (Phase.ENDED, "USER_ACTION")


def test_the_deadline_ends_a_paused_job_and_a_resume_past_it_is_never_planned() -> None:
    deadline = at(300)
    run = resumed_run(PARKED, deadline=deadline)
    t = run.feed(stopped("OUT_OF_PU"), at(10))
    assert t.state.status == PAUSED and t.wake_at == deadline
    t = run.feed(Wake(), deadline)
    assert (t.state.phase, t.state.stopped_reason) == (Phase.ENDED, "DEADLINE")
    # An UNHEALTHY resume that would come after the deadline: the stop ends the job.
    soon = resumed_run(UNHEALTHY_TWICE, deadline=at(40))
    t = soon.feed(stopped("UNHEALTHY"), at(10))
    assert t.state.pause is None and t.state.ending_since is not None


@pytest.mark.parametrize(
    ("rules", "reason"),
    [(None, "UNHEALTHY"), (PARKED, "UNHEALTHY"), (UNHEALTHY_TWICE, "OUT_OF_PU")],
)
def test_a_stop_the_rules_do_not_name_ends_the_job_as_before(
    rules: ResumeOn | None, reason: str
) -> None:
    run = resumed_run(rules)
    t = run.feed(stopped(reason), at(10))
    assert t.state.pause is None and t.state.ending_since is not None


def test_a_stop_the_worker_asked_for_is_never_resumed() -> None:
    run = resumed_run(UNHEALTHY_TWICE, max_cost_pu=40)  # 50 PU spent: over the cap
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=31, cost_pu=50)), at(5))
    assert t.state.stop_reason is not None
    t = run.feed(stopped("UNHEALTHY"), at(10))  # whatever the API says the reason is
    assert t.state.pause is None


def test_a_refused_restart_is_read_and_sent_again_after_the_lag() -> None:
    run = resumed_run(UNHEALTHY_TWICE)
    pause = run.feed(stopped("UNHEALTHY"), at(10)).state.pause
    assert pause is not None and pause.resume_at is not None
    sent = pause.resume_at
    run.feed(Wake(), sent)
    error = JobError(source="api", http_status=400, code="COMMON_BAD_PAYLOAD", message="30 min")
    t = run.feed(ActionRefused("start", error), sent + timedelta(seconds=1))
    assert t.actions == (Poll(RID, asap=True),)
    t = run.feed(stopped("UNHEALTHY"), sent + timedelta(seconds=2))
    assert t.actions == () and t.wake_at == sent + POLICY.action_lag
    t = run.feed(Wake(), sent + POLICY.action_lag)
    assert t.actions == (Poll(RID, asap=True),)  # read first
    t = run.feed(stopped("UNHEALTHY"), sent + POLICY.action_lag + timedelta(seconds=1))
    assert t.actions == (Start(RID),)
    assert t.state.resumed == ("UNHEALTHY",)  # the same attempt, sent again


def test_jitter_is_fixed_per_job_and_attempt_and_within_the_spread() -> None:
    spread = timedelta(seconds=300)
    values = {jitter(f"job-{i}", 0, spread) for i in range(50)}
    assert all(timedelta(0) <= v < spread for v in values)
    assert len(values) > 40  # spread over a fleet
    assert jitter("a", 1, spread) == jitter("a", 1, spread)
    assert jitter("a", 1, timedelta(0)) == timedelta(0)


# -- properties ---------------------------------------------------------------------------

RULES = st.sampled_from(
    [
        UNHEALTHY_TWICE,
        PARKED,
        ResumeOn(UNHEALTHY=UnhealthyRule(attempts=1), OUT_OF_PU=OutOfPuRule(until=at(200))),
    ]
)
STOP_REASONS = st.sampled_from(["UNHEALTHY", "OUT_OF_PU", "USER_ACTION", None])
reads = st.builds(
    lambda status, reason, completion, cost: TaskSeen(
        task(status, stopped_reason=reason, completion_percentage=completion, cost_pu=cost)
    ),
    status=st.sampled_from(
        ["ANALYSIS_DONE", "PROCESSING", "PROCESSING", "STOPPED", "STOPPED", "DONE"]
    ),
    reason=STOP_REASONS,
    completion=st.floats(0, 100),
    cost=st.floats(0, 500),
)
observations = st.one_of(
    reads,
    reads,
    st.just(Wake()),
    st.just(Wake()),
    st.just(StartRequested()),
    st.just(CancelRequested()),
    st.builds(TilesSeen, tiles=st.builds(Tiles, total=st.just(4), processed=st.integers(0, 4))),
    st.just(ActionRefused("start", JobError(source="api", code="X", message="no"))),
    st.just(TaskMissing()),
)
delays = st.integers(0, 40).map(lambda s: timedelta(seconds=s))


@settings(max_examples=400, deadline=None)
@given(
    rules=RULES,
    deadline=st.none() | st.integers(0, 400).map(at),
    history=st.lists(st.tuples(delays, observations), max_size=50),
)
def test_every_paused_history_keeps_the_invariants(
    rules: ResumeOn, deadline: object, history: list[tuple[timedelta, object]]
) -> None:
    state = track(with_rules(job(deadline=deadline), rules))  # type: ignore[arg-type]
    run = Run(state, policy=POLICY)
    now, terminal = T0, 0
    for delay, observation in history:
        now += delay
        before = run.state
        t = run.feed(observation, now)  # type: ignore[arg-type]
        after = t.state
        for emit in t.emits:
            if emit.kind == "status" and after.status in TERMINAL:
                terminal += 1
        assert terminal <= 1  # one terminal event, however many pauses
        # PAUSED is never an end, and an ended job is never paused. A read that shows the
        # request left the stop ends the pause at once; PAUSED may stay the published status
        # only while that read's end is held for the final tile counts.
        if after.pause is not None:
            assert after.status == PAUSED
        elif after.status == PAUSED:
            assert after.ending_since is not None and before.status == PAUSED
        assert not (after.phase is Phase.ENDED and after.pause is not None)
        # Resumes stay within the rules' attempts.
        if rules.UNHEALTHY is not None:
            assert after.resumed.count("UNHEALTHY") <= rules.UNHEALTHY.attempts
        else:
            assert "UNHEALTHY" not in after.resumed
        starts = [a for a in t.actions if isinstance(a, Start)]
        if before.pause is not None and after.pause is not None and starts:
            # A resume's START: never inside the restart block, never for a job to be
            # cancelled. (A read that shows the request left the stop ends the pause, and
            # the job is driven as any other from there.)
            assert now >= before.pause.earliest
            assert not after.cancel_wanted
        # A pause due to start later is woken for it (or for its deadline, earlier).
        pause = after.pause
        if pause is not None and pause.restart_sent_at is None and pause.next_start_at:
            assert t.wake_at is not None and t.wake_at <= max(pause.next_start_at, now)
        waiting = after.phase is not Phase.ENDED and after.stop_reason is None
        if waiting and after.deadline is not None and after.deadline > now:
            assert t.wake_at is not None and t.wake_at <= after.deadline


def test_a_late_step_on_the_restarts_analysis_done_sends_no_second_start() -> None:
    run = resumed_run(UNHEALTHY_TWICE)
    pause = run.feed(stopped("UNHEALTHY"), at(10)).state.pause
    assert pause is not None and pause.resume_at is not None
    sent = pause.resume_at
    run.feed(Wake(), sent)
    # Stepped well after the lag (a loaded worker): the START took effect, no resend.
    late = sent + POLICY.action_lag * 2
    t = run.feed(TaskSeen(task("ANALYSIS_DONE", completion_percentage=30, cost_pu=50)), late)
    assert t.state.pause is None and not any(isinstance(a, Start) for a in t.actions)
    assert t.wake_at == late + POLICY.action_lag
