"""PostgreSQL connections and the schema every process applies at start."""

from __future__ import annotations

import logging
import select
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from worker import APP_ID
from worker.settings import Settings
from worker.store import capacity, outbox
from worker.store import jobs as store

log = logging.getLogger(__name__)

Pool = ConnectionPool

# Any constant shared by every batch-worker process: the schema is applied under this
# advisory lock so that a fleet starting at once does not race on CREATE ... IF NOT EXISTS
# (which is not safe against concurrent creators in PostgreSQL).
_SCHEMA_LOCK_KEY = 0x6277_5F73_6368_656D  # "bw_schem"


def open_pool(
    settings_or_url: Settings | str, *, min_size: int = 1, max_size: int = 10
) -> ConnectionPool:
    """Open a connection pool and wait until its first connection works."""
    if isinstance(settings_or_url, Settings):
        url = settings_or_url.database_url.get_secret_value()
    else:
        url = settings_or_url
    pool = ConnectionPool(
        url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        name=APP_ID,
        # Autocommit off: each `with pool.connection()` block is one transaction.
        kwargs={"autocommit": False},
        configure=_configure,
    )
    pool.open(wait=True, timeout=30)
    return pool


def _configure(conn: psycopg.Connection[Any]) -> None:
    """Plan every prepared statement for the values it is run with.

    psycopg prepares a statement on the server after a few executions, and PostgreSQL
    then settles on one generic plan for it. Chosen while the job table was small (a fresh
    fleet, the start of a burst), that plan is a sequential scan, and it stays one as the
    table grows: intake's lookup of a batch's job ids (``job_id = ANY(...)``) went from
    0.1 ms to 10 ms a batch over 10,000 jobs (docs/performance.md, "Intake"). Planning
    afresh costs a fraction of a millisecond per statement, and every hot statement here
    works on a whole batch.
    """
    conn.execute("SET plan_cache_mode = force_custom_plan")
    conn.commit()


def send_all(conn: psycopg.Connection[Any], timeout: float = 30.0) -> None:
    """Hand everything queued on a connection in pipeline mode to the socket.

    psycopg sends what the socket takes at once and leaves the rest of a large statement
    (a batch's rows are hundreds of kilobytes) in libpq's buffer until it next waits for
    a result; the server cannot start on a statement it has not received.
    """
    pgconn = conn.pgconn
    while pgconn.flush() == 1:
        if not select.select([], [pgconn.socket], [], timeout)[1]:
            raise psycopg.OperationalError("timed out sending to the database")


def ensure_schema(pool: ConnectionPool) -> None:
    """Create the job and outbox tables if missing; safe to run from many processes."""
    with pool.connection() as conn:
        apply_schema(conn)


def apply_schema(conn: psycopg.Connection[object]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        conn.execute(store.SCHEMA)
        conn.execute(capacity.SCHEMA)
        conn.execute(outbox.SCHEMA)
        capacity.install(conn)
        _compress_with_lz4(conn)
    log.debug("database schema in place")


def _compress_with_lz4(conn: psycopg.Connection[Any]) -> None:
    """Compress job state with lz4 where the server has it (PostgreSQL 14+ built with it).

    A job's state (its create payload with the evalscript) is about 2.6 KB, past the
    2 KB at which PostgreSQL compresses a row; pglz, the default, made the intake insert
    and every step's save a quarter slower than lz4 does for the same size
    (docs/performance.md). Checked first: the ALTER locks the table, and a fleet starts
    often. Values already written stay as they are; new writes use lz4.
    """
    pending = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = 'bw_jobs'::regclass"
        " AND attname IN ('state', 'last_status_event') AND attcompression <> 'l'"
    ).fetchall()
    if not pending:
        return
    try:
        with conn.transaction():  # a savepoint: a server without lz4 keeps pglz
            conn.execute(
                "ALTER TABLE bw_jobs "
                + ", ".join(f"ALTER COLUMN {name} SET COMPRESSION lz4" for (name,) in pending)
            )
    except (psycopg.errors.FeatureNotSupported, psycopg.errors.SyntaxError) as exc:
        log.info("job state stays compressed with pglz: %s", exc)
