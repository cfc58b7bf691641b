"""The engine and its status loop against the real parts: the simulator over HTTP, the
real ``BatchClient``, the real ``TileReader`` on the moto S3 server, and PostgreSQL. No
broker: events are read from the outbox the engine writes (the relay's side is tested
elsewhere).

The simulator runs at speed 300, so a whole example job takes a few seconds.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from psycopg_pool import ConnectionPool

from tests.daemon.engine_support import job_events
from tests.store.store_support import insert_job, request_action
from worker import lifecycle
from worker.api.client import BatchClient
from worker.api.errors import TransportError
from worker.api.models import Task
from worker.api.retry import RetryPolicy
from worker.daemon.engine import Engine
from worker.daemon.status_loop import StatusLoop
from worker.daemon.tiles import TileReader
from worker.lifecycle import JobState, Phase
from worker.settings import Settings
from worker.simulator import Running, SimulatorConfig, start_background
from worker.store import jobs
from worker.wire import job_requests
from worker.wire.job_requests import JobRequest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[2] / "worker" / "examples"
FLEET = "fleet-sim"
CLIENT_ID, CLIENT_SECRET = "engine-test", "engine-test-secret"


POOL_SIZE = 12  # the pool fixture's (tests/conftest.py): each step holds a connection


@pytest.fixture
def simulator(s3_bucket: str) -> Iterator[Running]:
    s3 = boto3.client("s3")
    s3.upload_file(str(EXAMPLES / "corsica-fields.gpkg"), s3_bucket, "inputs/corsica-fields.gpkg")
    config = SimulatorConfig(
        speed=300.0,
        history=20,
        requests_per_minute=0,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
    )
    with start_background(config) as running:
        yield running


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "fleet_id": FLEET,
        "events_exchange": "ev",
        "poll_interval": 0.3,
        "rest_poll_interval": 0.5,
        "action_lag": 1.0,
        "not_found_window": 3.0,
        "list_lag_window": 3.0,
        "lease_seconds": 10.0,
        "api_budget_per_minute": 6000,
    }
    values.update(overrides)
    return Settings(**values)


def client_for(running: Running, *, timeout: float = 10.0) -> BatchClient:
    return BatchClient(
        batch_url=running.url + "/api/v2/batch",
        token_url=running.token_url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        timeout=timeout,
    )


def example(name: str, bucket: str, *, features: int | None = None, **changes: Any) -> JobRequest:
    """An example job for ``bucket``; ``features`` pins the simulator's feature count (and so
    how long the job processes) with a description marker."""
    text = (EXAMPLES / name).read_text().replace("demo-bucket", bucket)
    data = json.loads(text)
    data["job_id"] = f"{data['job_id']}-{uuid.uuid4().hex[:6]}"
    if features is not None:
        request = data["request"]
        request["description"] = f"{request.get('description', '')} [sim:features={features}]"
    data.update(changes)
    parsed = job_requests.parse_job_request(json.dumps(data).encode(), "application/json")
    assert isinstance(parsed, JobRequest), parsed
    return parsed


def submit(pool: ConnectionPool, req: JobRequest) -> str:
    now = datetime.now(UTC)
    state = lifecycle.new_job(
        job_id=req.job_id,
        fleet_id=FLEET,
        request=req.request,
        adopt_id=req.batch_request_id,
        request_hash=job_requests.request_hash(req),
        auto_start=req.auto_start,
        deadline=req.deadline,
        max_cost_pu=req.max_cost_pu,
        echo=lifecycle.Echo(),
        now=now,
    )
    with pool.connection() as conn:
        assert insert_job(conn, state, next_run_at=now)
    return req.job_id


def state_of(pool: ConnectionPool, job_id: str) -> JobState:
    with pool.connection() as conn:
        found = jobs.get_job(conn, FLEET, job_id)
    assert found is not None
    return found.state


@dataclass
class Driver:
    engine: Engine
    status: StatusLoop
    threads: list[threading.Thread]

    def stop(self) -> None:
        self.status.request_stop()
        self.engine.request_stop()
        for thread in self.threads:
            thread.join(15)
            assert not thread.is_alive()

    def running(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)


@pytest.fixture
def drive(pool: ConnectionPool, s3_endpoint: str) -> Iterator[Callable[..., Driver]]:
    drivers: list[Driver] = []

    def start(api: Any, **overrides: Any) -> Driver:
        config = settings(**overrides)
        engine = Engine(
            config,
            pool,
            api,
            tiles=TileReader(),
            worker_name="w-sim",
            threads=4,
            idle_wait=0.05,
        )
        status = StatusLoop(config, pool, api, engine, worker_name="w-sim", threads=4)
        threads = [
            threading.Thread(target=status.run, name="poller-under-test"),
            threading.Thread(target=engine.run, name="engine-under-test"),
        ]
        for thread in threads:
            thread.start()
        driver = Driver(engine, status, threads)
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        if driver.running():
            driver.stop()


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """The one kind of waiting here: for a running engine to get somewhere. The timeout is
    a hang guard, not an expectation (each wait is a few seconds at speed 300)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def ended(pool: ConnectionPool, *job_ids: str) -> Callable[[], bool]:
    return lambda: all(state_of(pool, j).phase is Phase.ENDED for j in job_ids)


def tagged(running: Running, job_id: str) -> list[Task]:
    tag = lifecycle.tag_for(FLEET, job_id)
    with client_for(running) as client:
        return [t for t in client.iter_requests() if tag in (t.description or "")]


# -- the examples --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "max-ndvi-geotiff.json",
        "max-ndvi-zarr.json",
        "geopackage-fields.json",
    ],
)
def test_each_example_ends_done_with_its_final_tile_counts(
    name: str,
    pool: ConnectionPool,
    simulator: Running,
    s3_bucket: str,
    drive: Callable[..., Driver],
) -> None:
    # 30 features: processing lasts ~2.4 s at speed 300, several poll intervals, so PROCESSING
    # is seen however loaded the machine (a status shorter than a poll round can go unseen).
    job_id = submit(pool, example(name, s3_bucket, features=30))
    with client_for(simulator) as api:
        driver = drive(api)
        wait_until(ended(pool, job_id), "the job to end")
        driver.stop()
    events = job_events(pool, job_id)
    final = events[-1]["data"]
    assert final["status"] == "DONE"
    tiles = final["tiles"]
    assert tiles["total"] >= 1
    # The final execution database: every feature accounted for in the terminal event.
    assert tiles["processed"] + tiles["failed"] == tiles["total"]
    assert final["completion_percentage"] == 100.0
    assert [e["data"]["sequence"] for e in events] == list(range(1, len(events) + 1))
    statuses = [e["data"]["status"] for e in events if e["type"] == "batchworker.job.status"]
    assert statuses[0] == "CREATED" and "PROCESSING" in statuses
    assert len(tagged(simulator, job_id)) == 1


# -- stops ---------------------------------------------------------------------------------


def test_cancel_during_processing_stops_the_request_with_user_action(
    pool: ConnectionPool, simulator: Running, s3_bucket: str, drive: Callable[..., Driver]
) -> None:
    job_id = submit(pool, example("max-ndvi-geotiff.json", s3_bucket))
    with client_for(simulator) as api:
        driver = drive(api)
        wait_until(lambda: state_of(pool, job_id).status == "PROCESSING", "PROCESSING")
        with pool.connection() as conn:
            request_action(conn, FLEET, job_id, "cancel", now=datetime.now(UTC))
        wait_until(ended(pool, job_id), "the job to end")
        driver.stop()
    state = state_of(pool, job_id)
    assert (state.status, state.stopped_reason) == ("STOPPED", "USER_ACTION")
    (upstream,) = tagged(simulator, job_id)
    assert upstream.status == "STOPPED"
    assert upstream.completion_percentage < 100.0
    final = job_events(pool, job_id)[-1]["data"]
    assert final["status"] == "STOPPED" and final["tiles"]["total"] >= 1


def test_a_deadline_stops_the_request_with_deadline(
    pool: ConnectionPool, simulator: Running, s3_bucket: str, drive: Callable[..., Driver]
) -> None:
    deadline = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    job_id = submit(pool, example("max-ndvi-geotiff.json", s3_bucket, deadline=deadline))
    with client_for(simulator) as api:
        driver = drive(api)
        wait_until(ended(pool, job_id), "the job to end")
        driver.stop()
    state = state_of(pool, job_id)
    assert (state.status, state.stopped_reason) == ("STOPPED", "DEADLINE")
    (upstream,) = tagged(simulator, job_id)
    assert upstream.status == "STOPPED"


def test_a_cost_above_the_cap_stops_the_request_with_cost_limit(
    pool: ConnectionPool, simulator: Running, s3_bucket: str, drive: Callable[..., Driver]
) -> None:
    job_id = submit(pool, example("max-ndvi-geotiff.json", s3_bucket, max_cost_pu=5.0))
    with client_for(simulator) as api:
        driver = drive(api)
        wait_until(ended(pool, job_id), "the job to end")
        driver.stop()
    state = state_of(pool, job_id)
    assert (state.status, state.stopped_reason) == ("STOPPED", "COST_LIMIT")
    assert state.cost_pu is not None and state.cost_pu > 5.0
    (upstream,) = tagged(simulator, job_id)
    assert upstream.status == "STOPPED" and upstream.completion_percentage < 100.0


# -- a create that times out -----------------------------------------------------------------


class FirstCreateTimesOut:
    """The real client, whose first create times out on the client.

    ``lost="request"``: the simulator is made slower than the client's timeout for that
    call (its ``latency`` knob); it reads the body after the delay, from a client that has
    gone, so nothing is created. ``lost="answer"``: the create is made, then the answer is
    lost (the same error the client raises on a read timeout). Either way the engine cannot
    tell which happened.
    """

    def __init__(self, client: BatchClient, running: Running, lost: str) -> None:
        self._client = client
        self._running = running
        self._lost = lost
        self.creates = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def create(self, payload: dict[str, Any], /) -> Task:
        self.creates += 1
        if self.creates > 1:
            return self._client.create(payload)
        if self._lost == "answer":
            self._client.create(payload)
            raise TransportError("ReadTimeout talking to the API", ambiguous=True)
        # The simulator reads its latency as a call arrives: only this call is slow.
        self._running.configure(latency=1.0)
        try:
            return self._client.create(payload)
        finally:
            self._running.configure(latency=0.0)


@pytest.mark.parametrize("list_lag", [0.0, 1.5])
@pytest.mark.parametrize("lost", ["request", "answer"])
def test_a_create_that_times_out_is_retried_without_making_two(
    lost: str,
    list_lag: float,
    pool: ConnectionPool,
    simulator: Running,
    s3_bucket: str,
    drive: Callable[..., Driver],
) -> None:
    # With list lag, the retry's scans miss a request for a while: the lag window (3 s)
    # must keep the engine from posting again until the list has caught up.
    simulator.configure(list_lag=list_lag)
    job_id = submit(pool, example("max-ndvi-geotiff.json", s3_bucket))
    with client_for(simulator, timeout=0.5) as client:
        api = FirstCreateTimesOut(client, simulator, lost)
        driver = drive(api)
        wait_until(ended(pool, job_id), "the job to end")
        driver.stop()
    (upstream,) = tagged(simulator, job_id)
    state = state_of(pool, job_id)
    assert (state.status, state.batch_request_id) == ("DONE", upstream.id)
    # Found by its tag when it was made; made again (once) only when it surely was not.
    assert api.creates == (1 if lost == "answer" else 2)


# -- 429: refused, not processed -----------------------------------------------------------


def test_a_create_answered_429_is_posted_again_after_retry_after_not_scanned_for(
    pool: ConnectionPool, simulator: Running, s3_bucket: str, drive: Callable[..., Driver]
) -> None:
    # A list lag window far longer than the test's wait: a create held "maybe applied"
    # would wait it out before posting again, a 429 must not.
    simulator.configure(throttle_routes="create", throttle_calls=3, retry_after_ms=200)
    job_id = submit(pool, example("max-ndvi-geotiff.json", s3_bucket, features=2))
    with BatchClient(
        batch_url=simulator.url + "/api/v2/batch",
        token_url=simulator.token_url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        retry=RetryPolicy(max_attempts=1),  # every 429 reaches the engine
    ) as api:
        driver = drive(api, list_lag_window=3600.0)
        wait_until(ended(pool, job_id), "the job to end")
        driver.stop()
    state = state_of(pool, job_id)
    assert state.status == "DONE"
    assert not state.create_doubtful  # nothing to sweep for: no create was in doubt
    assert simulator.simulator.stats["create 429"] == 3
    assert simulator.simulator.stats["create 201"] == 1
    assert len(tagged(simulator, job_id)) == 1


def test_a_start_answered_429_is_sent_again_after_retry_after_not_after_the_lag(
    pool: ConnectionPool, simulator: Running, s3_bucket: str, drive: Callable[..., Driver]
) -> None:
    # An action lag far longer than the test's wait: a start held "maybe applied" would be
    # sent again only once the lag is over.
    simulator.configure(throttle_routes="start,analyse", throttle_calls=2, retry_after_ms=200)
    job_id = submit(pool, example("max-ndvi-geotiff.json", s3_bucket, features=2, auto_start=True))
    with BatchClient(
        batch_url=simulator.url + "/api/v2/batch",
        token_url=simulator.token_url,
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        retry=RetryPolicy(max_attempts=1),
    ) as api:
        driver = drive(api, action_lag=3600.0)
        wait_until(ended(pool, job_id), "the job to end")
        driver.stop()
    assert state_of(pool, job_id).status == "DONE"
    stats = simulator.simulator.stats
    assert stats["start 429"] + stats["analyse 429"] == 2
