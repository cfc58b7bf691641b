"""The fleet's API budget, shared through PostgreSQL by separate processes: together they
stay within it in every window (the burst aside), and one alone may use all of it."""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

from worker.api.budget import Priority
from worker.daemon.fleet_budget import BURST_SECONDS, FleetBudget
from worker.store import db

PER_MINUTE = 1200  # 20 a second: the property scales with the rate, the test's time does not
RATE = PER_MINUTE / 60
BURST = int(RATE * BURST_SECONDS)
RUN = 8.0  # seconds each process takes tokens as fast as it can


def _take_all(database_url: str, ready: Any, go: Any, out: Any) -> None:
    """One process: a pool and the fleet's budget, tokens taken for RUN seconds."""
    pool = db.open_pool(database_url, min_size=1, max_size=2)
    budget = FleetBudget(PER_MINUTE, pool, "fleet-a")
    ready.put(True)
    go.wait(120)
    stamps: list[float] = []
    end = time.time() + RUN
    while time.time() < end:
        budget.acquire(Priority.HIGH if len(stamps) % 4 else Priority.LOW)
        stamps.append(time.time())
    pool.close()
    out.put(stamps)


def run_processes(database_url: str, count: int) -> list[float]:
    ctx = multiprocessing.get_context("spawn")
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_take_all, args=(database_url, ready, go, out)) for _ in range(count)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=120)  # all started (spawn imports take a while) before it begins
    go.set()
    stamps = sorted(s for _ in procs for s in out.get(timeout=120))
    for proc in procs:
        proc.join(30)
    return stamps


def most_in_any_window(stamps: list[float], width: float) -> int:
    most, first = 0, 0
    for last, stamp in enumerate(stamps):
        while stamp - stamps[first] > width:
            first += 1
        most = max(most, last - first + 1)
    return most


def test_three_processes_together_stay_within_the_fleets_budget(
    pool: Any, database_url: str
) -> None:
    stamps = run_processes(database_url, 3)
    for width in (1.0, 2.0, 4.0, RUN):
        allowed = BURST + RATE * width + 1
        assert most_in_any_window(stamps, width) <= allowed, width
    # Nothing was starved either: the three together used the fleet's budget.
    assert len(stamps) > RATE * RUN / 2


def test_one_process_alone_may_use_all_of_it(pool: Any, database_url: str) -> None:
    stamps = run_processes(database_url, 1)
    assert most_in_any_window(stamps, RUN) <= BURST + RATE * RUN + 1
    # More than a third of the fleet's budget, which a split by replicas would have allowed.
    assert len(stamps) > (BURST + RATE * RUN) / 2
