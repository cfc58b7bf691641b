"""A known batch request: driving it through the API's statuses to exactly one end."""

from __future__ import annotations

from lifecycle_support import POLICY, RID, Run, at, job, task

from worker.lifecycle import (
    BATCH_FAILED,
    UPSTREAM_NOT_FOUND,
    ActionRefused,
    Analyse,
    CancelRequested,
    CreateSucceeded,
    DuplicateFound,
    JobError,
    JobState,
    Phase,
    Poll,
    ReadTiles,
    Start,
    StartRequested,
    Stop,
    StopDuplicate,
    TaskMissing,
    TaskSeen,
    TaskSnapshot,
    Tiles,
    TilesSeen,
    TilesUnavailable,
    Transition,
    Wake,
)


def created(state: JobState) -> Run:
    """A run whose create POSTed at 0 and answered 201 at 1."""
    run = Run(state)
    run.feed(Wake(), at(0))
    run.feed(CreateSucceeded(task("CREATED")), at(1))
    return run


def processing(**kwargs: object) -> Run:
    run = created(job(**kwargs))  # type: ignore[arg-type]
    run.feed(TaskSeen(task("PROCESSING")), at(200))
    return run


def ends(run: Run, terminal: TaskSnapshot, seconds: float) -> Transition:
    """Feed a terminal status read after processing began, then its final tile read."""
    held = run.feed(TaskSeen(terminal), at(seconds))
    assert held.actions == (ReadTiles(RID, execution_db=True),)
    assert (held.state.phase, held.emits) == (Phase.TRACKING, ())
    return run.feed(TilesUnavailable(), at(seconds + 1))


# -- CREATED ---------------------------------------------------------------------------------


def test_auto_start_sends_start_on_created_and_resends_only_after_the_action_lag() -> None:
    run = created(job())
    assert run.transitions[-1].actions == (Start(RID),)
    lag = POLICY.action_lag.total_seconds()
    # The status lags the action (§3.3): no second start inside the lag.
    assert run.feed(TaskSeen(task("CREATED")), at(1 + lag - 1)).actions == ()
    assert run.feed(TaskSeen(task("CREATED")), at(1 + lag)).actions == (Start(RID),)


def test_without_auto_start_the_job_analyses_rests_with_its_tiles_then_starts() -> None:
    run = created(job(auto_start=False))
    assert run.transitions[-1].actions == (Analyse(RID),)
    run.feed(TaskSeen(task("ANALYSING")), at(60))
    # ANALYSIS_DONE: read the manifest and hold the status event until the count is in.
    t = run.feed(TaskSeen(task("ANALYSIS_DONE")), at(120))
    assert t.actions == (ReadTiles(RID, execution_db=False),)
    assert t.emits == ()
    assert t.wake_at == at(120) + POLICY.tiles_wait
    t = run.feed(TilesSeen(Tiles(total=120)), at(121))
    assert t.state.status == "ANALYSIS_DONE"
    assert t.state.tiles == Tiles(total=120)
    assert t.actions == ()
    # A job resting after analysis has not ended; nothing timed: the poller reads it.
    assert t.state.phase is Phase.TRACKING
    assert t.wake_at is None
    assert run.feed(TaskSeen(task("ANALYSIS_DONE")), at(721)).actions == ()
    t = run.feed(StartRequested(), at(800))
    assert t.actions == (Start(RID),)
    run.feed(TaskSeen(task("PROCESSING", completion_percentage=50.0, cost_pu=20.0)), at(900))
    t = ends(run, task("DONE", completion_percentage=100.0, cost_pu=40.0), 960)
    assert (t.state.status, t.state.cost_pu) == ("DONE", 40.0)
    assert run.emitted == [
        ("status", "CREATED"),
        ("status", "ANALYSING"),
        ("status", "ANALYSIS_DONE"),
        ("status", "PROCESSING"),
        ("status", "DONE"),
    ]
    assert [e.sequence for t in run.transitions for e in t.emits] == [1, 2, 3, 4, 5]


def test_an_unreadable_manifest_publishes_analysis_done_without_tiles() -> None:
    run = created(job(auto_start=False))
    run.feed(TaskSeen(task("ANALYSIS_DONE")), at(120))
    t = run.feed(TilesUnavailable("AccessDenied"), at(121))
    assert (t.state.status, t.state.tiles) == ("ANALYSIS_DONE", None)
    # Without any answer, the next wake-up publishes it too.
    run = created(job(auto_start=False))
    run.feed(TaskSeen(task("ANALYSIS_DONE")), at(120))
    t = run.feed(Wake(), at(130))
    assert t.state.status == "ANALYSIS_DONE"
    assert t.emits != ()


def test_cancel_while_created_ends_stopped_without_analysing_or_starting() -> None:
    run = created(job(auto_start=False))
    lag = POLICY.action_lag.total_seconds()
    # The analyse sent at creation may still take effect behind a lagging status: stop it.
    t = run.feed(CancelRequested(), at(2))
    assert t.actions == (Stop(RID),)
    assert t.state.phase is Phase.TRACKING
    # The stop is refused (CREATED cannot be stopped); still CREATED after the lag: end.
    t = run.feed(ActionRefused("stop", JobError(source="api", code="BAD", message="m")), at(3))
    assert t.actions == (Poll(RID, asap=True),)
    t = run.feed(TaskSeen(task("CREATED")), at(4))
    assert (t.actions, t.state.phase) == ((), Phase.TRACKING)
    assert t.wake_at == at(1) + POLICY.action_lag  # when the analyse can no longer take
    # Woken when the lag is over: read the status first, then decide on what it says.
    t = run.feed(Wake(), at(1 + lag))
    assert (t.actions, t.state.phase) == ((Poll(RID, asap=True),), Phase.TRACKING)
    t = run.feed(TaskSeen(task("CREATED")), at(2 + lag))
    assert (t.state.status, t.state.stopped_reason) == ("STOPPED", "USER_ACTION")
    actions = [a for t in run.transitions[2:] for a in t.actions]
    assert not any(isinstance(a, (Analyse, Start)) for a in actions)


def test_deadline_while_created_ends_stopped_deadline_directly() -> None:
    run = created(job(auto_start=False, deadline=at(500)))
    run.feed(TaskSeen(task("CREATED")), at(200))  # the analyse did not take (past the lag)
    t = run.feed(Wake(), at(500))
    assert t.actions == ()
    assert (t.state.status, t.state.stopped_reason) == ("STOPPED", "DEADLINE")


# -- PROCESSING ------------------------------------------------------------------------------


def test_processing_reads_tiles_each_poll_and_publishes_progress_when_it_moves() -> None:
    run = processing()
    assert run.transitions[-1].actions == (ReadTiles(RID, execution_db=True),)
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=40.0)), at(230))
    assert [e.kind for e in t.emits] == ["progress"]
    t = run.feed(TilesSeen(Tiles(total=10, processed=4, failed=1)), at(231))
    assert [e.kind for e in t.emits] == ["progress"]
    # Nothing moved: no event.
    assert run.feed(TaskSeen(task("PROCESSING", completion_percentage=40.0)), at(260)).emits == ()
    # An older copy of the execution database does not move the counts back.
    t = run.feed(TilesSeen(Tiles(total=None, processed=2, failed=0)), at(261))
    assert (t.state.tiles, t.emits) == (Tiles(total=10, processed=4, failed=1), ())


def test_completion_at_100_stays_processing_until_the_status_says_done() -> None:
    run = processing()
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=100.0)), at(230))
    assert t.state.phase is Phase.TRACKING
    assert t.state.status == "PROCESSING"
    t = ends(run, task("DONE", completion_percentage=100.0), 260)
    assert (t.state.phase, t.state.status, t.wake_at) == (Phase.ENDED, "DONE", None)


def test_deadline_stops_the_request_and_the_job_ends_stopped_deadline() -> None:
    run = processing(deadline=at(300))
    assert run.transitions[-1].wake_at == at(300)  # the poller reads it until then
    run.feed(TaskSeen(task("PROCESSING", completion_percentage=10.0)), at(290))
    assert run.transitions[-1].wake_at == at(300)
    t = run.feed(Wake(), at(300))
    assert Stop(RID) in t.actions
    assert t.wake_at == at(300) + POLICY.action_lag  # sent again if nothing shows by then
    # Waiting for STOPPED: the stop is not repeated inside the lag.
    assert Stop(RID) not in run.feed(TaskSeen(task("PROCESSING")), at(330)).actions
    t = ends(run, task("STOPPED", stopped_reason="USER_ACTION"), 360)
    assert (t.state.status, t.state.stopped_reason) == ("STOPPED", "DEADLINE")


def test_cost_above_the_cap_stops_with_cost_limit() -> None:
    run = processing(max_cost_pu=100.0)
    assert Stop(RID) not in run.feed(TaskSeen(task("PROCESSING", cost_pu=100.0)), at(230)).actions
    t = run.feed(TaskSeen(task("PROCESSING", cost_pu=100.5)), at(260))
    assert Stop(RID) in t.actions
    assert t.state.stop_reason == "COST_LIMIT"
    t = ends(run, task("STOPPED", stopped_reason="USER_ACTION", cost_pu=101.0), 290)
    assert (t.state.status, t.state.stopped_reason) == ("STOPPED", "COST_LIMIT")


def test_cancel_while_processing_stops_with_user_action() -> None:
    run = processing()
    t = run.feed(CancelRequested(), at(230))
    assert t.actions == (Stop(RID),)
    t = ends(run, task("STOPPED", stopped_reason="USER_ACTION"), 260)
    assert (t.state.status, t.state.stopped_reason) == ("STOPPED", "USER_ACTION")


def test_a_stop_by_the_api_carries_the_apis_reason() -> None:
    t = ends(processing(), task("STOPPED", stopped_reason="OUT_OF_PU"), 230)
    assert (t.state.status, t.state.stopped_reason) == ("STOPPED", "OUT_OF_PU")


def test_a_failed_request_ends_failed_with_the_tasks_error() -> None:
    t = ends(processing(), task("FAILED", error="Evalscript error"), 230)
    assert t.state.error == JobError(source="api", code=BATCH_FAILED, message="Evalscript error")
    assert [e.kind for e in t.emits] == ["status"]


# -- odd answers -----------------------------------------------------------------------------


def test_a_404_inside_the_window_after_creation_is_read_again_soon() -> None:
    run = created(job())
    t = run.feed(TaskMissing(), at(30))
    assert t.state.phase is Phase.TRACKING
    assert t.actions == (Poll(RID, asap=True),)  # the schedule's first retry is at once
    t = run.feed(TaskMissing(), at(31))
    assert t.wake_at == at(31) + POLICY.not_found_retries[1]
    t = run.feed(TaskSeen(task("ANALYSING")), at(40))
    assert t.state.not_found_since is None


def test_a_404_past_the_window_fails_upstream_not_found() -> None:
    run = created(job())
    window = POLICY.not_found_window.total_seconds()
    t = run.feed(TaskMissing(), at(window))  # `created` is 0
    assert t.state.status == "FAILED"
    assert t.state.error == JobError(
        source="api",
        http_status=404,
        code=UPSTREAM_NOT_FOUND,
        message=f"batch request {RID} not found",
    )


def test_a_refused_action_reads_the_status_at_once_instead_of_failing() -> None:
    run = processing()
    error = JobError(source="api", http_status=400, code="COMMON_BAD_PAYLOAD", message="x")
    t = run.feed(ActionRefused("start", error), at(230))
    assert t.actions == (Poll(RID, asap=True),)
    assert t.state.phase is Phase.TRACKING


def test_a_status_the_api_adds_later_is_published_and_polled() -> None:
    run = processing()
    t = run.feed(TaskSeen(task("QUEUED")), at(230))
    assert t.state.status == "QUEUED"
    assert [e.kind for e in t.emits] == ["status"]
    assert t.wake_at is None  # the poller reads it like any other


def test_a_stale_read_of_an_earlier_status_is_ignored() -> None:
    run = processing()
    t = run.feed(TaskSeen(task("ANALYSING")), at(230))
    assert (t.state.status, t.emits, t.actions) == ("PROCESSING", (), ())


def test_a_duplicate_is_stopped_recorded_once_and_reported() -> None:
    run = processing()
    t = run.feed(DuplicateFound("dup-1"), at(230))
    assert t.actions == (StopDuplicate("dup-1"),)
    assert t.state.duplicates_stopped == ("dup-1",)
    assert [e.kind for e in t.emits] == ["progress"]
    # Reported again (the first stop may have been lost to a crash): stop again, no event.
    t = run.feed(DuplicateFound("dup-1"), at(260))
    assert (t.actions, t.state.duplicates_stopped, t.emits) == (
        (StopDuplicate("dup-1"),),
        ("dup-1",),
        (),
    )
    # The job's own request is never a duplicate.
    assert run.feed(DuplicateFound(RID), at(290)).actions == ()


def test_after_the_end_only_duplicates_are_stopped() -> None:
    run = processing()
    ends(run, task("DONE"), 230)
    ended = run.state
    for obs in (
        Wake(),
        CancelRequested(),
        StartRequested(),
        TaskSeen(task("PROCESSING")),
        TaskMissing(),
    ):
        t = run.feed(obs, at(300))
        assert (t.state, t.actions, t.emits, t.wake_at) == (ended, (), (), None)
    t = run.feed(DuplicateFound("dup-2"), at(400))
    assert (t.actions, t.wake_at) == ((StopDuplicate("dup-2"),), None)
    assert t.state.duplicates_stopped == ("dup-2",)
    # Told once, in a progress event (the terminal status event stays the only status).
    assert [(e.kind, e.sequence) for e in t.emits] == [("progress", ended.sequence + 1)]
    assert (t.state.status, t.state.phase) == ("DONE", Phase.ENDED)
    t = run.feed(DuplicateFound("dup-2"), at(430))
    assert (t.actions, t.emits) == ((StopDuplicate("dup-2"),), ())


# -- the final tile counts ----------------------------------------------------------------


def test_the_terminal_event_is_held_for_one_last_tile_read_and_carries_its_counts() -> None:
    run = processing()
    run.feed(TilesSeen(Tiles(total=66, processed=64)), at(201))
    held = run.feed(TaskSeen(task("DONE", completion_percentage=100.0)), at(230))
    assert held.actions == (ReadTiles(RID, execution_db=True),)
    assert held.emits == ()  # not even the completion's progress: the end carries it
    assert held.wake_at == at(230) + POLICY.tiles_wait
    t = run.feed(TilesSeen(Tiles(total=66, processed=65, failed=1)), at(231))
    assert (t.state.phase, t.state.status) == (Phase.ENDED, "DONE")
    assert t.state.tiles == Tiles(total=66, processed=65, failed=1)
    assert [e.kind for e in t.emits] == ["status"]


def test_a_held_end_is_published_at_the_wait_and_asks_again_before_it() -> None:
    run = processing()
    run.feed(TaskSeen(task("STOPPED", stopped_reason="OUT_OF_PU")), at(230))
    # The read was lost (the worker handed the job over): the next owner asks again.
    t = run.feed(TaskSeen(task("STOPPED", stopped_reason="OUT_OF_PU")), at(232))
    assert (t.actions, t.emits) == ((ReadTiles(RID, execution_db=True),), ())
    wait = POLICY.tiles_wait.total_seconds()
    t = run.feed(Wake(), at(230 + wait))
    assert (t.state.status, t.state.stopped_reason) == ("STOPPED", "OUT_OF_PU")
    assert [e.kind for e in t.emits] == ["status"]


def test_an_end_before_processing_is_not_held() -> None:
    run = created(job())
    t = run.feed(TaskSeen(task("FAILED", error="bad evalscript")), at(60))
    assert (t.state.status, t.actions) == ("FAILED", ())


def test_wake_up_for_a_resend_only_while_the_action_has_not_shown() -> None:
    run = created(job())  # Start sent at 1
    assert run.transitions[-1].wake_at == at(1) + POLICY.action_lag
    t = run.feed(TaskSeen(task("ANALYSING")), at(30))
    assert t.wake_at is None


def test_a_wake_for_a_resend_reads_the_status_before_sending_again() -> None:
    run = created(job())  # Start sent at 1
    lag = POLICY.action_lag.total_seconds()
    t = run.feed(Wake(), at(1 + lag))
    assert t.actions == (Poll(RID, asap=True),)  # not a second Start on a stale status
    assert run.feed(TaskSeen(task("ANALYSING")), at(2 + lag)).actions == ()
    run = created(job())
    run.feed(Wake(), at(1 + lag))
    assert run.feed(TaskSeen(task("CREATED")), at(2 + lag)).actions == (Start(RID),)


def test_a_start_sent_before_analysis_ended_is_not_resent_when_analysis_done_shows() -> None:
    run = created(job())  # Start sent at 1; the API rolls it into processing by itself
    lag = POLICY.action_lag.total_seconds()
    t = run.feed(TaskSeen(task("ANALYSIS_DONE")), at(1 + lag + 5))
    assert Start(RID) not in t.actions
    t = run.feed(TaskSeen(task("ANALYSIS_DONE")), at(1 + 2 * lag + 5))
    assert Start(RID) in t.actions  # still resting a whole lag later: send it again
