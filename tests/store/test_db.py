"""Pool and schema against a real PostgreSQL."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import pytest
from psycopg_pool import ConnectionPool

from worker.store import db


def test_schema_is_idempotent_and_safe_to_apply_concurrently(database_url: str) -> None:
    import threading

    pools = [db.open_pool(database_url, max_size=1) for _ in range(4)]
    errors: list[BaseException] = []

    def apply(p: ConnectionPool) -> None:
        try:
            db.ensure_schema(p)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=apply, args=(p,)) for p in pools]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    db.ensure_schema(pools[0])
    for p in pools:
        p.close()
    assert errors == []


def test_pool_from_settings_opens_and_reads_the_schema(database_url: str) -> None:
    from worker.settings import Settings

    pool = db.open_pool(Settings(database_url=database_url), max_size=1)
    try:
        db.ensure_schema(pool)
        with pool.connection() as conn:
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
                ).fetchall()
            }
    finally:
        pool.close()
    assert {"bw_jobs", "bw_outbox"} <= tables


def test_statements_run_often_keep_being_planned_for_their_values(database_url: str) -> None:
    """A plan cached while the table was empty must not be reused once it has grown.

    psycopg prepares a statement after a few runs and PostgreSQL may then switch to one
    generic plan for good (a sequential scan, chosen on an empty table). The pool's
    connections plan each run for its values: no generic plan is ever used.
    """
    from worker.store import jobs

    pool = db.open_pool(database_url, max_size=1)
    try:
        db.ensure_schema(pool)
        with pool.connection() as conn:
            for n in range(12):
                jobs.start_intake_lookup(conn, "fleet", [f"job-{n}", f"job-{n + 1}"])()
            plans = conn.execute(
                "SELECT sum(generic_plans), sum(custom_plans) FROM pg_prepared_statements"
                " WHERE statement LIKE '%%ids.job_id%%'"
            ).fetchone()
    finally:
        pool.close()
    assert plans is not None
    generic, custom = plans
    assert custom >= 1  # the statement was prepared: the check below is not vacuous
    assert generic == 0


def test_job_state_is_compressed_with_lz4_where_the_server_has_it(database_url: str) -> None:
    pool = db.open_pool(database_url, max_size=1)
    try:
        db.ensure_schema(pool)
        db.ensure_schema(pool)  # already lz4: left alone
        with pool.connection() as conn:
            methods = dict(
                conn.execute(
                    "SELECT attname, attcompression FROM pg_attribute"
                    " WHERE attrelid = 'bw_jobs'::regclass"
                    " AND attname IN ('state', 'last_status_event')"
                ).fetchall()
            )
    finally:
        pool.close()
    # This machine's PostgreSQL (Debian's 15) is built with lz4.
    assert methods == {"state": "l", "last_status_event": "l"}


PASSWORD = "pw-Zq81x-never-shown"


@pytest.mark.parametrize(
    ("url", "target"),
    [
        (f"postgresql://worker:{PASSWORD}@db.example:5433/jobs", "db.example:5433/jobs"),
        ("postgresql://worker@db.example/jobs", "db.example:5432/jobs"),
        # libpq: the database defaults to the user's name, one port serves every host
        ("postgresql://worker@db.example", "db.example:5432/worker"),
        ("postgresql://u@h1,h2:5433/jobs", "h1:5432,h2:5433/jobs"),
        ("postgresql://u@h1,h2:6000/jobs?sslmode=require", "h1:5432,h2:6000/jobs"),
        ("postgresql://u@[::1]:5433/jobs", "[::1]:5433/jobs"),
    ],
)
def test_the_target_is_host_port_and_database_never_the_password(url: str, target: str) -> None:
    assert db.database_target(url) == target


def test_a_server_that_cannot_be_reached_is_named_after_the_wait() -> None:
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/jobs"  # nothing listens on port 1

    with pytest.raises(db.DatabaseUnusable) as caught:
        db.open_pool(url, timeout=1)

    assert str(caught.value) == "cannot reach PostgreSQL at 127.0.0.1:1/jobs: Connection refused"
    assert not caught.value.configuration  # it may come up: worth a wait, not a config error


def test_a_database_that_does_not_exist_is_told_apart_at_once(pg_server_url: str) -> None:
    parts = urlsplit(pg_server_url)
    url = urlunsplit(parts._replace(path="/bw_missing_db"))

    with pytest.raises(db.DatabaseUnusable) as caught:
        db.open_pool(url, timeout=60)  # raised before any wait

    where = f"{parts.hostname}:{parts.port or 5432}/bw_missing_db"
    assert str(caught.value) == f"PostgreSQL at {where}: the database does not exist"
    assert caught.value.configuration


def test_a_refused_login_is_told_apart_and_names_the_user(pg_server_url: str) -> None:
    parts = urlsplit(pg_server_url)
    netloc = f"bw_no_such_role:{PASSWORD}@{parts.hostname}:{parts.port or 5432}"
    url = urlunsplit(parts._replace(netloc=netloc))

    problem = db.probe(url)

    assert problem is not None and problem.configuration
    assert str(problem) == (
        f"PostgreSQL at {db.database_target(url)}: authentication failed for user 'bw_no_such_role'"
    )
    assert PASSWORD not in str(problem)


def test_a_usable_database_is_no_problem(database_url: str) -> None:
    assert db.probe(database_url) is None
