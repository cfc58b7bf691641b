"""The status loop's read schedule against the simulator over HTTP, with the real
``BatchClient`` and PostgreSQL: what a round reads is what the wire carries. The loop runs on
the test's clock; the simulator on its own (a request nobody starts stays ``CREATED``)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from psycopg_pool import ConnectionPool

from tests.daemon.engine_support import PollsOnAClock, new_state
from tests.simulator.conftest import small_request
from tests.store.store_support import insert_job
from worker import lifecycle
from worker.api.client import ApiHooks, BatchClient
from worker.lifecycle import Observation, Phase
from worker.simulator import Running, SimulatorConfig, start_background
from worker.store import leases

pytestmark = pytest.mark.integration

CLIENT_ID, CLIENT_SECRET = "schedule-test", "schedule-test-secret"
STATUS_READS = {"list", "get"}  # the client's endpoint names for a status read


@pytest.fixture(autouse=True)
def plain_http_oauth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")


@pytest.fixture
def simulator() -> Iterator[Running]:
    config = SimulatorConfig(
        speed=1.0, write_artifacts=False, client_id=CLIENT_ID, client_secret=CLIENT_SECRET
    )
    with start_background(config) as running:
        yield running


class NoSteps:
    def drive_safely(
        self, claim: leases.Claim, observations: list[Observation], *, stop: object = None
    ) -> None:
        raise AssertionError("an unchanged CREATED status is no step")


def test_a_created_request_is_read_over_http_every_half_interval(
    simulator: Running, pool: ConnectionPool
) -> None:
    reads: list[str] = []
    client = BatchClient(
        batch_url=simulator.url + "/api/v2/batch",
        token_url=simulator.token_url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        hooks=ApiHooks(on_request=lambda endpoint, code, _: reads.append(endpoint)),
    )
    with client:
        task = client.create(small_request("waits for its start"))
        start = datetime.now(UTC)
        state = new_state("waiting", now=start).model_copy(
            update={
                "phase": Phase.TRACKING,
                "batch_request_id": task.id,
                "upstream_created": task.created,
                "status": "CREATED",
                "upstream_status": "CREATED",
                "furthest_rank": lifecycle.STATUS_RANK["CREATED"],
                "last_seen_at": start,
            }
        )
        with pool.connection() as conn:
            assert insert_job(conn, state, next_run_at=start)
            # A tracked job has no timed wake-up: only a status round reads it.
            conn.execute("UPDATE bw_jobs SET next_run_at = NULL")
        polls = PollsOnAClock(
            pool,
            client,
            NoSteps(),
            start=start,
            requests=lambda: sum(1 for e in reads if e in STATUS_READS),
        )
        # FOLLOWING reads every 10 s; a CREATED request's change (the start's effect) is
        # minutes away at most, so it is read every 5 s, each read a request on the wire.
        assert not polls.read_at(4.9)
        assert polls.read_at(5)
        assert not polls.read_at(9.9)
        assert polls.read_at(10)
