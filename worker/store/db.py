"""PostgreSQL connections and the schema every process applies at start."""

from __future__ import annotations

import logging
import re
import select
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import zip_longest
from typing import Any

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from worker import APP_ID
from worker.redact import redact_text
from worker.settings import Settings
from worker.store import api_budget, capacity, history, jobs, outbox, presence

log = logging.getLogger(__name__)

Pool = ConnectionPool

# Any constant shared by every batch-worker process: the schema is applied under this
# advisory lock so that a fleet starting at once does not race on CREATE ... IF NOT EXISTS
# (which is not safe against concurrent creators in PostgreSQL).
_SCHEMA_LOCK_KEY = 0x6277_5F73_6368_656D  # "bw_schem"


# How long a worker starting waits for a server that does not answer (yet): in a cluster
# started at once, PostgreSQL may come up after the workers.
OPEN_TIMEOUT = 30.0
_PROBE_TIMEOUT = 10


class DatabaseUnusable(Exception):
    """The job-state database cannot be used; the text names the server, never a password.

    ``configuration``: the server answered and refused (no such database, a login it does
    not take): waiting will not help, the URL or the server's setup must change.
    """

    def __init__(self, text: str, *, configuration: bool) -> None:
        super().__init__(text)
        self.configuration = configuration


def _libpq_defaults() -> dict[str, str]:
    """What libpq fills in for what a URL leaves out (PGHOST, PGPORT, PGUSER, ... included)."""
    return {
        option.keyword.decode(): (option.val or option.compiled or b"").decode()
        for option in pq.Conninfo.get_defaults()
    }


def database_target(url: str) -> str:
    """``host:port/dbname`` as libpq reads the URL (``h1:5432,h2:5432/db`` for several hosts);
    no user, no password."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(BATCH_WORKER_DATABASE_URL cannot be parsed)"
    defaults = _libpq_defaults()
    hosts = str(params.get("host") or defaults.get("host") or "").split(",")
    ports = str(params.get("port") or "").split(",")
    if len(ports) == 1:
        ports *= len(hosts)  # libpq: one port for every host
    places = []
    for host, port in zip_longest(hosts, ports, fillvalue=""):
        shown = host or "local socket"
        if ":" in shown:
            shown = f"[{shown}]"  # an IPv6 address
        places.append(f"{shown}:{port or defaults.get('port') or 5432}")
    # libpq's default database is the user's name.
    dbname = params.get("dbname") or params.get("user") or defaults.get("user") or ""
    return f"{','.join(places)}/{dbname}"


def _database_user(url: str) -> str:
    try:
        return str(conninfo_to_dict(url).get("user") or _libpq_defaults().get("user") or "")
    except psycopg.ProgrammingError:
        return ""


# What the server says when it refuses a connection at start-up. libpq gives no SQLSTATE
# for a failed connection, only the text; servers speak English unless lc_messages says
# otherwise, and an unrecognised refusal is still shown as the server said it.
_NO_DATABASE = re.compile(r'database "[^"]*" does not exist')
_LOGIN_REFUSED = re.compile(
    r'authentication failed|no password supplied|role "[^"]*" does not exist'
    r"|no pg_hba\.conf entry|pg_hba\.conf rejects"
)
_SERVER_SAID = re.compile(r"FATAL:\s+([^\n]*)")


def connect_problem(url: str, exc: psycopg.Error) -> DatabaseUnusable:
    """What a failed connection attempt means, in one line naming ``host:port/dbname``:
    a server that cannot be reached, a missing database, a refused login."""
    target = database_target(url)
    text = redact_text(str(exc))
    if _NO_DATABASE.search(text):
        return DatabaseUnusable(
            f"PostgreSQL at {target}: the database does not exist", configuration=True
        )
    if _LOGIN_REFUSED.search(text):
        user = _database_user(url)
        return DatabaseUnusable(
            f"PostgreSQL at {target}: authentication failed for user {user!r}",
            configuration=True,
        )
    said = _SERVER_SAID.search(text)
    if said:
        # The server answered and turned us away for another reason (starting up, too
        # many connections): it may pass.
        return DatabaseUnusable(
            f"PostgreSQL at {target} refused the connection: {said.group(1).strip()}",
            configuration=False,
        )
    # libpq: 'connection to server at "h", port 1 failed: Connection refused', a line a host.
    reasons = dict.fromkeys(
        line.rsplit("failed: ", 1)[1].strip() for line in text.splitlines() if "failed: " in line
    )
    reason = "; ".join(reasons) or (text.splitlines() or [type(exc).__name__])[0]
    return DatabaseUnusable(f"cannot reach PostgreSQL at {target}: {reason}", configuration=False)


def probe(url: str, *, timeout: int = _PROBE_TIMEOUT) -> DatabaseUnusable | None:
    """Connect once: None when that works, else what stands in the way."""
    try:
        psycopg.connect(url, connect_timeout=timeout).close()
    except psycopg.Error as exc:
        return connect_problem(url, exc)
    return None


def open_pool(
    settings_or_url: Settings | str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    timeout: float = OPEN_TIMEOUT,
) -> ConnectionPool:
    """Open a connection pool and wait until its first connection works.

    Raises DatabaseUnusable at once when the server refuses (no such database, a refused
    login), or after ``timeout`` when it cannot be reached.
    """
    if isinstance(settings_or_url, Settings):
        url = settings_or_url.database_url.get_secret_value()
    else:
        url = settings_or_url
    problem = probe(url)
    if problem is not None:
        if problem.configuration:
            raise problem
        log.warning("%s; waiting up to %.0f s", problem, timeout)
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
    try:
        pool.open(wait=True, timeout=timeout)
    except PoolTimeout:
        pool.close()
        # The pool's own message says only that it timed out: ask the server once more.
        raise probe(url) or DatabaseUnusable(
            f"cannot reach PostgreSQL at {database_target(url)}: no connection within"
            f" {timeout:g} s",
            configuration=False,
        ) from None
    return pool


# libpq grows a connection's buffers to the largest message it sent or read and keeps them
# for the connection's life: one 5 MiB dead letter through it is 5 MiB held for good
# (docs/performance.md, "Large requests: memory"). A connection that carried one is closed
# at the end of its use, and the pool opens a fresh one.
LARGE_MESSAGE_BYTES = 1024 * 1024
_discarded: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()


class _QuietDiscard(logging.Filter):
    """The pool warns of every closed connection handed back; not of ours, closed on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (args and any(arg is conn for conn in _discarded for arg in args))


logging.getLogger("psycopg.pool").addFilter(_QuietDiscard())


def discard(conn: psycopg.Connection[Any]) -> None:
    """Close ``conn`` (after its transaction) so the pool replaces it, without a warning."""
    _discarded.add(conn)
    conn.close()


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


@contextmanager
def autocommit(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """A pooled connection in autocommit for one statement that is a transaction of its
    own: no BEGIN and COMMIT around it, one round trip instead of three."""
    conn.autocommit = True
    try:
        yield conn
    finally:
        if not conn.closed:
            conn.autocommit = False


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
    """Create the job and outbox tables if missing, or bring them up to this version; safe
    to run from many processes."""
    with pool.connection() as conn:
        apply_schema(conn)


def apply_schema(conn: psycopg.Connection[object]) -> None:
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK_KEY,))
        conn.execute(jobs.SCHEMA)
        jobs.upgrade(conn)
        conn.execute(capacity.SCHEMA)
        conn.execute(outbox.SCHEMA)
        outbox.upgrade(conn)
        conn.execute(presence.SCHEMA)
        conn.execute(api_budget.SCHEMA)
        conn.execute(history.SCHEMA)
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
