"""Per-request outcomes (markers, rates), the state file, and the command-line options."""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any

import pytest

from tests.simulator.conftest import FAST, Api, small_request
from worker.simulator import SimulatorConfig, build_parser_arguments, config_from_args
from worker.simulator import start_background as start
from worker.simulator.features import decide_outcome
from worker.simulator.grids import Feature
from worker.simulator.jobs import Outcome, Phase, SimJob
from worker.simulator.store import Store

pytestmark = pytest.mark.integration


def settle(api: Api, job_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10  # a bound on the wait, not a speed assertion
    while True:
        body: dict[str, Any] = api.get(f"/process/{job_id}").json()
        if body["status"] in {"DONE", "FAILED", "STOPPED"} or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("marker", "status", "reason"),
    [
        ("[sim:fail-analysis]", "FAILED", None),
        ("[sim:out-of-pu]", "STOPPED", "OUT_OF_PU"),
        ("[sim:unhealthy]", "STOPPED", "UNHEALTHY"),
        ("", "DONE", None),
    ],
)
def test_markers_choose_the_outcome(api: Api, marker: str, status: str, reason: str | None) -> None:
    task = api.create(small_request(f"job {marker}"))
    api.post(f"/process/{task['id']}/start")
    final = settle(api, task["id"])
    assert final["status"] == status
    assert final.get("stoppedStatusReason") == reason
    assert ("error" in final) is (status == "FAILED")


def test_a_count_on_a_stop_marker_stops_that_many_runs() -> None:
    dice = random.Random(1)
    twice = decide_outcome("job [sim:unhealthy=2]", SimulatorConfig(), dice)
    once = decide_outcome("job [sim:out-of-pu]", SimulatorConfig(), dice)
    assert (twice.stop_reason, twice.stops) == ("UNHEALTHY", 2)
    assert (once.stop_reason, once.stops) == ("OUT_OF_PU", 1)


def test_features_marker_sets_the_count_and_cost() -> None:
    with start(SimulatorConfig(**FAST)) as sim:
        api = Api(sim)
        # Grid 0 at 10 m: about 19.5 PU a feature (2004 x 2004 px, 1/3 batch multiplier).
        fine = {"type": "tiling-grid", "id": 0, "resolution": 10.0}
        small = api.create(small_request("[sim:features=2]", input=fine))
        large = api.create(small_request("[sim:features=40]", input=fine))
        for task in (small, large):
            api.post(f"/process/{task['id']}/start")
        costs = [settle(api, t["id"])["costPU"] for t in (small, large)]
        assert costs[0] == 100.0  # §14: the minimum
        assert costs[1] == pytest.approx(40 * 2004**2 / 512**2 / 3, rel=1e-3)


def test_rates_with_a_seed_fail_every_analysis() -> None:
    with start(SimulatorConfig(**FAST, rate_fail_analysis=1.0, seed=7)) as sim:
        api = Api(sim)
        task = api.create()
        api.post(f"/process/{task['id']}/start")
        assert settle(api, task["id"])["status"] == "FAILED"


def test_state_file_keeps_requests_across_a_restart(tmp_path: Path) -> None:
    config = SimulatorConfig(**FAST, state_file=tmp_path / "sim.json")
    with start(config) as sim:
        api = Api(sim)
        task = api.create(small_request("kept"))
        api.post(f"/process/{task['id']}/start")
    with start(config) as again:
        api = Api(again)
        assert settle(api, task["id"])["status"] == "DONE"
        listed = api.get("/process", params={"search": "kept"}).json()["data"]
        assert [t["id"] for t in listed] == [task["id"]]


def test_a_saved_store_loads_back_equal(tmp_path: Path) -> None:
    store = Store("account", "project")
    job = SimJob(
        id="r1",
        request={"description": "kept", "input": {"type": "tiling-grid", "id": 0}},
        created=1000.0,
        account_id="account",
        project_id="project",
        outcome=Outcome(stop_reason="OUT_OF_PU", stop_at=40.0, fatal=1),
        user_action="START",
        user_action_updated=1010.0,
        phases=[Phase(1001.0, "ANALYSING"), Phase(1060.0, "PROCESSING", 0.0, 100.0, 1200.0)],
        features=[Feature("cell-1", 32632, (0.0, 1.0, 2.0, 3.0))],
        feature_count=1,
        fatal_indices=frozenset({0}),
        analysis_end=1059.0,
        pending_from=1001.0,
        request_json='{"stale": "cache"}',  # a cache: not saved, made again after a load
    )
    store.add(job)
    store.save(tmp_path / "state.json")
    loaded = Store.load(tmp_path / "state.json")
    assert (loaded.account_id, loaded.project_id) == ("account", "project")
    assert loaded.order == [job]
    assert loaded.order[0].request_json is None


def test_command_line_options_build_the_config(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    build_parser_arguments(parser)
    args = parser.parse_args(
        [
            "--port",
            "9000",
            "--speed",
            "50",
            "--search-mode",
            "words",
            "--no-write-artifacts",
            "--client-id",
            "x",
            "--state-file",
            str(tmp_path / "s.json"),
        ]
    )
    config = config_from_args(args)
    assert (args.host, args.port) == ("127.0.0.1", 9000)
    assert (config.speed, config.search_mode, config.write_artifacts) == (50.0, "words", False)
    assert config.client_id == "x" and config.state_file == tmp_path / "s.json"
    assert config.page_size_max == SimulatorConfig().page_size_max
    with pytest.raises(SystemExit):
        parser.parse_args(["--search-mode", "regex"])
