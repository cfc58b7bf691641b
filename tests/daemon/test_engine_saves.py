"""When the engine saves: a step on a status read that asks only for the tile read is saved
with the step on the tiles, in one statement; what happens when a request arrives, or the
read fails, in between (worker/daemon/engine.py ``_deferrable``, ``_refold``)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from tests.daemon.engine_support import FLEET, PAYLOAD, FakeApi, make_engine, record
from tests.store.store_support import insert_job, request_action
from worker import lifecycle
from worker.api.models import Task
from worker.lifecycle import JobState, Phase, TaskSeen, TaskSnapshot, Tiles
from worker.store import db, leases


@pytest.fixture
def pool(database_url: str) -> Iterator[ConnectionPool]:
    pool = db.open_pool(database_url, max_size=8)
    db.ensure_schema(pool)
    yield pool
    pool.close()


class ReadsWith:
    """A tile source that runs ``during`` as it reads (the row as it stands mid-drive)."""

    def __init__(self, during: Callable[[], None], tiles: Tiles) -> None:
        self.during = during
        self.tiles = tiles
        self.reads = 0

    def read(self, request: dict[str, Any], request_id: str, *, execution_db: bool) -> Tiles:
        self.reads += 1
        self.during()
        return self.tiles

    def cost_bound(self, request_id: str) -> float | None:
        return None


def processing_job(pool: ConnectionPool, api: FakeApi, status: str = "PROCESSING") -> leases.Claim:
    """A job processing at 10 % (or in ``status``), its task known to ``api``, claimed by w1."""
    now = datetime.now(UTC)
    task = Task(
        id=str(uuid.uuid4()),
        request=PAYLOAD,
        status="PROCESSING",
        created=now,
        completion_percentage=10.0,
        cost_pu=1.0,
    )
    api.tasks[task.id] = task
    state = JobState(
        job_id="j1",
        fleet_id=FLEET,
        request_hash="h",
        request=PAYLOAD,
        accepted_at=now,
        phase=Phase.TRACKING,
        batch_request_id=task.id,
        upstream_created=now,
        status=status,
        upstream_status=status,
        furthest_rank=lifecycle.STATUS_RANK[status],
        completion=10.0,
        cost_pu=1.0,
        tiles=Tiles(total=4, processed=0),
        sequence=3,
        start_wanted=True,
    )
    with pool.connection() as conn:
        insert_job(conn, state, next_run_at=now)
        (claim,) = leases.claim_due(
            conn, FLEET, "w1", now=now, lease=timedelta(seconds=30), limit=1
        )
    return claim


def seen_at(claim: leases.Claim, completion: float) -> TaskSeen:
    return TaskSeen(
        TaskSnapshot(
            id=claim.state.batch_request_id or "",
            status="PROCESSING",
            created=claim.state.upstream_created,
            completion_percentage=completion,
            cost_pu=2.0,
        )
    )


def events(pool: ConnectionPool) -> list[dict[str, Any]]:
    with pool.connection() as conn:
        rows = conn.execute("SELECT body FROM bw_outbox WHERE exchange = 'ev' ORDER BY id")
        return [json.loads(bytes(body)) for (body,) in rows.fetchall()]


def test_a_status_read_and_the_tile_read_it_asks_for_are_saved_together(
    pool: ConnectionPool,
) -> None:
    api = FakeApi()
    claim = processing_job(pool, api)
    during: list[JobState] = []
    tiles = ReadsWith(lambda: during.append(record(pool).state), Tiles(total=4, processed=2))
    engine = make_engine(pool, api, tiles=tiles)

    engine.drive(claim, [seen_at(claim, 50.0)])

    # While the tiles were read, nothing of the status read was saved yet...
    assert tiles.reads == 1
    assert during == [claim.state]
    # ...and one save holds both steps, their events, and gives the lease back.
    job = record(pool)
    assert job.state.completion == 50.0
    assert job.state.tiles == Tiles(total=4, processed=2)
    assert job.lease_owner is None and job.lease_until is None
    sent = events(pool)
    assert [e["data"]["sequence"] for e in sent] == list(range(4, 4 + len(sent)))
    assert sent[-1]["data"]["completion_percentage"] == 50.0
    assert sent[-1]["data"]["tiles"] == {"total": 4, "processed": 2, "failed": 0}
    assert job.state.sequence == sent[-1]["data"]["sequence"]
    assert api.calls == []


def test_a_status_change_is_saved_before_the_tile_read_it_asks_for(
    pool: ConnectionPool,
) -> None:
    api = FakeApi()
    claim = processing_job(pool, api, status="ANALYSIS_DONE")
    during: list[list[str]] = []

    def published() -> None:
        during.append([e["data"]["status"] for e in events(pool) if e["type"].endswith(".status")])

    tiles = ReadsWith(published, Tiles(total=4, processed=1))
    engine = make_engine(pool, api, tiles=tiles)

    engine.drive(claim, [seen_at(claim, 20.0)])

    # The PROCESSING event was in the outbox while S3 was still being read...
    assert tiles.reads == 1
    assert during == [["PROCESSING"]]
    # ...and the tiles came in with a save of their own.
    job = record(pool)
    assert job.state.status == "PROCESSING"
    assert job.state.tiles == Tiles(total=4, processed=1)
    assert job.lease_owner is None
    sent = events(pool)
    assert [e["data"]["sequence"] for e in sent] == list(range(4, 4 + len(sent)))


def test_a_cancel_arriving_during_the_tile_read_is_decided_on_before_anything_is_saved(
    pool: ConnectionPool, caplog: pytest.LogCaptureFixture
) -> None:
    api = FakeApi()
    claim = processing_job(pool, api)

    def cancel() -> None:
        if tiles.reads == 1:  # the first read only: the producer cancels once
            with pool.connection() as conn:
                request_action(conn, FLEET, "j1", "cancel", now=datetime.now(UTC))

    tiles = ReadsWith(cancel, Tiles(total=4, processed=2))
    engine = make_engine(pool, api, tiles=tiles)

    with caplog.at_level(logging.INFO, logger="worker.daemon.engine"):
        engine.drive(claim, [seen_at(claim, 50.0)])

    assert "j1: a request arrived during the step" in caplog.text
    # The status read was decided again with the cancel known: the stop went out.
    assert "stop" in api.calls
    job = record(pool)
    assert job.state.cancel_wanted and job.cancel_requested_at is None
    assert job.state.completion == 50.0
    # No event of the discarded decision: sequences run on from the claimed state unbroken.
    sent = events(pool)
    assert [e["data"]["sequence"] for e in sent] == list(range(4, 4 + len(sent)))
    assert job.state.sequence == (sent[-1]["data"]["sequence"] if sent else 3)


def test_a_tile_read_that_fails_leaves_the_job_as_it_was_claimed(pool: ConnectionPool) -> None:
    api = FakeApi()
    claim = processing_job(pool, api)

    def fail() -> None:
        raise RuntimeError("the reader broke")

    engine = make_engine(pool, api, tiles=ReadsWith(fail, Tiles(total=4)))

    with pytest.raises(RuntimeError):
        engine.drive(claim, [seen_at(claim, 50.0)])

    # Nothing of the status read was saved: the next read of the status brings it back
    # (the job is still due at its lease's end, as any claimed job a worker dropped).
    job = record(pool)
    assert job.state == claim.state
    assert events(pool) == []
    assert job.next_run_at == job.lease_until
