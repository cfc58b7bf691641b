"""What the status poller schedules and compares a job by (``poll_view``), as the lifecycle
moves: resting at ANALYSIS_DONE, the held status compared, the doubtful create."""

from __future__ import annotations

from lifecycle_support import Run, at, job, task

from worker.lifecycle import (
    CancelRequested,
    CreateSucceeded,
    CreateUncertain,
    PollView,
    StartRequested,
    TaskSeen,
    Tiles,
    TilesSeen,
    TilesUnavailable,
    Wake,
    poll_view,
)


def analysed(*, auto_start: bool) -> Run:
    run = Run(job(auto_start=auto_start))
    run.feed(Wake(), at(0))
    run.feed(CreateSucceeded(task("CREATED")), at(1))
    run.feed(TaskSeen(task("ANALYSING")), at(60))
    run.feed(TaskSeen(task("ANALYSIS_DONE")), at(120))
    run.feed(TilesSeen(Tiles(total=120)), at(121))
    return run


def test_a_new_job_has_nothing_read_and_rests_not() -> None:
    assert poll_view(job()) == PollView(
        read_status=None,
        completion=0.0,
        cost_pu=None,
        resting=False,
        create_doubtful=False,
        intent_at=None,
        attempt=0,
    )


def test_a_follow_up_is_polled_with_its_attempt() -> None:
    state = job()
    follow = state.model_copy(update={"retry": state.retry.model_copy(update={"attempt": 2})})
    assert poll_view(follow).attempt == 2


def test_an_analysed_job_waiting_for_a_start_rests_until_the_start_or_a_cancel() -> None:
    waiting = analysed(auto_start=False)
    assert waiting.state.status == "ANALYSIS_DONE"
    assert poll_view(waiting.state).resting
    started = Run(waiting.state)
    started.feed(StartRequested(), at(200))
    assert not poll_view(started.state).resting  # a start to send and see through
    cancelled = Run(waiting.state)
    cancelled.feed(CancelRequested(), at(200))
    assert not poll_view(cancelled.state).resting  # a stop to send and see through


def test_a_job_that_starts_by_itself_never_rests() -> None:
    run = analysed(auto_start=True)
    assert [poll_view(t.state).resting for t in run.transitions] == [False] * 5


def test_the_status_compared_is_the_last_read_even_while_its_event_is_held() -> None:
    run = analysed(auto_start=True)
    run.feed(TaskSeen(task("PROCESSING", completion_percentage=40.0, cost_pu=3.5)), at(200))
    held = run.feed(TaskSeen(task("DONE", completion_percentage=100.0, cost_pu=9.0)), at(300))
    assert held.state.status == "PROCESSING"  # the DONE event waits for a last tile read
    view = poll_view(held.state)
    assert (view.read_status, view.completion, view.cost_pu) == ("DONE", 100.0, 9.0)
    ended = run.feed(TilesUnavailable(), at(301))
    assert poll_view(ended.state).read_status == "DONE"


def test_an_uncertain_create_is_doubtful_and_dated_by_its_last_attempt() -> None:
    run = Run(job())
    run.feed(Wake(), at(0))
    run.feed(CreateUncertain("read timed out"), at(5))
    view = poll_view(run.state)
    assert view.create_doubtful and view.intent_at == run.state.intent_at == at(0)
