"""Fidelity: the official sentinelhub SDK drives the simulator like the real service."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sentinelhub import BatchProcessClient, SHConfig
from sentinelhub.api.batch import monitor_batch_process_analysis, monitor_batch_process_job
from sentinelhub.api.batch import utils as batch_utils
from sentinelhub.exceptions import DownloadFailedException

from tests.simulator.conftest import small_request
from worker.simulator import Running, SimulatorConfig, start_background

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def plain_http_oauth(monkeypatch: pytest.MonkeyPatch) -> None:
    # requests-oauthlib refuses http:// token urls unless told; the simulator is on loopback.
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")


def sdk_client(sim: Running) -> BatchProcessClient:
    config = SHConfig(
        sh_base_url=sim.url,
        sh_token_url=sim.token_url,
        sh_client_id="sdk-client",
        sh_client_secret="sdk-secret",
    )
    return BatchProcessClient(config=config)


def sdk_create(client: BatchProcessClient, description: str) -> Any:
    request = small_request(description)
    return client.create(
        process_request=request["processRequest"],
        input=request["input"],
        output=request["output"],
        description=description,
    )


# The monitor's test runs on a clock compressed by this factor on both sides: the simulator
# runs this much faster, and the SDK's own sleeps (60 s at least between polls, it insists)
# last this much shorter. What the SDK asks for is kept, and asserted.
COMPRESSION = 10.0


class CompressedTime:
    """Stands in for the ``time`` module inside the SDK's monitors."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.asked.append(seconds)
        time.sleep(seconds / COMPRESSION)


@pytest.fixture
def sdk_sim() -> Iterator[Running]:
    config = SimulatorConfig(
        speed=20.0 * COMPRESSION,
        history=5,
        write_artifacts=False,
        client_id="sdk-client",
        client_secret="sdk-secret",
    )
    with start_background(config) as running:
        yield running


def test_sdk_monitors_a_job_from_create_to_done(
    sdk_sim: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK's job monitor sleeps at least 60 s between polls. At speed 20 analysis takes
    # about 5 s and processing about 25 s, so the job is DONE at the monitor's first
    # wake-up (all of it COMPRESSION times faster here).
    clock = CompressedTime()
    monkeypatch.setattr(batch_utils, "time", clock)
    client = sdk_client(sdk_sim)
    created = sdk_create(client, "sdk fidelity")
    assert created.status.value == "CREATED" and created.cost_PU == 0.0
    client.start_analysis(created)
    analysed = monitor_batch_process_analysis(created, client, sleep_time=5)
    assert analysed.status.value == "ANALYSIS_DONE"
    client.start_job(created)
    finished = monitor_batch_process_job(created, client, sleep_time=60, analysis_sleep_time=5)
    assert finished.status.value == "DONE"
    assert finished.completion_percentage == 100.0
    assert finished.user_action.value == "START"
    assert finished.cost_PU >= 100.0
    # The SDK's own waits: analysis polls of 5 s (none if a poll finds it done), then one
    # job poll of 60 s.
    assert clock.asked and clock.asked[-1] == 60
    assert all(seconds == 5 for seconds in clock.asked[:-1])


def test_sdk_calls_against_the_simulator() -> None:
    config = SimulatorConfig(speed=5.0, history=5, write_artifacts=False)
    with start_background(config) as sim:
        client = sdk_client(sim)
        created = sdk_create(client, "sdk calls bwtag123")
        fetched = client.get_request(created.request_id)
        assert fetched.request_id == created.request_id
        assert fetched.request["description"] == "sdk calls bwtag123"
        updated = client.update_request(created, description="renamed bwtag123")
        assert updated["request"]["description"] == "renamed bwtag123"
        found = list(client.iter_requests(search="bwtag123"))
        assert [r.request_id for r in found] == [created.request_id]
        grids = list(client.iter_tiling_grids())
        assert [g["id"] for g in grids] == [0, 1, 2, 3, 6, 7]
        with pytest.raises(DownloadFailedException, match="status CREATED"):
            client.stop_job(created)  # stop on CREATED is refused
        client.start_job(created)
        client.stop_job(created)  # stopped while analysing: analysis completes first
        assert client.get_request(created).user_action.value == "STOP"


def test_sdk_pages_through_a_long_list() -> None:
    config = SimulatorConfig(
        history=250, page_size_max=100, write_artifacts=False, requests_per_minute=0
    )
    with start_background(config) as sim:
        client = sdk_client(sim)
        newest = sdk_create(client, "newest")
        listed = list(client.iter_requests(sort="created:desc"))
        assert len(listed) == 251
        assert len({r.request_id for r in listed}) == 251
        assert listed[0].request_id == newest.request_id
        assert sum(1 for r in listed if r.status.value == "DONE") > 200
