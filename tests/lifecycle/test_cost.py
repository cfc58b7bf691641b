"""The cost forecast and its guard: the pure functions, and the machine that applies them."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lifecycle_support import POLICY, RID, Run, at, job, task
from test_lifecycle_properties import History, delays, observations

from worker.lifecycle import (
    MIN_CHARGE_PU,
    Analyse,
    CreateSucceeded,
    Phase,
    Poll,
    ReadTiles,
    ResumeOn,
    Start,
    StartRequested,
    Stop,
    TaskSeen,
    Tiles,
    TilesSeen,
    TilesUnavailable,
    Transition,
    UnhealthyRule,
    Wake,
    linear_forecast,
    lower_bound,
    manifest_lower_bound,
)
from worker.lifecycle.cost import bound_exceeds_cap, guard_limit, over_forecast
from worker.lifecycle.polling import resting

MIN = POLICY.cost_min_completion
MARGIN = POLICY.cost_guard_margin

completions = st.floats(0, 100, allow_nan=False)
costs = st.floats(0, 1e7, allow_nan=False)


# -- the forecast ---------------------------------------------------------------------------


@given(completion=completions, cost=costs)
def test_no_forecast_before_the_minimum_completion(completion: float, cost: float) -> None:
    made = linear_forecast(completion, cost, MIN)
    assert (made is None) == (completion < MIN or completion <= 0)
    assert linear_forecast(completion, None, MIN) is None


@given(completion=st.floats(MIN, 100), cost=costs)
def test_the_forecast_is_the_spend_over_the_share_done_never_below_the_minimum(
    completion: float, cost: float
) -> None:
    made = linear_forecast(completion, cost, MIN)
    assert made is not None
    assert (made.method, made.at_completion) == ("linear", completion)
    assert made.pu >= MIN_CHARGE_PU
    assert made.pu >= cost - 1e-3  # never below what is spent already
    assert math.isclose(made.pu, max(MIN_CHARGE_PU, cost * 100 / completion), abs_tol=1e-3)


@given(
    total=st.floats(1, 1e6),
    completion=st.floats(MIN, 100),
)
def test_a_cost_billed_with_progress_is_forecast_exactly(total: float, completion: float) -> None:
    """The simulator's billing (and the API's, feature by feature): a job that will cost
    ``total`` is forecast at ``total`` (or the minimum charge) from the first forecast on."""
    made = linear_forecast(completion, total * completion / 100, MIN)
    assert made is not None
    assert math.isclose(made.pu, max(MIN_CHARGE_PU, total), rel_tol=1e-6, abs_tol=1e-3)


@given(completion=st.floats(MIN, 100), cost=costs, before=st.floats(0, 1e6))
def test_a_follow_up_forecasts_the_job_what_its_earlier_requests_cost_plus_its_own(
    completion: float, cost: float, before: float
) -> None:
    alone = linear_forecast(completion, cost, MIN)
    summed = linear_forecast(completion, cost, MIN, spent_before=before)
    assert alone is not None and summed is not None
    assert math.isclose(summed.pu, alone.pu + before, rel_tol=1e-9, abs_tol=2e-3)


@given(completion=st.floats(MIN, 100), cost=costs, more=st.floats(0, 1e6), cap=st.floats(1, 1e6))
def test_more_spend_at_the_same_completion_never_lowers_the_forecast_or_calms_the_guard(
    completion: float, cost: float, more: float, cap: float
) -> None:
    low = linear_forecast(completion, cost, MIN)
    high = linear_forecast(completion, cost + more, MIN)
    assert low is not None and high is not None and high.pu >= low.pu
    if over_forecast("forecast", cap, low, MARGIN):
        assert over_forecast("forecast", cap, high, MARGIN)


# -- the guard --------------------------------------------------------------------------------


@given(completion=st.floats(MIN, 100), cost=costs, cap=st.floats(1, 1e6))
def test_only_a_forecast_guard_with_a_cap_stops_by_forecast(
    completion: float, cost: float, cap: float
) -> None:
    made = linear_forecast(completion, cost, MIN)
    assert not over_forecast("spent", cap, made, MARGIN)
    assert not over_forecast("forecast", None, made, MARGIN)
    assert over_forecast("forecast", cap, made, MARGIN) == (
        made is not None and made.pu > guard_limit(cap, MARGIN)
    )
    # A bound is never a reason for the forecast guard, however high.
    assert not over_forecast("forecast", cap, lower_bound(cap * 100), MARGIN)


# -- bounds before START -----------------------------------------------------------------------


sizes = st.lists(st.integers(0, 3500 * 3500), max_size=200)


@given(pixels=sizes, more=sizes)
def test_the_manifest_bound_is_at_least_the_minimum_and_grows_with_features(
    pixels: list[int], more: list[int]
) -> None:
    bound = manifest_lower_bound(pixels)
    assert bound >= MIN_CHARGE_PU
    assert manifest_lower_bound(pixels + more) >= bound


@given(pixels=st.lists(st.integers(10_001, 3500 * 3500), min_size=1, max_size=200))
def test_the_manifest_bound_is_the_rules_at_their_cheapest(pixels: list[int]) -> None:
    # One band of three, the batch third: 1/9 PU per 512 x 512 px.
    cheapest = sum(p / (512 * 512) / 9 for p in pixels)
    assert math.isclose(
        manifest_lower_bound(pixels), max(MIN_CHARGE_PU, cheapest), rel_tol=1e-6, abs_tol=1e-3
    )


def test_a_bound_names_where_it_came_from() -> None:
    assert lower_bound(None).method == "minimum_charge"
    assert lower_bound(None).pu == MIN_CHARGE_PU
    assert lower_bound(MIN_CHARGE_PU).method == "minimum_charge"
    made = lower_bound(250.0)
    assert (made.method, made.pu, made.at_completion) == ("manifest", 250.0, 0.0)
    assert bound_exceeds_cap("forecast", 200.0, made)
    assert not bound_exceeds_cap("forecast", 250.0, made)
    assert not bound_exceeds_cap("spent", 200.0, made)
    assert not bound_exceeds_cap("forecast", None, made)


# -- the machine ------------------------------------------------------------------------------


def processing(**kwargs: object) -> Run:
    run = Run(job(**kwargs))  # type: ignore[arg-type]
    run.feed(Wake(), at(0))
    run.feed(CreateSucceeded(task("CREATED")), at(1))
    run.feed(TaskSeen(task("PROCESSING")), at(200))
    return run


def test_progress_events_carry_the_forecast_once_enough_is_done() -> None:
    run = processing(max_cost_pu=1000.0, cost_guard="forecast")
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=2.0, cost_pu=6.0)), at(230))
    assert [e.kind for e in t.emits] == ["progress"]
    assert t.state.cost_forecast is None  # 2 % says too little
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=10.0, cost_pu=60.0)), at(260))
    assert [e.kind for e in t.emits] == ["progress"]
    forecast = t.state.cost_forecast
    assert forecast is not None
    assert (forecast.pu, forecast.method, forecast.at_completion) == (600.0, "linear", 10.0)
    assert Stop(RID) not in t.actions  # 600 is within the cap


def test_a_job_forecast_above_its_cap_is_stopped_with_cost_forecast() -> None:
    run = processing(max_cost_pu=300.0, cost_guard="forecast")
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=6.0, cost_pu=54.0)), at(230))
    assert Stop(RID) in t.actions  # 900 forecast, above 300 x 1.1
    assert t.state.stop_reason == "COST_FORECAST"
    run.feed(TaskSeen(task("STOPPED", stopped_reason="USER_ACTION", cost_pu=60.0)), at(260))
    t = run.feed(TilesUnavailable(), at(261))
    assert (t.state.status, t.state.stopped_reason) == ("STOPPED", "COST_FORECAST")
    assert t.state.cost_pu == 60.0


def test_the_margin_lets_a_forecast_a_little_above_the_cap_run() -> None:
    run = processing(max_cost_pu=300.0, cost_guard="forecast")
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=10.0, cost_pu=32.0)), at(230))
    assert t.state.cost_forecast is not None and t.state.cost_forecast.pu == 320.0
    assert Stop(RID) not in t.actions  # 320 <= 330


def test_a_spent_guard_waits_for_the_spend() -> None:
    run = processing(max_cost_pu=300.0, cost_guard="spent")
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=6.0, cost_pu=54.0)), at(230))
    assert t.state.cost_forecast is not None  # still told
    assert Stop(RID) not in t.actions
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=34.0, cost_pu=306.0)), at(260))
    assert t.state.stop_reason == "COST_LIMIT"


@settings(max_examples=300, deadline=None)
@given(
    cap=st.floats(100, 1e5),
    ratio=st.floats(0.05, 10),
    steps=st.lists(st.floats(0.1, 8), min_size=1, max_size=80),
)
def test_a_forecast_guard_stops_exactly_the_jobs_forecast_above_the_cap(
    cap: float, ratio: float, steps: list[float]
) -> None:
    """A job billed with its progress, read every few percent: stopped by its forecast
    iff it will cost more than the cap and margin (and it never ends at the minimum charge
    under a cap that allows it), at the first read from the minimum completion on; so one
    that would cost k times its cap has spent at most k x (MIN + the read step) percent of
    its total."""
    total = cap * ratio
    assume(abs(total - guard_limit(cap, MARGIN)) > 1e-4 * cap)
    assume(abs(total - cap) > 1e-4 * cap)
    run = processing(max_cost_pu=cap, cost_guard="forecast")
    completion = 0.0
    stopped_at: float | None = None
    for i, size in enumerate(steps):
        completion = min(100.0, completion + size)
        spent = total * completion / 100
        t = run.feed(
            TaskSeen(task("PROCESSING", completion_percentage=completion, cost_pu=spent)),
            at(230 + i),
        )
        if Stop(RID) in t.actions:
            stopped_at = completion
            break
    forecast_over = max(MIN_CHARGE_PU, total) > guard_limit(cap, MARGIN)
    reason = run.state.stop_reason
    if stopped_at is None:
        assert completion < MIN or not forecast_over
        assert reason is None or total * completion / 100 > cap
        return
    if reason == "COST_FORECAST":
        assert forecast_over
        # The first read at or past the minimum completion decided it.
        assert stopped_at - max(steps) < MIN <= stopped_at
        assert total * stopped_at / 100 <= total * (MIN + max(steps)) / 100
    else:
        assert reason == "COST_LIMIT"
        assert total * stopped_at / 100 > cap


# -- the bound before START --------------------------------------------------------------------


def analysed(**kwargs: object) -> tuple[Run, Transition]:
    """Created, then ANALYSIS_DONE read: the step that asks for the manifest."""
    run = Run(job(**kwargs))  # type: ignore[arg-type]
    run.feed(Wake(), at(0))
    run.feed(CreateSucceeded(task("CREATED")), at(1))
    return run, run.feed(TaskSeen(task("ANALYSIS_DONE")), at(100))


def test_a_capped_auto_start_job_under_the_forecast_guard_analyses_first() -> None:
    run = Run(job(max_cost_pu=500.0, cost_guard="forecast"))
    run.feed(Wake(), at(0))
    t = run.feed(CreateSucceeded(task("CREATED")), at(1))
    assert Analyse(RID) in t.actions and Start(RID) not in t.actions
    # Without a cap, or under the spent guard, start on CREATED as ever.
    for kwargs in ({"cost_guard": "forecast"}, {"max_cost_pu": 500.0}):
        other = Run(job(**kwargs))  # type: ignore[arg-type]
        other.feed(Wake(), at(0))
        assert Start(RID) in other.feed(CreateSucceeded(task("CREATED")), at(1)).actions


def test_a_job_whose_manifest_bound_exceeds_its_cap_rests_with_the_estimate() -> None:
    run, t = analysed(max_cost_pu=120.0, cost_guard="forecast")
    assert t.actions == (ReadTiles(RID, execution_db=False),) and t.emits == ()
    t = run.feed(TilesSeen(Tiles(total=300), cost_bound_pu=127.2), at(101))
    assert Start(RID) not in t.actions
    assert [e.kind for e in t.emits] == ["status"] and t.state.status == "ANALYSIS_DONE"
    made = t.state.cost_forecast
    assert made is not None and (made.pu, made.method) == (127.2, "manifest")
    assert resting(t.state) and t.state.cost_held
    # The producer's start is the decision: it starts, and the guard still holds.
    t = run.feed(StartRequested(), at(400))
    assert Start(RID) in t.actions
    run.feed(TaskSeen(task("PROCESSING")), at(430))
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=6, cost_pu=22.8)), at(460))
    assert Stop(RID) in t.actions and t.state.stop_reason == "COST_FORECAST"


def test_a_cap_below_the_minimum_charge_rests_even_without_the_manifest() -> None:
    run, _ = analysed(max_cost_pu=50.0, cost_guard="forecast")
    t = run.feed(TilesUnavailable("denied"), at(101))
    made = t.state.cost_forecast
    assert made is not None and (made.pu, made.method) == (MIN_CHARGE_PU, "minimum_charge")
    assert Start(RID) not in t.actions and resting(t.state)


def test_a_manifest_read_that_never_answers_is_waited_for_tiles_wait_at_most() -> None:
    run, t = analysed(max_cost_pu=500.0, cost_guard="forecast")
    assert t.wake_at is not None and t.wake_at <= at(100) + POLICY.tiles_wait
    t = run.feed(Wake(), t.wake_at)
    assert Poll(RID, asap=True) in t.actions  # the wake reads the status, then decides
    t = run.feed(TaskSeen(task("ANALYSIS_DONE")), at(100) + POLICY.tiles_wait)
    # No bound came: the minimum charge is the bound, within this cap, so it starts.
    assert t.state.cost_forecast is not None and t.state.cost_forecast.method == "minimum_charge"
    assert Start(RID) in t.actions


def test_a_bound_within_the_cap_starts_at_once_and_progress_then_forecasts() -> None:
    run, _ = analysed(max_cost_pu=500.0, cost_guard="forecast")
    t = run.feed(TilesSeen(Tiles(total=300), cost_bound_pu=127.2), at(101))
    assert Start(RID) in t.actions and not t.state.cost_held
    run.feed(TaskSeen(task("PROCESSING", completion_percentage=1, cost_pu=2)), at(130))
    assert run.state.cost_forecast is not None
    assert run.state.cost_forecast.method == "manifest"  # 1 % makes no forecast yet
    run.feed(TaskSeen(task("PROCESSING", completion_percentage=10, cost_pu=30)), at(160))
    assert run.state.cost_forecast is not None and run.state.cost_forecast.pu == 300.0


@settings(max_examples=200, deadline=None)
@given(
    cap=st.floats(1, 1000),
    bound=st.none() | st.floats(100, 2000),
    guard=st.sampled_from(["spent", "forecast"]),
    read=st.booleans(),
)
def test_an_auto_start_is_withheld_exactly_when_a_guarded_bound_exceeds_the_cap(
    cap: float, bound: float | None, guard: str, read: bool
) -> None:
    run, t = analysed(max_cost_pu=cap, cost_guard=guard)
    if read:
        t = run.feed(TilesSeen(Tiles(total=10), cost_bound_pu=bound), at(101))
    else:
        t = run.feed(TilesUnavailable(), at(101))
    known = bound if read and bound is not None else MIN_CHARGE_PU
    withheld = guard == "forecast" and known > cap
    started = Start(RID) in t.actions or any(Start(RID) in x.actions for x in run.transitions)
    assert started != withheld
    assert t.state.cost_held == withheld == resting(t.state)


@settings(max_examples=300, deadline=None)
@given(tail=st.lists(st.tuples(delays, observations), max_size=40))
def test_a_held_job_starts_only_on_a_start_that_comes_after_the_hold(tail: History) -> None:
    run, _ = analysed(max_cost_pu=50.0, cost_guard="forecast")
    held = run.feed(TilesUnavailable(), at(101))
    assert held.state.cost_held and resting(held.state)
    now, asked = at(101), False
    for delay, observation in tail:
        now += delay
        asked = asked or isinstance(observation, StartRequested)
        t = run.feed(observation, now)
        if any(isinstance(a, Start) for a in t.actions):
            assert asked
        assert t.state.cost_held  # once held, the producer decides from then on


# -- with resume by policy (lifecycle/resume.py) -----------------------------------------------

RESUMING = replace(
    POLICY, restart_block=timedelta(seconds=60), restart_jitter=timedelta(seconds=10)
)


def paused_after(
    run: Run, completion: float, cost: float, now: datetime
) -> tuple[datetime, Transition]:
    """Stopped UNHEALTHY at ``completion`` / ``cost``, paused, then the resume's START."""
    t = run.feed(
        TaskSeen(
            task(
                "STOPPED",
                stopped_reason="UNHEALTHY",
                completion_percentage=completion,
                cost_pu=cost,
            )
        ),
        now,
    )
    pause = t.state.pause
    assert pause is not None and pause.resume_at is not None
    t = run.feed(Wake(), pause.resume_at)
    assert t.actions == (Start(RID),)
    return pause.resume_at, t


def guarded_resuming(cap: float) -> Run:
    state = job(max_cost_pu=cap, cost_guard="forecast").model_copy(
        update={"resume_on": ResumeOn(UNHEALTHY=UnhealthyRule(attempts=2))}
    )
    run = Run(state, policy=RESUMING)
    run.feed(Wake(), at(0))
    run.feed(CreateSucceeded(task("CREATED")), at(1))
    return run


def test_the_bound_before_start_holds_the_first_start_only_not_a_resumes() -> None:
    run = guarded_resuming(cap=300.0)
    run.feed(TaskSeen(task("ANALYSIS_DONE")), at(100))
    # The manifest never came within tiles_wait: the minimum is the bound, and it starts.
    t = run.feed(TaskSeen(task("ANALYSIS_DONE")), at(100) + RESUMING.tiles_wait)
    assert Start(RID) in t.actions and not t.state.cost_held
    run.feed(TaskSeen(task("PROCESSING", completion_percentage=2, cost_pu=8)), at(200))
    sent, _ = paused_after(run, completion=3, cost=12, now=at(230))
    # The restart shows ANALYSIS_DONE; its manifest read now tells a bound above the cap.
    t = run.feed(
        TaskSeen(task("ANALYSIS_DONE", completion_percentage=3, cost_pu=12)),
        sent + timedelta(seconds=4),
    )
    assert t.state.pause is None and ReadTiles(RID, execution_db=False) in t.actions
    t = run.feed(TilesSeen(Tiles(total=300), cost_bound_pu=900.0), sent + timedelta(seconds=5))
    # The resume's START is not withheld: the job ran already, its progress forecasts it.
    assert not t.state.cost_held and t.state.start_wanted and not resting(t.state)
    assert t.state.cost_forecast is not None and t.state.cost_forecast.method == "minimum_charge"
    # Still ANALYSIS_DONE a lag after it showed: the START goes again, as for any job.
    later = sent + timedelta(seconds=5) + RESUMING.action_lag
    t = run.feed(TaskSeen(task("ANALYSIS_DONE", completion_percentage=3, cost_pu=12)), later)
    assert Start(RID) in t.actions
    # And the forecast guard holds over both runs: 40 PU at 10 % is 400 PU, above 330.
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=10, cost_pu=40)), later)
    assert Stop(RID) in t.actions and t.state.stop_reason == "COST_FORECAST"


@pytest.mark.parametrize(
    ("restart_completion", "cost_at_10", "forecast", "stopped"),
    [
        # The restart reprocesses from 0 %: its costPU keeps the 40 PU billed before, so
        # the forecast is those plus this run's spend over its completion.
        (0.0, 50.0, 140.0, False),
        (0.0, 60.0, 240.0, True),
    ],
)
def test_a_restart_that_reprocesses_is_forecast_on_top_of_what_the_runs_before_billed(
    restart_completion: float, cost_at_10: float, forecast: float, stopped: bool
) -> None:
    run = guarded_resuming(cap=150.0)
    run.feed(TaskSeen(task("ANALYSIS_DONE")), at(100))
    run.feed(TilesSeen(Tiles(total=10), cost_bound_pu=None), at(101))
    t = run.feed(TaskSeen(task("PROCESSING", completion_percentage=40, cost_pu=40)), at(200))
    assert t.state.cost_forecast is not None and t.state.cost_forecast.pu == 100.0
    sent, _ = paused_after(run, completion=40, cost=40, now=at(230))
    back = TaskSeen(task("ANALYSIS_DONE", completion_percentage=restart_completion, cost_pu=40))
    t = run.feed(back, sent + timedelta(seconds=4))
    assert t.state.rerun_base_pu == 40.0
    # Until this run makes a forecast of its own, the last one stands (and guards).
    assert t.state.cost_forecast is not None and t.state.cost_forecast.pu == 100.0
    t = run.feed(
        TaskSeen(task("PROCESSING", completion_percentage=10, cost_pu=cost_at_10)),
        sent + timedelta(seconds=30),
    )
    assert t.state.cost_forecast is not None and t.state.cost_forecast.pu == forecast
    assert (t.state.stop_reason == "COST_FORECAST") == stopped == (Stop(RID) in t.actions)


def test_a_restart_that_goes_on_where_it_stopped_is_forecast_as_one_run() -> None:
    run = guarded_resuming(cap=150.0)
    run.feed(TaskSeen(task("ANALYSIS_DONE")), at(100))
    run.feed(TilesSeen(Tiles(total=10), cost_bound_pu=None), at(101))
    run.feed(TaskSeen(task("PROCESSING", completion_percentage=40, cost_pu=40)), at(200))
    sent, _ = paused_after(run, completion=40, cost=40, now=at(230))
    back = TaskSeen(task("ANALYSIS_DONE", completion_percentage=40, cost_pu=40))
    assert run.feed(back, sent + timedelta(seconds=4)).state.rerun_base_pu == 0.0
    t = run.feed(
        TaskSeen(task("PROCESSING", completion_percentage=80, cost_pu=100)),
        sent + timedelta(seconds=30),
    )
    # 100 PU at 80 %: 125 PU in all, within 165; 140 PU at 80 % would not be.
    assert t.state.cost_forecast is not None and t.state.cost_forecast.pu == 125.0
    assert t.state.stop_reason is None
    t = run.feed(
        TaskSeen(task("PROCESSING", completion_percentage=80, cost_pu=140)),
        sent + timedelta(seconds=40),
    )
    assert t.state.stop_reason == "COST_FORECAST" and Stop(RID) in t.actions


def test_a_stop_that_lifts_the_forecast_over_the_cap_ends_the_job_instead_of_pausing() -> None:
    run = guarded_resuming(cap=150.0)
    run.feed(TaskSeen(task("ANALYSIS_DONE")), at(100))
    run.feed(TilesSeen(Tiles(total=10), cost_bound_pu=None), at(101))
    run.feed(TaskSeen(task("PROCESSING", completion_percentage=20, cost_pu=20)), at(200))
    # Stopped UNHEALTHY having billed 60 PU at 30 %: 200 PU forecast, above 165.
    t = run.feed(
        TaskSeen(task("STOPPED", stopped_reason="UNHEALTHY", completion_percentage=30, cost_pu=60)),
        at(230),
    )
    assert t.state.pause is None and Start(RID) not in t.actions
    assert (t.state.phase, t.state.status, t.state.stopped_reason) == (
        Phase.ENDED,
        "STOPPED",
        "COST_FORECAST",
    )
