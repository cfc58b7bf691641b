"""The stop and cost guards every phase applies: cancel, deadline, cost cap and forecast.

Apart from the phases so a rule is read in one place, whichever phase it stops
(docs/lifecycle.md, "Cost").
"""

from __future__ import annotations

from datetime import datetime

from worker.lifecycle import followups
from worker.lifecycle.actions import Policy
from worker.lifecycle.cost import bound_exceeds_cap, lower_bound, over_forecast
from worker.lifecycle.draft import Draft
from worker.lifecycle.state import STATUS_RANK, JobState, StoppedReason


def stop_to_decide(s: JobState, now: datetime, policy: Policy) -> bool:
    """A stop is wanted that was never asked for."""
    return s.stop_sent_at is None and wanted_stop(s, now, policy) is not None


def wanted_stop(s: JobState, now: datetime, policy: Policy) -> StoppedReason | None:
    if s.stop_reason is not None:
        return s.stop_reason  # decided once; a later reason does not rename a stop in flight
    if s.cancel_wanted:
        return StoppedReason.USER_ACTION
    if s.deadline is not None and now >= s.deadline:
        return StoppedReason.DEADLINE
    cost = followups.total_cost(s)  # every request of the job: the cap covers the sum
    if s.max_cost_pu is not None and cost is not None and cost > s.max_cost_pu:
        return StoppedReason.COST_LIMIT
    if over_forecast(s.cost_guard, s.max_cost_pu, s.cost_forecast, policy.cost_guard_margin):
        return StoppedReason.COST_FORECAST
    return None


def analyse_first(s: JobState) -> bool:
    """A start to be decided at ANALYSIS_DONE on what the job will cost at least: an auto
    start under the forecast guard with a cap (a `start` after a hold is the producer's).
    The first request's first START only: a follow-up over FATAL features is started as
    the job's own, and a resume's START (the same request again) as the job's that ran
    (the forecast guard covers the sum from its progress on). Once a START is sent, a bound
    read later no longer withholds it."""
    return (
        s.start_wanted
        and s.retry.attempt == 0
        and s.start_sent_at is None
        and not s.resumed
        and not s.cost_held
        and s.cost_guard == "forecast"
        and s.max_cost_pu is not None
    )


def bound_before_start(d: Draft, manifest_bound: float | None) -> None:
    """The manifest was read (or could not be) at ANALYSIS_DONE: the bound known before
    START becomes the job's estimate until its progress makes a forecast."""
    s = d.state
    if s.upstream_status != "ANALYSIS_DONE" or s.furthest_rank > STATUS_RANK["ANALYSIS_DONE"]:
        return
    if s.retry.attempt > 0 or s.resumed:
        # A follow-up's own bound is not the job's, nor a restart's (its earlier runs
        # billed already): their progress forecasts the sum.
        return
    if s.cost_forecast is None or s.cost_forecast.method != "linear":
        d.set(cost_forecast=lower_bound(manifest_bound))


def start_held_for_cost(d: Draft) -> bool:
    """Whether an analysed job's auto start waits: for the manifest's bound (at most
    ``tiles_wait``), or for good when the bound already exceeds the cap."""
    s = d.state
    if not analyse_first(s):
        return False
    if s.cost_forecast is None:
        since = s.analysis_done_at or d.now
        if d.now < since + d.policy.tiles_wait:
            d.wake_by(since + d.policy.tiles_wait)
            return True
        d.set(cost_forecast=lower_bound(None))  # the manifest never came: the minimum
    if bound_exceeds_cap(s.cost_guard, s.max_cost_pu, d.state.cost_forecast):
        d.set(start_wanted=False, cost_held=True)  # resting, as with auto_start false
        return True
    return False
