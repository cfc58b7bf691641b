"""The poller's rounds against the simulator over HTTP with the real ``BatchClient``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.simulator.conftest import small_request
from worker.api.client import ApiHooks, BatchClient
from worker.api.retry import RetryPolicy
from worker.daemon.poller import Poller
from worker.lifecycle import TaskMissing
from worker.simulator import Running, SimulatorConfig, start_background
from worker.store.jobs import PollTarget

pytestmark = pytest.mark.integration

CLIENT_ID, CLIENT_SECRET = "poller-test", "poller-test-secret"


@pytest.fixture(autouse=True)
def plain_http_oauth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")


@pytest.fixture
def simulator() -> Iterator[Running]:
    config = SimulatorConfig(
        speed=50.0, write_artifacts=False, client_id=CLIENT_ID, client_secret=CLIENT_SECRET
    )
    with start_background(config) as running:
        yield running


def test_a_new_request_that_answers_404_costs_its_round_one_get(simulator: Running) -> None:
    # The lifecycle owns the 404 window after create (NOT_FOUND_RETRIES): a round must not
    # sit retrying one new request for the whole window while every other job waits.
    gets: list[str] = []
    client = BatchClient(
        batch_url=simulator.url + "/api/v2/batch",
        token_url=simulator.token_url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        hooks=ApiHooks(on_request=lambda endpoint, code, _: gets.append(f"{endpoint} {code}")),
        retry=RetryPolicy(not_found_window=3.0, not_found_delay=0.1),
    )
    with client:
        simulator.configure(not_found_after_create=600.0)
        new = client.create(small_request("new"))
        target = PollTarget(
            job_id="new",
            batch_request_id=new.id,
            upstream_created=new.created,
            status="CREATED",
            completion=0.0,
            cost_pu=None,
            last_seen_at=None,
        )
        gets.clear()
        result = Poller(client, "fleet", initial_page_size=100).round([target], [target])

    assert result.observations["new"] == [TaskMissing()]
    assert gets.count("get 404") == 1
