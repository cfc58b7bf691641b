"""The fleet's active count (``MAX_IN_FLIGHT``) kept by triggers, against a real PostgreSQL."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import ConnectionPool

from tests.store.store_support import FLEET, T0, insert, insert_job, job
from worker.store import capacity, db, jobs

FLEETS = ("f1", "f2")


def counted(pool: ConnectionPool) -> dict[str, int]:
    """Per fleet: (the maintained count, the rows counted one by one) must agree."""
    with pool.connection() as conn:
        out = {}
        for fleet in FLEETS:
            row = conn.execute(
                "SELECT count(*) FROM bw_jobs WHERE fleet_id = %s AND ended_at IS NULL", (fleet,)
            ).fetchone()
            assert row is not None
            assert capacity.count_active(conn, fleet) == row[0], fleet
            out[fleet] = row[0]
        return out


operations = st.lists(
    st.tuples(
        st.sampled_from(["insert", "insert_one", "end", "reopen", "delete", "compact"]),
        st.sampled_from(FLEETS),
        st.sets(st.integers(0, 7), min_size=1, max_size=4),
    ),
    max_size=12,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(operations)
def test_the_active_count_agrees_with_counting_the_rows_after_any_changes(
    pool: ConnectionPool, monkeypatch: pytest.MonkeyPatch, ops: list[tuple[str, str, set[int]]]
) -> None:
    monkeypatch.setattr(capacity, "COMPACT_BEYOND", 1)
    with pool.connection() as conn:
        conn.execute("TRUNCATE bw_jobs")  # a fresh start for each example (and its trigger)
    for op, fleet, numbers in ops:
        ids = [f"j{n}" for n in sorted(numbers)]
        with pool.connection() as conn:
            if op == "insert":  # intake's batch statement; ids that exist are left out
                jobs.insert_jobs(
                    conn, [jobs.job_row(job(i, fleet_id=fleet)) for i in ids], next_run_at=T0
                )
            elif op == "insert_one":
                insert_job(conn, job(ids[0], fleet_id=fleet), next_run_at=T0)
            elif op in ("end", "reopen"):  # as a save writes it: every column, ended_at too
                conn.execute(
                    "UPDATE bw_jobs SET ended_at = %s, phase = phase"
                    " WHERE fleet_id = %s AND job_id = ANY(%s)",
                    (T0 if op == "end" else None, fleet, ids),
                )
            elif op == "delete":
                conn.execute(
                    "DELETE FROM bw_jobs WHERE fleet_id = %s AND job_id = ANY(%s)", (fleet, ids)
                )
            else:
                conn.commit()
                capacity.compact(conn, fleet)
        counted(pool)


def test_a_fleet_that_had_jobs_before_the_count_was_kept_is_counted_from_its_rows(
    pool: ConnectionPool,
) -> None:
    with pool.connection() as conn:
        jobs.insert_jobs(conn, [jobs.job_row(job(f"j{n}")) for n in range(5)], next_run_at=T0)
        conn.execute("UPDATE bw_jobs SET ended_at = %s WHERE job_id = 'j0'", (T0,))
        # As a worker from before the count left the database: no triggers, no delta rows.
        for name in capacity.TRIGGERS:
            conn.execute(f"DROP TRIGGER {name} ON bw_jobs")
        conn.execute("DELETE FROM bw_active_deltas")
    db.ensure_schema(pool)
    assert counted(pool)[FLEET] == 4
    insert(pool, job("j9"))  # and kept from then on
    assert counted(pool)[FLEET] == 5
    db.ensure_schema(pool)  # a later start changes nothing
    assert counted(pool)[FLEET] == 5


def test_folding_the_count_leaves_alone_what_it_cannot_see_yet(pool: ConnectionPool) -> None:
    for n in range(3):
        insert(pool, job(f"j{n}"))  # three delta rows
    with pool.connection() as writer, pool.connection() as folder:
        jobs.insert_jobs(writer, [jobs.job_row(job("j7")), jobs.job_row(job("j8"))], next_run_at=T0)
        # The writer's transaction is still open: its delta row is not folded in, nor lost.
        capacity.COMPACT_BEYOND, before = 1, capacity.COMPACT_BEYOND
        try:
            assert capacity.compact(folder, FLEET)
        finally:
            capacity.COMPACT_BEYOND = before
        assert capacity.count_active(folder, FLEET) == 3
        writer.commit()
        folder.commit()
        assert capacity.count_active(folder, FLEET) == 5
        rows = folder.execute("SELECT count(*) FROM bw_active_deltas").fetchone()
        assert rows is not None and rows[0] == 2  # the fold, and the writer's row
    assert counted(pool)[FLEET] == 5


def test_the_count_is_folded_only_past_a_few_rows_and_by_one_worker_at_a_time(
    pool: ConnectionPool,
) -> None:
    for n in range(capacity.COMPACT_BEYOND):
        insert(pool, job(f"j{n}"))
    with pool.connection() as conn, pool.connection() as other:
        assert not capacity.compact(conn, FLEET)  # not yet worth it
        insert(pool, job("one-more"))
        with other.transaction():
            other.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (0x62776163, FLEET))
            assert not capacity.compact(conn, FLEET)  # another worker is at it
        assert capacity.compact(conn, FLEET)
    assert counted(pool)[FLEET] == capacity.COMPACT_BEYOND + 1
