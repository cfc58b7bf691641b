"""Before a batch request is known: tags, intent-first creates, adopt, early cancel/deadline."""

from __future__ import annotations

import re

from lifecycle_support import POLICY, RID, T0, Run, at, job, task

from worker.lifecycle import (
    CREATE_ATTEMPTS_EXHAUSTED,
    UPSTREAM_NOT_FOUND,
    Adopt,
    Analyse,
    CallNotDone,
    CancelRequested,
    Create,
    CreateRefused,
    CreateSucceeded,
    CreateUncertain,
    DuplicateFound,
    JobError,
    NotFoundYet,
    Phase,
    Start,
    StartRequested,
    Stop,
    StopDuplicate,
    TaskMissing,
    TaskSeen,
    Wake,
    describe,
    fold_requests,
    is_active,
    step,
    tag_for,
)

# -- tags ------------------------------------------------------------------------------------


def test_tag_is_bw_and_30_hex_digits_and_depends_on_fleet_and_job() -> None:
    tag = tag_for("default", "corsica-ndvi")
    assert re.fullmatch(r"bw[0-9a-f]{30}", tag)
    assert tag == tag_for("default", "corsica-ndvi")
    assert tag != tag_for("other-fleet", "corsica-ndvi")
    assert tag != tag_for("default", "corsica-ndvi-2")
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    assert tag_for("ab", "c") != tag_for("a", "bc")


def test_describe_appends_the_tag_once_and_never_replaces_the_description() -> None:
    tag = tag_for("default", "j")
    assert describe(None, tag) == tag
    assert describe("", tag) == tag
    assert describe("Max NDVI", tag) == f"Max NDVI {tag}"
    assert describe(describe("Max NDVI", tag), tag) == f"Max NDVI {tag}"
    # A tag glued into another word is not the tag as a word: append it.
    assert describe(f"x{tag}", tag) == f"x{tag} {tag}"


def test_new_job_tags_the_payload_and_waits_to_create() -> None:
    state = job(auto_start=False, request={"description": "Corsica", "input": {}})
    assert state.request == {
        "description": f"Corsica {tag_for('default', 'corsica-ndvi')}",
        "input": {},
    }
    assert state.phase is Phase.PENDING_CREATE
    assert state.start_wanted is False
    assert state.accepted_at == T0
    assert state.sequence == 0
    assert is_active(state)


def test_new_job_leaves_a_non_string_description_for_the_api_to_refuse() -> None:
    assert job(request={"description": 42}).request == {"description": 42}


# -- creating --------------------------------------------------------------------------------


def test_first_wake_saves_the_intent_and_posts_at_once() -> None:
    run = Run(job())
    t = run.feed(Wake(), at(0))
    assert t.actions == (Create(),)
    assert t.state.intent_at == at(0)
    assert t.state.create_attempts == 1
    assert t.emits == ()
    assert t.wake_at == at(0) + POLICY.create_retry


def test_after_an_uncertain_create_scan_first_and_post_again_only_after_the_lag_window() -> None:
    run = Run(job())
    run.feed(Wake(), at(0))
    run.feed(CreateUncertain("read timeout"), at(30))
    # Inside the lag window: scan only, and the intent stays where the last POST was.
    t = run.feed(Wake(), at(40))
    assert t.actions == (
        Create(
            search_since=at(0) - POLICY.clock_skew, create_not_before=at(0) + POLICY.list_lag_window
        ),
    )
    assert t.state.intent_at == at(0)
    assert t.state.create_attempts == 1
    t = run.feed(NotFoundYet(), at(41))
    assert t.actions == ()
    assert t.wake_at == at(41) + POLICY.create_retry
    # Past the window the action may POST, so the intent moves in the state saved before it.
    t = run.feed(Wake(), at(61))
    assert t.actions == (Create(search_since=at(0) - POLICY.clock_skew, create_not_before=at(61)),)
    assert t.state.intent_at == at(61)
    assert t.state.create_attempts == 2


def test_a_create_refused_unprocessed_posts_again_at_retry_after_without_a_scan() -> None:
    run = Run(job())
    run.feed(Wake(), at(0))
    t = run.feed(CallNotDone("create", retry_at=at(45)), at(1))
    assert t.actions == ()
    assert t.wake_at == at(45)  # the API's Retry-After, not the usual create retry
    assert (t.state.intent_at, t.state.create_attempts, t.state.create_doubtful) == (None, 0, False)
    t = run.feed(Wake(), at(45))
    assert t.actions == (Create(),)  # a plain POST: nothing can exist
    assert (t.state.intent_at, t.state.create_attempts) == (at(45), 1)


def test_a_429_after_an_uncertain_create_scans_and_posts_at_once_not_after_a_new_window() -> None:
    run = Run(job())
    run.feed(Wake(), at(0))
    run.feed(CreateUncertain("read timeout"), at(30))
    run.feed(Wake(), at(61))  # scan, then POST: the intent moves to 61
    t = run.feed(CallNotDone("create", retry_at=at(63)), at(62))
    assert t.state.create_doubtful and t.state.create_attempts == 1
    t = run.feed(Wake(), at(63))
    # Still a scan first (the first POST may have landed), and a POST straight after it.
    (create,) = t.actions
    assert isinstance(create, Create) and create.create_not_before == at(63)
    assert create.search_since is not None and create.search_since <= at(0)


def test_an_action_refused_unprocessed_is_sent_again_after_retry_after() -> None:
    run = Run(job())
    run.feed(Wake(), at(0))
    run.feed(CreateSucceeded(task("CREATED")), at(1))  # start sent at 1
    assert run.state.start_sent_at == at(1)
    t = run.feed(CallNotDone("start", retry_at=at(3)), at(2))
    assert t.actions == () and t.state.start_sent_at is None
    assert t.wake_at == at(3)  # not at(1) + the action lag
    run.feed(Wake(), at(3))
    t = run.feed(TaskSeen(task("CREATED")), at(4))
    assert Start(RID) in t.actions


def test_a_scan_that_finds_the_tag_tracks_that_request() -> None:
    run = Run(job())
    run.feed(Wake(), at(0))
    run.feed(CreateUncertain("connection reset"), at(1))
    run.feed(Wake(), at(11))
    t = run.feed(CreateSucceeded(task("CREATED"), found=True), at(12))
    assert t.state.phase is Phase.TRACKING
    assert t.state.batch_request_id == RID
    assert t.actions == (Start(RID),)
    assert run.emitted == [("status", "CREATED")]


def test_too_many_create_attempts_fail_the_job_with_a_worker_error() -> None:
    run = Run(job())
    now = 0.0
    run.feed(Wake(), at(now))
    while run.state.phase is Phase.PENDING_CREATE:
        run.feed(CreateUncertain("503"), at(now))
        now += POLICY.list_lag_window.total_seconds()
        run.feed(Wake(), at(now))
    assert run.state.create_attempts == POLICY.max_create_attempts
    assert run.state.status == "FAILED"
    assert run.state.error is not None
    assert run.state.error.source == "worker"
    assert run.state.error.code == CREATE_ATTEMPTS_EXHAUSTED
    assert run.emitted == [("status", "FAILED")]


def test_a_refused_create_fails_the_job_with_the_refusal() -> None:
    error = JobError(source="api", http_status=400, code="COMMON_BAD_PAYLOAD", message="bad grid")
    run = Run(job())
    run.feed(Wake(), at(0))
    t = run.feed(CreateRefused(error), at(1))
    assert t.state.phase is Phase.ENDED
    assert (t.state.status, t.state.error) == ("FAILED", error)
    assert t.wake_at is None
    assert run.emitted == [("status", "FAILED")]


def test_cancel_before_any_request_is_known_stops_at_once_without_creating() -> None:
    run = Run(job())
    run.feed(Wake(), at(0))
    run.feed(CreateUncertain("timeout"), at(30))
    t = run.feed(CancelRequested(), at(31))
    assert (t.actions, t.wake_at) == ((), None)
    assert (t.state.status, t.state.stopped_reason) == ("STOPPED", "USER_ACTION")
    assert run.emitted == [("status", "STOPPED")]


def test_a_request_the_uncertain_create_made_turns_up_after_the_cancel_and_is_stopped() -> None:
    run = Run(job())
    run.feed(Wake(), at(0))
    run.feed(CreateUncertain("timeout"), at(30))
    ended = run.feed(CancelRequested(), at(31)).state
    assert ended.create_doubtful  # what keeps the poller sweeping for it after the end
    t = run.feed(DuplicateFound(RID), at(90))
    assert t.actions == (StopDuplicate(RID),)
    assert (t.state.status, t.state.duplicates_stopped) == ("STOPPED", (RID,))
    assert run.emitted == [("status", "STOPPED"), ("progress", "STOPPED")]


def test_deadline_before_any_request_exists_stops_directly() -> None:
    run = Run(job(deadline=at(5)))
    run.feed(Wake(), at(0))
    t = run.feed(CreateUncertain("timeout"), at(2))
    assert t.wake_at == at(5)  # the deadline, not the usual retry
    t = run.feed(Wake(), at(5))
    assert t.actions == ()
    assert (t.state.status, t.state.stopped_reason) == ("STOPPED", "DEADLINE")


# -- adopting --------------------------------------------------------------------------------


def test_adopt_reads_the_request_then_tracks_it() -> None:
    run = Run(job(adopt_id=RID))
    t = run.feed(Wake(), at(0))
    assert t.actions == (Adopt(RID),)
    assert t.state.intent_at is None
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=10.0)), at(1))
    assert t.state.phase is Phase.TRACKING
    assert t.state.batch_request_id == RID
    assert run.emitted == [("status", "PROCESSING")]


def test_adopting_a_request_that_does_not_exist_fails_upstream_not_found() -> None:
    run = Run(job(adopt_id=RID))
    run.feed(Wake(), at(0))
    t = run.feed(TaskMissing(), at(1))
    assert t.state.status == "FAILED"
    assert t.state.error is not None
    assert (t.state.error.code, t.state.error.http_status) == (UPSTREAM_NOT_FOUND, 404)


def test_cancel_while_adopting_waits_to_see_the_request_and_stops_it() -> None:
    run = Run(job(adopt_id=RID))
    run.feed(CancelRequested(), at(0))
    t = run.feed(Wake(), at(0))
    assert t.actions == (Adopt(RID),)
    t = run.feed(TaskSeen(task("PROCESSING")), at(1))
    assert Stop(RID) in t.actions
    assert t.state.stop_reason == "USER_ACTION"


# -- doubtful creates (the poller sweeps for duplicates soon after) ------------------------


def test_a_clean_create_is_not_doubtful() -> None:
    run = Run(job())
    run.feed(Wake(), at(0))
    t = run.feed(CreateSucceeded(task("CREATED")), at(1))
    assert not t.state.create_doubtful


def test_an_uncertain_create_or_a_retry_after_a_crash_is_doubtful() -> None:
    uncertain = Run(job())
    uncertain.feed(Wake(), at(0))
    assert uncertain.feed(CreateUncertain("read timeout"), at(1)).state.create_doubtful
    crashed = Run(job())
    crashed.feed(Wake(), at(0))  # the POST went out, then the worker died: no answer
    t = crashed.feed(Wake(), at(30))
    assert t.state.create_doubtful
    # It stays so once the request is found by its tag: that is when a sweep is due.
    t = crashed.feed(CreateSucceeded(task("CREATED"), found=True), at(31))
    assert t.state.phase is Phase.TRACKING and t.state.create_doubtful


# -- a request that arrived while a step was decided ---------------------------------------


def test_a_cancel_folded_ahead_of_the_create_answer_ends_without_analysing() -> None:
    run = Run(job(auto_start=False))
    run.feed(Wake(), at(0))
    # Decided without the cancel, the answer asks for an analysis...
    assert step(run.state, CreateSucceeded(task("CREATED")), at(1)).actions == (Analyse(RID),)
    # ...with it, the job ends STOPPED and nothing is sent (the request is its own, no
    # duplicate to stop).
    known = fold_requests(run.state, cancel=True, start=False)
    t = step(known, CreateSucceeded(task("CREATED")), at(1))
    assert t.actions == ()
    assert (t.state.status, t.state.stopped_reason) == ("STOPPED", "USER_ACTION")
    assert t.state.batch_request_id == RID and t.state.duplicates_stopped == ()


def test_a_start_folded_ahead_of_the_create_answer_starts_instead_of_analysing() -> None:
    run = Run(job(auto_start=False))
    run.feed(Wake(), at(0))
    known = fold_requests(run.state, cancel=False, start=True)
    assert step(known, CreateSucceeded(task("CREATED")), at(1)).actions == (Start(RID),)


def test_folding_requests_leaves_an_ended_job_and_known_requests_alone() -> None:
    run = Run(job())
    ended = run.feed(CancelRequested(), at(0)).state
    assert ended.phase is Phase.ENDED
    assert fold_requests(ended, cancel=True, start=True) is ended
    started = run.feed(StartRequested(), at(1)).state
    assert fold_requests(started, cancel=False, start=True) is started
