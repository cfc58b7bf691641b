"""What intake pays each batch to know the fleet's active jobs (``MAX_IN_FLIGHT``).

Side by side on one scratch database, at growing numbers of active jobs: the maintained
count (``capacity.count_active``: the sum of the fleet's rows in ``bw_active_deltas``, kept
by triggers) against counting the active rows themselves (what intake did before). The
rows are freshly inserted, as in a burst: autovacuum has not been by, so counting them
visits each one.

    PYTHONPATH=. python bench/bench_active_count.py [--sizes 1000 10000 50000]

Needs PostgreSQL at BATCH_WORKER_TEST_DATABASE_URL (a scratch database is created and
dropped). No pass/fail: it prints figures (docs/performance.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

import psycopg

from worker import lifecycle
from worker.store import capacity, db, jobs

PG_URL = os.environ.get(
    "BATCH_WORKER_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
FLEET = "bench"
ROW_COUNT = "SELECT count(*) FROM bw_jobs WHERE fleet_id = %s AND ended_at IS NULL"
NOW = datetime.now(UTC)


def timed(conn: psycopg.Connection[object], query: str, repeat: int) -> float:
    """Median milliseconds of ``query`` (one round trip each, as intake pays it)."""
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        conn.execute(query, (FLEET,)).fetchone()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * 1000


def add_jobs(pool: db.Pool, start: int, stop: int) -> None:
    state = lifecycle.new_job(
        job_id="x",
        fleet_id=FLEET,
        request={"description": "bench"},
        adopt_id=None,
        request_hash="h",
        auto_start=True,
        deadline=None,
        max_cost_pu=None,
        echo=lifecycle.Echo(),
        now=NOW,
    )
    with pool.connection() as conn:
        for first in range(start, stop, 200):
            rows = [
                jobs.job_row(state.model_copy(update={"job_id": f"j{n:07d}"}))
                for n in range(first, min(first + 200, stop))
            ]
            jobs.insert_jobs(conn, rows, next_run_at=NOW)
            conn.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 50_000])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()
    database = f"bw_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    try:
        pool = db.open_pool(urlunsplit(urlsplit(PG_URL)._replace(path=f"/{database}")))
        try:
            db.ensure_schema(pool)
            print(f"{'active jobs':>12} {'maintained':>11} {'rows counted':>13} {'ratio':>6}")
            have = 0
            for size in sorted(args.sizes):
                add_jobs(pool, have, size)
                have = size
                with pool.connection() as conn:
                    conn.autocommit = True
                    kept = timed(conn, capacity.COUNT_ACTIVE, args.repeat)
                    rows = timed(conn, ROW_COUNT, args.repeat)
                    conn.autocommit = False
                print(f"{size:>12,} {kept:>9.2f} ms {rows:>10.2f} ms {rows / kept:>6.0f}x")
        finally:
            pool.close()
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


if __name__ == "__main__":
    main()
