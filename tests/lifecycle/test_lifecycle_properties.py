"""Property tests: random (valid and nonsense) observation sequences keep every invariant."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st
from lifecycle_support import RID, T0, Run, job

from worker.lifecycle import (
    KNOWN_STATUSES,
    TERMINAL,
    ActionRefused,
    Analyse,
    CallNotDone,
    CancelRequested,
    Create,
    CreateRefused,
    CreateSucceeded,
    CreateUncertain,
    DuplicateFound,
    JobError,
    JobState,
    NotFoundYet,
    Observation,
    Phase,
    Policy,
    Retry,
    RetryInputFailed,
    RetryInputWritten,
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
    Wake,
    is_active,
    step,
)

# Small timings, so random delays cross every window (lag, 404 window, deadline) often.
POLICY = Policy(
    poll_interval=timedelta(seconds=5),
    rest_poll_interval=timedelta(seconds=20),
    action_lag=timedelta(seconds=8),
    not_found_window=timedelta(seconds=12),
    list_lag_window=timedelta(seconds=6),
    clock_skew=timedelta(seconds=2),
    create_retry=timedelta(seconds=2),
    max_create_attempts=4,
    not_found_retries=(timedelta(0), timedelta(seconds=1), timedelta(seconds=3)),
    tiles_wait=timedelta(seconds=1),
)
IDS = st.sampled_from([RID, RID, RID, "dup-1", "dup-2"])
STATUSES = st.sampled_from([*KNOWN_STATUSES, "QUEUED"])
ERROR = JobError(source="api", http_status=400, code="COMMON_BAD_PAYLOAD", message="no")

tasks = st.builds(
    TaskSnapshot,
    id=IDS,
    status=STATUSES,
    created=st.sampled_from([None, T0]),
    completion_percentage=st.floats(0, 100),
    cost_pu=st.floats(0, 500),
    stopped_reason=st.sampled_from([None, "USER_ACTION", "OUT_OF_PU", "UNHEALTHY"]),
    error=st.sampled_from([None, "Evalscript error"]),
)
tiles = st.builds(
    Tiles,
    total=st.none() | st.integers(0, 50),
    processed=st.integers(0, 50),
    failed=st.integers(0, 50),
)
observations: st.SearchStrategy[Observation] = st.one_of(
    st.just(Wake()),
    st.just(Wake()),
    st.just(StartRequested()),
    st.just(CancelRequested()),
    st.builds(CreateSucceeded, task=tasks, found=st.booleans()),
    st.just(CreateRefused(ERROR)),
    st.just(CreateUncertain("timeout")),
    st.builds(
        CallNotDone,
        action=st.sampled_from(["create", "analyse", "start", "stop"]),
        retry_at=st.integers(0, 60).map(lambda s: T0 + timedelta(seconds=s)),
    ),
    st.just(NotFoundYet()),
    st.builds(TaskSeen, task=tasks),
    st.builds(TaskSeen, task=tasks),
    st.just(TaskMissing()),
    st.builds(
        ActionRefused, action=st.sampled_from(["analyse", "start", "stop"]), error=st.just(ERROR)
    ),
    st.builds(TilesSeen, tiles=tiles, cost_bound_pu=st.none() | st.floats(100, 1000)),
    st.just(TilesUnavailable("denied")),
    st.builds(DuplicateFound, batch_request_id=IDS),
    st.builds(RetryInputWritten, url=st.just("s3://b/f.gpkg"), features=st.integers(1, 50)),
    st.just(RetryInputFailed(ERROR)),
)
delays = st.integers(0, 15).map(lambda s: timedelta(seconds=s))
RASTER = {
    "description": "Max NDVI over Corsica",
    "output": {"type": "raster", "delivery": {"s3": {"url": "s3://b/out"}}},
}
jobs = st.builds(
    lambda start, attempts: start.model_copy(update={"retry": Retry(attempts=attempts)}),
    st.builds(
        job,
        auto_start=st.booleans(),
        adopt_id=st.sampled_from([None, None, RID]),
        deadline=st.none() | st.integers(0, 120).map(lambda s: T0 + timedelta(seconds=s)),
        max_cost_pu=st.none() | st.floats(0, 400),
        request=st.sampled_from([None, RASTER]),
        cost_guard=st.sampled_from(["spent", "forecast"]),
    ),
    st.sampled_from([0, 0, 1, 2]),  # retry_failed
)
History = list[tuple[timedelta, Observation]]
histories = st.lists(st.tuples(delays, observations), max_size=60)


def _without_duplicates_told(state: JobState) -> JobState:
    return state.model_copy(update={"duplicates_stopped": (), "sequence": 0})


@settings(max_examples=600, deadline=None)
@given(start=jobs, history=histories)
def test_every_history_keeps_the_invariants(start: JobState, history: History) -> None:
    run = Run(start, policy=POLICY)
    now = T0
    terminal_events = 0
    start_asked_for = start.auto_start
    started_after_hold = False  # a start asked for since the cost bound held the job
    for delay, observation in history:
        now += delay
        before = run.state
        if isinstance(observation, StartRequested):
            start_asked_for = True
            started_after_hold = before.cost_held
        t = run.feed(observation, now)
        after = t.state

        # One event at most, numbered one above the last.
        assert len(t.emits) <= 1
        if t.emits:
            assert t.emits[0].sequence == after.sequence == before.sequence + 1
            if t.emits[0].kind == "status":
                assert after.status != before.status
            if t.emits[0].kind == "status" and after.status in TERMINAL:
                terminal_events += 1
        else:
            assert after.sequence == before.sequence
        assert terminal_events <= 1

        # Nothing happens after the end but duplicate stops, each new one told once.
        if before.phase is Phase.ENDED:
            new_duplicate = after.duplicates_stopped != before.duplicates_stopped
            assert [e.kind for e in t.emits] == (["progress"] if new_duplicate else [])
            assert all(isinstance(a, StopDuplicate) for a in t.actions)
            assert _without_duplicates_told(after) == _without_duplicates_told(before)

        # A create that may POST at once has its intent saved in this very state.
        for action in t.actions:
            if isinstance(action, Create):
                assert after.intent_at is not None
                if action.create_not_before is None or action.create_not_before <= now:
                    assert after.intent_at == now
                assert action.search_since is None or action.search_since < after.intent_at

        # Never analyse or start what is to be cancelled; never start what no one started.
        kinds = {type(a) for a in t.actions}
        if after.cancel_wanted:
            assert not kinds & {Analyse, Start}
        if Start in kinds:
            assert start_asked_for
            # A job its cost bound holds starts only on a start that came after the hold.
            assert not after.cost_held or started_after_hold
        if after.cost_held and not before.cost_held:  # held in this step: by its bound
            assert after.cost_guard == "forecast" and after.max_cost_pu is not None
            bound = after.cost_forecast
            assert bound is not None and bound.method != "linear"
            assert bound.pu > after.max_cost_pu and not after.start_wanted

        # An ended job's status is terminal and it is never woken. A job creating is always
        # woken; a tracked one only for what time decides (the poller reads its status),
        # and never later than its deadline, an action to re-send, or a held event.
        if after.phase is Phase.ENDED:
            assert after.status in TERMINAL
            assert t.wake_at is None
        else:
            assert after.status not in TERMINAL
            if after.phase is Phase.PENDING_CREATE:
                assert t.wake_at is not None
            assert t.wake_at is None or t.wake_at > now
            stopping = after.stop_reason is not None  # a stop in flight: its lag rules
            if after.deadline is not None and after.deadline > now and not stopping:
                assert t.wake_at is not None and t.wake_at <= after.deadline
            if after.retry.writing_since is not None:  # a follow-up's input asked for
                assert t.wake_at is not None and t.wake_at <= now + POLICY.tiles_wait
            elif after.ending_since is not None:
                assert t.wake_at == after.ending_since + POLICY.tiles_wait
            sent = [a for a in t.actions if isinstance(a, (Analyse, Start, Stop))]
            if sent and after.phase is Phase.TRACKING:
                assert t.wake_at is not None and t.wake_at <= now + POLICY.action_lag
        assert is_active(after) == (after.phase is not Phase.ENDED)

        # Duplicates: never the job's own request, each recorded once.
        assert after.batch_request_id not in after.duplicates_stopped
        assert len(set(after.duplicates_stopped)) == len(after.duplicates_stopped)
        assert (
            before.duplicates_stopped == after.duplicates_stopped[: len(before.duplicates_stopped)]
        )


@settings(max_examples=200, deadline=None)
@given(start=jobs, history=histories)
def test_a_stop_is_asked_only_for_a_reason(start: JobState, history: History) -> None:
    run = Run(start, policy=POLICY)
    now = T0
    for delay, observation in history:
        now += delay
        t = run.feed(observation, now)
        if t.state.stop_sent_at == now and run.state.phase is Phase.TRACKING:
            assert t.state.stop_reason is not None
        if t.state.stopped_reason in ("DEADLINE",):
            assert start.deadline is not None and now >= start.deadline
        if t.state.stopped_reason == "COST_LIMIT":
            assert start.max_cost_pu is not None
        if t.state.stopped_reason == "COST_FORECAST":
            assert start.max_cost_pu is not None and start.cost_guard == "forecast"
            forecast = t.state.cost_forecast
            assert forecast is not None and forecast.method == "linear"
            assert forecast.at_completion >= POLICY.cost_min_completion


@settings(max_examples=200, deadline=None)
@given(start=jobs, history=histories)
def test_the_step_is_a_pure_function(start: JobState, history: History) -> None:
    now = T0
    state = start
    for delay, observation in history:
        now += delay
        first = step(state, observation, now, POLICY)
        assert step(state, observation, now, POLICY) == first
        # The state survives the JSON round trip the store puts it through.
        assert JobState.model_validate_json(first.state.model_dump_json()) == first.state
        state = first.state
