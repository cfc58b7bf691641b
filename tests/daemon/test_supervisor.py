"""The daemon's process-wide settings (its loops are tested end to end in tests/e2e/)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from tests.store.store_support import insert_job
from worker.daemon.supervisor import GC_YOUNG_THRESHOLD, register_settings_secrets, tune_gc
from worker.redact import forget_secret, redact_text
from worker.settings import Settings


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
    from worker.store import capacity, db

    pool = db.open_pool(database_url, max_size=2)
    try:
        db.ensure_schema(pool)
        with pool.connection() as conn:
            for n in range(capacity.COMPACT_BEYOND + 1):  # a delta row each
                insert_job(conn, job(f"j{n}", fleet_id="f"), next_run_at=job().accepted_at)
                conn.commit()
        Daemon(Settings(fleet_id="f", worker_name="w"))._now_and_then(pool)
        with pool.connection() as conn:
            rows = conn.execute("SELECT count(*) FROM bw_active_deltas").fetchone()
            assert rows == (1,)
            assert capacity.count_active(conn, "f") == capacity.COMPACT_BEYOND + 1
    finally:
        pool.close()


def test_the_step_threads_stay_watched_while_a_loop_that_runs_steps_is_left() -> None:
    """The supervisor stops every loop alike; the job steps (threads of both the status loop
    and the engine) are watched until neither is left running, whatever their names."""
    import threading

    from worker.daemon import liveness
    from worker.daemon.supervisor import Daemon, _Loop
    from worker.settings import Settings

    def runs(stop: threading.Event, *, stops: bool) -> _Loop:
        release = threading.Event()  # a loop that ignores its stop waits for this instead

        def target() -> None:
            (stop if stops else release).wait(30)

        loop = _Loop("?", target, stop.set)
        loop.thread = threading.Thread(target=target, daemon=True)
        loop.thread.start()
        return loop

    for engine_stops in (False, True):
        daemon = Daemon(Settings(fleet_id="f", worker_name="w", grace_period=0.3))
        names = ["supervisor", "poller", "engine", liveness.STEPS_LOOP]
        for name in names:
            daemon.health.register(name, 100, per_thread=name in liveness.PER_THREAD_LOOPS)
        steps = (liveness.STEPS_LOOP,)
        loops = []
        for name, stops, shares in [("poller", True, steps), ("engine", engine_stops, steps)]:
            loop = runs(threading.Event(), stops=stops)
            loop.name, loop.shares = name, shares
            loops.append(loop)
        assert daemon._shutdown(loops) is engine_stops
        watched = set(daemon.health.progress())
        if engine_stops:
            assert watched == set()
        else:  # the engine is still running: its own and its steps' liveness still count
            assert watched == {"engine", liveness.STEPS_LOOP}


def test_every_password_of_a_failover_list_is_masked() -> None:
    settings = Settings(
        broker_url="amqp://w:first-pw-1@a//;amqp://w:second-pw-2@b//",
        database_url="postgresql://pg:db-pw-3@db/jobs",
    )
    register_settings_secrets(settings)
    try:
        # Where no URL shape gives them away: a driver's message quoting the bare value.
        text = redact_text("auth failed: first-pw-1 / second-pw-2 / db-pw-3")
        assert "first-pw-1" not in text
        assert "second-pw-2" not in text
        assert "db-pw-3" not in text
    finally:
        for secret in ("first-pw-1", "second-pw-2", "db-pw-3"):
            forget_secret(secret)
