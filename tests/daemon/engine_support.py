"""Fakes and builders shared by the engine and status loop tests: a scripted Batch API that
moves a task one status per read (batch-v2-api.md §3.2 transitions), so a job runs through
its whole lifecycle in a fraction of a second, and the loops set up to run on it."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg_pool import ConnectionPool

from tests.store.store_support import insert_job
from worker import lifecycle
from worker.api.errors import ClientError, NotFound, TransportError
from worker.api.models import Page, Task
from worker.daemon.engine import Engine
from worker.daemon.status_loop import SWEEP_EVERY_POLLS, JobDriver, StatusLoop
from worker.lifecycle import Phase, Policy, Tiles
from worker.settings import Settings
from worker.store import jobs

FLEET = "fleet-e"
PAYLOAD: dict[str, Any] = {
    "processRequest": {
        "input": {
            "bounds": {"bbox": [8.44, 41.31, 9.66, 43.1]},
            "data": [{"type": "sentinel-2-l2a"}],
        },
        "output": {"responses": [{"identifier": "default", "format": {"type": "image/tiff"}}]},
        "evalscript": "//VERSION=3\nfunction setup() {}",
    },
    "input": {"type": "tiling-grid", "id": 0, "resolution": 60.0},
    "output": {
        "type": "raster",
        "delivery": {"s3": {"url": "s3://bucket/out", "iamRoleARN": "arn:aws:iam::1:role/r"}},
    },
    "description": "Max NDVI over Corsica",
}
FAST = Policy(
    poll_interval=timedelta(milliseconds=100),
    rest_poll_interval=timedelta(milliseconds=300),
    progress_freshness=timedelta(milliseconds=400),
    action_lag=timedelta(milliseconds=300),
    not_found_window=timedelta(milliseconds=300),
    list_lag_window=timedelta(milliseconds=200),
    clock_skew=timedelta(seconds=1),
    create_retry=timedelta(milliseconds=50),
    not_found_retries=(timedelta(0), timedelta(milliseconds=50)),
    tiles_wait=timedelta(milliseconds=50),
)
NEXT = {"ANALYSING": "ANALYSIS_DONE", "PROCESSING": "DONE"}


class FakeApi:
    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.calls: list[str] = []
        self.refuse_create = False
        self.create_times_out = False
        self.lock = threading.Lock()

    def _put(self, task: Task, **changes: Any) -> Task:
        updated = task.model_copy(update=changes)
        self.tasks[task.id] = updated
        return updated

    def create(self, payload: dict[str, Any]) -> Task:
        with self.lock:
            self.calls.append("create")
            if self.refuse_create:
                raise ClientError("bad grid", http_status=400, code="COMMON_BAD_PAYLOAD")
            task = Task(
                id=str(uuid.uuid4()),
                request=payload,
                status="CREATED",
                created=datetime.now(UTC),
            )
            self.tasks[task.id] = task
            if self.create_times_out:
                self.create_times_out = False
                raise TransportError("read timed out", ambiguous=True)
            return task

    def get(self, task_id: str, *, created_at: datetime | None = None) -> Task:
        with self.lock:
            self.calls.append("get")
            task = self.tasks.get(task_id)
            if task is None:
                raise NotFound("no such task", http_status=404)
            return self._advance(task)

    def _advance(self, task: Task) -> Task:
        """Each read finds a running task one status further on."""
        if task.status not in NEXT:
            return task
        done = NEXT[task.status] == "DONE"
        return self._put(
            task,
            status=NEXT[task.status],
            completion_percentage=100.0 if done else 0.0,
            cost_pu=100.0 if done else 0.0,
        )

    def iter_pages(
        self, *, sort: str = "created:desc", search: str | None = None, count: int | None = None
    ) -> Iterator[Page]:
        with self.lock:
            self.calls.append("list")
            tasks = [self._advance(t) for t in list(self.tasks.values())]
            tasks.sort(key=lambda t: t.created or datetime.min)
        yield Page(tasks=list(reversed(tasks)))

    def analyse(self, task_id: str) -> None:
        self._action("analyse", task_id, {"CREATED": "ANALYSING"})

    def start(self, task_id: str) -> None:
        self._action("start", task_id, {"CREATED": "ANALYSING", "ANALYSIS_DONE": "PROCESSING"})

    def stop(self, task_id: str) -> None:
        moves = {s: "STOPPED" for s in ("ANALYSING", "ANALYSIS_DONE", "PROCESSING")}
        self._action("stop", task_id, moves)
        with self.lock:
            if self.tasks[task_id].status == "STOPPED":
                self._put(self.tasks[task_id], stopped_status_reason="USER_ACTION")

    def _action(self, name: str, task_id: str, moves: dict[str, str]) -> None:
        with self.lock:
            self.calls.append(name)
            task = self.tasks.get(task_id)
            if task is None:
                raise NotFound("no such task", http_status=404)
            if task.status not in moves:
                raise ClientError(f"cannot {name}", http_status=400, code="COMMON_BAD_PAYLOAD")
            self._put(task, status=moves[task.status])


class NoTiles:
    def cost_bound(self, request_id: str) -> float | None:
        return None

    def read(self, request: dict[str, Any], request_id: str, *, execution_db: bool) -> Tiles | None:
        return Tiles(total=4, processed=4 if execution_db else 0)


class Recorder:
    def __init__(self) -> None:
        self.finished: list[tuple[str, str | None]] = []
        self.tile_deltas: list[tuple[int, int]] = []
        self.duplicates = 0
        self.follow_ups = 0
        self.recovered = 0
        self.withheld = 0
        self.lag: list[float] = []
        self.in_flight: list[dict[str, int]] = []
        self.cost_shares: list[float] = []
        self.paused: list[str] = []

    def job_finished(
        self,
        status: str,
        reason: str | None,
        duration_seconds: float | None,
        tenant: str | None = None,
    ) -> None:
        self.finished.append((status, reason))

    def job_paused(self, reason: str) -> None:
        self.paused.append(reason)

    def set_in_flight(self, counts: dict[str, int]) -> None:
        self.in_flight.append(dict(counts))

    def tiles(self, processed_delta: int, failed_delta: int) -> None:
        self.tile_deltas.append((processed_delta, failed_delta))

    def duplicate_stopped(self) -> None:
        self.duplicates += 1

    def follow_up(self, recovered_delta: int, *, created: bool) -> None:
        self.follow_ups += int(created)
        self.recovered += max(recovered_delta, 0)

    def status_lag(self, seconds: float) -> None:
        self.lag.append(seconds)

    def cost_share(self, share: float) -> None:
        self.cost_shares.append(share)

    def start_withheld(self) -> None:
        self.withheld += 1


SETTINGS = Settings(fleet_id=FLEET, events_exchange="ev", lease_seconds=30)


def make_engine(pool: ConnectionPool, api: FakeApi, name: str = "w1", **kw: Any) -> Engine:
    """The engine alone: it steps the jobs it claims (or is handed, ``drive``)."""
    return Engine(
        SETTINGS,
        pool,
        api,
        tiles=kw.pop("tiles", NoTiles()),
        metrics=kw.pop("metrics", None),
        policy=kw.pop("policy", FAST),
        worker_name=name,
        threads=4,
        idle_wait=kw.pop("idle_wait", 0.02),
        gauges_every=0.1,
        **kw,
    )


def new_state(job_id: str, *, now: datetime, **fields: Any) -> lifecycle.JobState:
    """A job of the fleet as intake accepts it: ``PAYLOAD``, started once analysed, no
    deadline or cost cap, unless ``fields`` (of ``lifecycle.new_job``) say otherwise."""
    args: dict[str, Any] = {
        "request": PAYLOAD,
        "adopt_id": None,
        "auto_start": True,
        "deadline": None,
        "max_cost_pu": None,
        "echo": lifecycle.Echo(),
    }
    args.update(fields)
    return lifecycle.new_job(job_id=job_id, fleet_id=FLEET, request_hash="h", now=now, **args)


def add_job(pool: ConnectionPool, job_id: str = "j1", **fields: Any) -> None:
    now = datetime.now(UTC)
    state = new_state(job_id, now=now, **fields)
    with pool.connection() as conn:
        insert_job(conn, state, next_run_at=now)


def record(pool: ConnectionPool, job_id: str = "j1") -> jobs.JobRecord:
    with pool.connection() as conn:
        found = jobs.get_job(conn, FLEET, job_id)
    assert found is not None
    return found


def job_events(pool: ConnectionPool, job_id: str = "j1") -> list[dict[str, Any]]:
    """The job's events in the outbox, oldest first."""
    with pool.connection() as conn:
        rows = conn.execute(
            "SELECT body FROM bw_outbox WHERE exchange = 'ev' ORDER BY id"
        ).fetchall()
    events = [json.loads(bytes(body)) for (body,) in rows]
    return [e for e in events if e["subject"] == job_id and e["type"].startswith("batchworker.job")]


def statuses(pool: ConnectionPool, job_id: str = "j1") -> list[tuple[int, str]]:
    return [
        (event["data"]["sequence"], event["data"]["status"])
        for event in job_events(pool, job_id)
        if event["type"] == "batchworker.job.status"
    ]


@dataclass
class Worker:
    """The engine and the status loop, run side by side as the daemon runs them."""

    engine: Engine
    status: StatusLoop

    def run(self) -> None:
        reading = threading.Thread(target=self.status.run, name="poller-under-test")
        reading.start()
        try:
            self.engine.run()
        finally:
            reading.join(10)
        assert not reading.is_alive()

    def request_stop(self) -> None:
        self.status.request_stop()
        self.engine.request_stop()


def make_status(
    pool: ConnectionPool, api: FakeApi, driver: JobDriver, name: str = "w1", **kw: Any
) -> StatusLoop:
    return StatusLoop(
        SETTINGS,
        pool,
        api,
        driver,
        worker_name=name,
        policy=kw.pop("policy", FAST),
        threads=4,
        **kw,
    )


# Following jobs on a test's own clock: reads every 10 s, progress every 2 minutes.
FOLLOWING = replace(
    FAST,
    poll_interval=timedelta(seconds=10),
    progress_freshness=timedelta(seconds=120),
    rest_poll_interval=timedelta(minutes=10),
)


class PollsOnAClock:
    """A status loop (``FOLLOWING``, no sweeps) on the test's clock: ``read_at(after)`` runs
    one round at ``start + after`` seconds and says whether it made an API request, as
    ``requests`` counts them."""

    def __init__(
        self,
        pool: ConnectionPool,
        api: Any,
        driver: JobDriver,
        *,
        start: datetime,
        requests: Callable[[], int],
    ) -> None:
        self.start, self.now, self._requests = start, start, requests
        self.loop = make_status(
            pool, api, driver, clock=lambda: self.now, policy=FOLLOWING, sweep_every_polls=None
        )

    def read_at(self, after: float) -> bool:
        self.now = self.start + timedelta(seconds=after)
        before = self._requests()
        self.loop.poll_once()
        return self._requests() > before


def make_worker(
    pool: ConnectionPool,
    api: FakeApi,
    name: str = "w1",
    *,
    sweep_every_polls: int | None = SWEEP_EVERY_POLLS,
    **kw: Any,
) -> Worker:
    """An engine and its status loop; ``kw`` for both (``policy``, ``clock``) or the
    engine's alone (``metrics``)."""
    shared = {key: kw[key] for key in ("policy", "clock") if key in kw}
    engine = make_engine(pool, api, name, **kw)
    status = make_status(pool, api, engine, name, sweep_every_polls=sweep_every_polls, **shared)
    return Worker(engine, status)


def run_until_ended(pool: ConnectionPool, worker: Worker, *job_ids: str) -> None:
    """Runs the engine and the status loop until the jobs end. The one place these tests
    wait: both are loops; 20 s is a hang guard, not an expected duration (a run takes well
    under 2 s)."""
    thread = threading.Thread(target=worker.run)
    thread.start()
    ended = threading.Event()
    try:
        for _ in range(400):
            if all(record(pool, j).state.phase is Phase.ENDED for j in job_ids or ("j1",)):
                ended.set()
                break
            ended.wait(0.05)
    finally:
        worker.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    assert ended.is_set(), [record(pool, j).state.status for j in job_ids or ("j1",)]
