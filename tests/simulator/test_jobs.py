"""The status machine of batch-v2-api.md §3, on a clock the tests hold."""

from __future__ import annotations

import pytest

from worker.simulator.config import SimulatorConfig
from worker.simulator.grids import Feature
from worker.simulator.jobs import Conflict, IllegalAction, Outcome, SimJob

# speed 1: durations below are the config's API seconds.
CONFIG = SimulatorConfig(
    speed=1.0,
    analysis_base=10.0,
    analysis_per_feature=1.0,
    processing_base=100.0,
    processing_per_feature=10.0,
    status_lag=5.0,
    done_lag=20.0,
    restart_block=1800.0,
)
T0 = 1_000_000.0


def job(outcome: Outcome | None = None, features: int = 10) -> SimJob:
    made = SimJob(
        id="j",
        request={"description": "d"},
        created=T0,
        account_id="a",
        project_id="p",
        outcome=outcome or Outcome(),
    )
    made.features = [Feature(f"f{i}", 4326, (0, 0, 1, 1)) for i in range(features)]
    made.feature_count = features
    made.pu_per_feature = 50.0
    return made


def statuses(j: SimJob, times: list[float]) -> list[str]:
    return [j.status(T0 + t) for t in times]


def test_analyse_lags_then_runs_analysis_to_analysis_done() -> None:
    j = job()
    j.analyse(T0, CONFIG)
    # lag 5 s, analysis 10 + 10 x 1 = 20 s
    assert statuses(j, [1, 6, 24, 26, 1000]) == [
        "CREATED",
        "ANALYSING",
        "ANALYSING",
        "ANALYSIS_DONE",
        "ANALYSIS_DONE",
    ]
    assert j.to_api(T0 + 1)["userAction"] == "ANALYSE"
    assert j.view(T0 + 26).cost == 0.0  # §3.3: no cost at analysis


def test_start_on_created_analyses_then_processes_to_done() -> None:
    j = job()
    j.start(T0, CONFIG)
    # analysis 5..25, processing from 30 for 200 s to 230, DONE after 20 s more.
    assert statuses(j, [1, 10, 27, 31, 229, 235, 251]) == [
        "CREATED",
        "ANALYSING",
        "ANALYSIS_DONE",
        "PROCESSING",
        "PROCESSING",
        "PROCESSING",
        "DONE",
    ]
    rising = [j.view(T0 + t).completion for t in (31, 80, 130, 229)]
    assert rising == sorted(rising) and rising[0] < rising[-1] < 100
    # §3.3: 100 % shows before the status turns DONE.
    late = j.view(T0 + 240)
    assert (late.status, late.completion) == ("PROCESSING", 100.0)
    done = j.view(T0 + 251)
    assert done.completion == 100.0 and done.cost == 500.0  # 10 features x 50 PU


def test_cost_is_at_least_the_minimum() -> None:
    j = job(features=1)
    j.pu_per_feature = 1.0
    j.start(T0, CONFIG)
    assert j.view(T0 + 10_000).cost == 100.0  # §14: 100 PU minimum


def test_illegal_actions_are_refused() -> None:
    j = job()
    with pytest.raises(IllegalAction):
        j.stop(T0, CONFIG)  # stop on CREATED
    j.analyse(T0, CONFIG)
    with pytest.raises(IllegalAction):
        j.analyse(T0 + 1, CONFIG)  # already analysing (even while the status lags)
    j.start(T0 + 30, CONFIG)
    with pytest.raises(IllegalAction):
        j.start(T0 + 40, CONFIG)  # already started
    assert j.status(T0 + 10_000) == "DONE"
    with pytest.raises(IllegalAction):
        j.stop(T0 + 10_000, CONFIG)
    with pytest.raises(IllegalAction):
        j.start(T0 + 10_000, CONFIG)


def test_stop_while_processing_freezes_progress_and_cost() -> None:
    j = job()
    j.start(T0, CONFIG)
    j.stop(T0 + 100, CONFIG)
    assert j.to_api(T0 + 101)["userAction"] == "STOP"
    assert j.status(T0 + 101) == "PROCESSING"  # status lag
    stopped = j.view(T0 + 106)
    assert stopped.status == "STOPPED" and stopped.reason == "USER_ACTION"
    assert 0 < stopped.completion < 100
    later = j.view(T0 + 5000)
    assert (later.completion, later.cost) == (stopped.completion, stopped.cost)
    assert j.to_api(T0 + 5000)["stoppedStatusReason"] == "USER_ACTION"


def test_stop_while_analysing_lets_analysis_finish_then_stops() -> None:
    j = job()
    j.analyse(T0, CONFIG)
    j.stop(T0 + 10, CONFIG)
    assert statuses(j, [11, 24, 26]) == ["ANALYSING", "ANALYSING", "STOPPED"]


def test_restart_is_blocked_for_30_minutes_then_continues() -> None:
    j = job()
    j.start(T0, CONFIG)
    j.stop(T0 + 100, CONFIG)
    frozen = j.view(T0 + 200).completion
    with pytest.raises(IllegalAction, match="30 minutes"):
        j.start(T0 + 1000, CONFIG)
    j.start(T0 + 2000, CONFIG)
    assert statuses(j, [2001, 2006, 2011]) == ["STOPPED", "ANALYSIS_DONE", "PROCESSING"]
    assert j.view(T0 + 2011).completion >= frozen
    assert j.status(T0 + 5000) == "DONE"


def test_failed_analysis_ends_failed_with_error() -> None:
    j = job(Outcome(fail_analysis=True))
    j.analysis_error = "Failed to validate evalscript."
    j.start(T0, CONFIG)
    body = j.to_api(T0 + 100)
    assert body["status"] == "FAILED" and body["error"] == "Failed to validate evalscript."
    with pytest.raises(IllegalAction):
        j.start(T0 + 200, CONFIG)


@pytest.mark.parametrize(("reason", "at"), [("OUT_OF_PU", 50.0), ("UNHEALTHY", 30.0)])
def test_system_stops_with_reason(reason: str, at: float) -> None:
    j = job(Outcome(stop_reason=reason, stop_at=at))
    j.start(T0, CONFIG)
    final = j.view(T0 + 10_000)
    assert (final.status, final.reason, final.completion) == ("STOPPED", reason, at)
    j.start(T0 + 20_000, CONFIG)  # restarted after the block, it finishes
    assert j.status(T0 + 30_000) == "DONE"


def test_update_refused_while_processing_or_waiting() -> None:
    j = job()
    j.update_description(T0, "renamed")
    assert j.description() == "renamed"
    j.start(T0 + 1, CONFIG)
    with pytest.raises(Conflict):
        j.update_description(T0 + 2, "again")  # waiting to be processed
    with pytest.raises(Conflict):
        j.update_description(T0 + 100, "again")  # processing
    j.update_description(T0 + 10_000, "after")
    assert j.description() == "after"


def test_execution_rows_follow_completion_with_fatal_features() -> None:
    j = job()
    j.fatal_indices = frozenset({0, 5})
    j.start(T0, CONFIG)
    mid = [row[2] for row in j.feature_rows(T0 + 130)]  # half way through processing
    assert mid.count("PENDING") == 5 and mid[0] == "FATAL"
    final = [row[2] for row in j.feature_rows(T0 + 10_000)]
    assert final.count("DONE") == 8 and final.count("FATAL") == 2


def test_barrier_holds_the_status_until_lifted() -> None:
    j = job()
    j.analyse(T0, CONFIG)
    j.barrier = j.analysis_end
    assert j.status(T0 + 1000) == "ANALYSING"
    j.barrier = None
    assert j.status(T0 + 1000) == "ANALYSIS_DONE"


def test_repeated_system_stops_each_stop_a_run_then_the_last_restart_finishes() -> None:
    j = job(Outcome(stop_reason="UNHEALTHY", stop_at=30.0, stops=2))
    j.start(T0, CONFIG)
    first = j.view(T0 + 10_000)
    assert (first.status, first.reason, first.completion) == ("STOPPED", "UNHEALTHY", 30.0)
    j.start(T0 + 20_000, CONFIG)
    second = j.view(T0 + 20_100)  # 21 % of a 200 s run after 10 s of lags
    # 30 % of what the second run had left: 30 + 70 x 0.3
    assert (second.status, second.reason, second.completion) == ("STOPPED", "UNHEALTHY", 51.0)
    with pytest.raises(IllegalAction, match="30 minutes"):
        j.start(T0 + 21_000, CONFIG)
    j.start(T0 + 40_000, CONFIG)
    assert j.status(T0 + 50_000) == "DONE"


@pytest.mark.parametrize(
    ("mode", "restart_completion", "final_cost"),
    # 10 features x 50 PU = 500 PU; stopped at 50 %: 250 PU billed by the first run.
    [("continue", 50.0, 500.0), ("reprocess", 0.0, 750.0)],
)
def test_start_after_a_stop_continues_or_reprocesses_and_bills_again(
    mode: str, restart_completion: float, final_cost: float
) -> None:
    config = CONFIG.model_copy(update={"restart_mode": mode})
    j = job(Outcome(stop_reason="OUT_OF_PU", stop_at=50.0))
    j.start(T0, config)
    assert j.view(T0 + 10_000).cost == 250.0
    j.start(T0 + 20_000, config)
    restarted = j.view(T0 + 20_006)  # ANALYSIS_DONE, lag 5 s
    assert restarted.status == "ANALYSIS_DONE"
    assert (restarted.completion, restarted.cost) == (restart_completion, 250.0)
    final = j.view(T0 + 30_000)
    assert (final.status, final.completion, final.cost) == ("DONE", 100.0, final_cost)
    # costPU never goes down across the restart
    costs = [j.view(T0 + 20_000 + t).cost for t in range(0, 10_000, 50)]
    assert costs == sorted(costs)


def test_a_phase_records_when_a_reader_first_saw_it() -> None:
    # The bench measures status change -> event from this, not from the scheduled time,
    # so a status the service held back (the artifact barrier) is not the reader's latency.
    j = job()
    j.analyse(T0, CONFIG)  # ANALYSING at +5 s, ANALYSIS_DONE at +25 s
    j.status(T0 + 30)  # the service's own look is no reader's
    assert [p.shown for p in j.phases] == [None, None]
    j.to_api(T0 + 7)
    j.to_api_json(T0 + 9)
    assert [p.shown for p in j.phases] == [T0 + 7, None]
    j.barrier = T0 + 25  # the manifest is not up yet: ANALYSIS_DONE is held
    j.to_api(T0 + 40)
    assert [p.shown for p in j.phases] == [T0 + 7, None]
    j.barrier = None
    j.to_api_json(T0 + 41)
    j.to_api(T0 + 50)
    assert [p.shown for p in j.phases] == [T0 + 7, T0 + 41]


def test_lifting_the_barrier_records_when_the_held_status_became_answerable() -> None:
    # The bench's middle bound: the later of the scheduled time and the barrier's release.
    j = job()
    j.analyse(T0, CONFIG)  # ANALYSING at +5 s, ANALYSIS_DONE at +25 s
    j.hold(T0 + 25, T0 + 1)  # the manifest is not up yet
    j.hold(None, T0 + 20)  # up before ANALYSIS_DONE was due: nothing was held back
    assert [p.released for p in j.phases] == [None, None]
    j.hold(T0 + 25, T0 + 21)
    j.hold(T0 + 25, T0 + 30)  # the same barrier again: still held
    j.hold(None, T0 + 34)
    assert [p.released for p in j.phases] == [None, T0 + 34]
    assert j.status(T0 + 34) == "ANALYSIS_DONE"
