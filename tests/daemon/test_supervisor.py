"""The daemon's process-wide settings (its loops are tested end to end in tests/e2e/)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker.daemon.supervisor import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


def test_the_young_generation_is_collected_less_often_and_the_rest_left_alone(
    thresholds: tuple[int, int, int],
) -> None:
    gc.set_threshold(700, 10, 10)  # Python's defaults
    tune_gc()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
    assert GC_YOUNG_THRESHOLD > 700
    gc.set_threshold(50_000, 5, 5)  # someone asked for more already: kept
    tune_gc()
    assert gc.get_threshold() == (50_000, 5, 5)


def test_now_and_then_the_active_count_is_folded(database_url: str) -> None:
    from tests.store.store_support import job  # the store tests' job state
    from worker.daemon.supervisor import Daemon
    from worker.settings import Settings
    from worker.store import capacity, db, jobs

    pool = db.open_pool(database_url, max_size=2)
    try:
        db.ensure_schema(pool)
        with pool.connection() as conn:
            for n in range(capacity.COMPACT_BEYOND + 1):  # a delta row each
                jobs.insert_job(conn, job(f"j{n}", fleet_id="f"), next_run_at=job().accepted_at)
                conn.commit()
        Daemon(Settings(fleet_id="f", worker_name="w"))._now_and_then(pool)
        with pool.connection() as conn:
            rows = conn.execute("SELECT count(*) FROM bw_active_deltas").fetchone()
            assert rows == (1,)
            assert capacity.count_active(conn, "f") == capacity.COMPACT_BEYOND + 1
    finally:
        pool.close()
