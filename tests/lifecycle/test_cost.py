"""The cost forecast and its guard: the pure functions, and the machine that applies them."""

from __future__ import annotations

import math

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lifecycle_support import POLICY, RID, Run, at, job, task

from worker.lifecycle import (
    MIN_CHARGE_PU,
    CreateSucceeded,
    Stop,
    TaskSeen,
    TilesUnavailable,
    Wake,
    linear_forecast,
    lower_bound,
    manifest_lower_bound,
)
from worker.lifecycle.cost import bound_exceeds_cap, guard_limit, over_forecast

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
