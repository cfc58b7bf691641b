"""Each worker process's liveness mark, and what the fleet does with a dead owner's leases.

A lease alone hands a dead worker's jobs on only when it runs out. So every process also
holds a mark that dies with it: a session advisory lock on a connection of its own
(``lock``), which PostgreSQL drops the moment the process's connection closes (a SIGKILL,
an OOM kill; a node gone, once TCP keepalives give up on it), and a row in ``bw_workers``
that names it and is touched every round (``seen_at``). Any worker then treats the leases of
a registered worker whose mark is gone as run out (``expire_dead``), and claims those jobs
at its next round.

Behind PgBouncer in transaction mode a session lock stays on whichever server connection
took it, alive after the worker: there ``heartbeat`` judges by ``seen_at`` alone. Neither
ever hands on the jobs of a live worker that merely looks dead for good: every claim bumps
the job's generation, and the old owner's next save is refused (worker/store/leases.py).

Only registered owners are judged: a worker of an older version holds no mark and keeps
its leases until they run out, as before. Every function runs in the caller's transaction
(the mark's connection is in autocommit) and takes its times as arguments.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

from worker.store.jobs import Conn

Mode = Literal["lock", "heartbeat"]

# A dead worker's jobs were mid-step: claimers (oldest next_run_at first) take them ahead of
# a backlog of due jobs, however long it is.
FIRST_IN_LINE = datetime(1970, 1, 1, tzinfo=UTC)

# The advisory locks' first key: this namespace of marks (the second is the worker's hash).
_MARK_SPACE = 0x6277_6D6B  # "bwmk"

SCHEMA = """
CREATE TABLE IF NOT EXISTS bw_workers (
    fleet_id   text        NOT NULL,
    worker     text        NOT NULL,
    started_at timestamptz NOT NULL,
    seen_at    timestamptz NOT NULL,
    PRIMARY KEY (fleet_id, worker)
);
CREATE INDEX IF NOT EXISTS bw_jobs_leased
    ON bw_jobs (fleet_id, lease_owner) WHERE lease_owner IS NOT NULL;
"""

# The second key: the worker's name hashed in SQL, so a claimer finds it from the row alone.
_KEY = "hashtext({fleet} || '/' || {worker})"
# pg_locks shows the key as an unsigned oid.
_LOCKED_KEY = f"(({_KEY})::bigint & 4294967295)::oid"


def take_mark(conn: Conn, fleet_id: str, worker: str, *, now: datetime) -> bool:
    """Take this process's mark and register it; False when another live session holds the
    name's mark (two processes given one WORKER_NAME)."""
    key = _KEY.format(fleet="%(fleet)s", worker="%(worker)s")
    row = conn.execute(
        f"SELECT pg_try_advisory_lock({_MARK_SPACE}, {key})",
        {"fleet": fleet_id, "worker": worker},
    ).fetchone()
    if row is None or not row[0]:
        return False
    beat(conn, fleet_id, worker, now=now)
    return True


def beat(conn: Conn, fleet_id: str, worker: str, *, now: datetime) -> None:
    """Register (again, should a reaper have judged us dead meanwhile) and mark us seen."""
    conn.execute(
        """
        INSERT INTO bw_workers (fleet_id, worker, started_at, seen_at)
        VALUES (%(fleet)s, %(worker)s, %(now)s, %(now)s)
        ON CONFLICT (fleet_id, worker) DO UPDATE SET seen_at = EXCLUDED.seen_at
        """,
        {"fleet": fleet_id, "worker": worker, "now": now},
    )


def forget(conn: Conn, fleet_id: str, worker: str) -> None:
    """A clean exit: no longer registered (its leases were handed back)."""
    conn.execute("DELETE FROM bw_workers WHERE fleet_id = %s AND worker = %s", (fleet_id, worker))


def _dead_workers(mode: Mode) -> str:
    if mode == "heartbeat":
        return "SELECT worker FROM bw_workers WHERE fleet_id = %(fleet)s AND seen_at < %(stale)s"
    key = _LOCKED_KEY.format(fleet="w.fleet_id", worker="w.worker")
    return f"""
        SELECT w.worker FROM bw_workers w
        WHERE w.fleet_id = %(fleet)s AND w.worker <> %(me)s AND {key} NOT IN (
            SELECT objid FROM pg_locks
            WHERE locktype = 'advisory' AND granted AND classid = {_MARK_SPACE}::oid
              AND objsubid = 2
              AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
        )
    """


def expire_dead(
    conn: Conn,
    fleet_id: str,
    me: str,
    *,
    now: datetime,
    mode: Mode = "lock",
    stale_after: timedelta = timedelta(seconds=5),
) -> list[tuple[str, str]]:
    """Run out the leases of every registered worker whose mark is gone, and unregister
    it; the (job_id, owner) pairs now free, due first in every claimer's order.

    ``lock``: the worker's advisory lock is held by no session. ``heartbeat``: its
    ``seen_at`` is older than ``stale_after``.
    """
    params = {"fleet": fleet_id, "me": me, "now": now, "stale": now - stale_after}
    dead = [row[0] for row in conn.execute(_dead_workers(mode), params).fetchall()]
    dead = [worker for worker in dead if worker != me]
    if not dead:
        return []
    freed = conn.execute(
        """
        UPDATE bw_jobs
        SET lease_until = %(gone)s, next_run_at = %(first)s
        WHERE fleet_id = %(fleet)s AND lease_owner = ANY(%(dead)s) AND lease_until >= %(now)s
        RETURNING job_id, lease_owner
        """,
        {
            "fleet": fleet_id,
            "dead": dead,
            "now": now,
            "gone": now - timedelta(milliseconds=1),
            "first": FIRST_IN_LINE,
        },
    ).fetchall()
    conn.execute(
        "DELETE FROM bw_workers WHERE fleet_id = %s AND worker = ANY(%s)", (fleet_id, dead)
    )
    return [(row[0], row[1]) for row in freed]


def renew(
    conn: Conn, fleet_id: str, worker: str, *, now: datetime, lease: timedelta
) -> list[tuple[str, int]]:
    """Extend every lease this worker holds; the (job_id, generation) pairs extended.

    A lease another worker took over is no longer this worker's (``lease_owner``), so a
    worker back from a freeze extends nothing of what it lost."""
    rows = conn.execute(
        """
        UPDATE bw_jobs SET lease_until = %(until)s, next_run_at = %(until)s
        WHERE fleet_id = %(fleet)s AND lease_owner = %(worker)s AND lease_until >= %(now)s
        RETURNING job_id, generation
        """,
        {"fleet": fleet_id, "worker": worker, "now": now, "until": now + lease},
    ).fetchall()
    return [(row[0], row[1]) for row in rows]


def run_out_own(conn: Conn, fleet_id: str, worker: str, *, now: datetime) -> Sequence[str]:
    """At start: the leases an earlier process of this name left (a pod's container
    restarted under the pod's name) run out now, for this or any worker to take."""
    rows = conn.execute(
        """
        UPDATE bw_jobs SET lease_until = %(gone)s, next_run_at = %(first)s
        WHERE fleet_id = %(fleet)s AND lease_owner = %(worker)s AND lease_until >= %(now)s
        RETURNING job_id
        """,
        {
            "fleet": fleet_id,
            "worker": worker,
            "now": now,
            "gone": now - timedelta(milliseconds=1),
            "first": FIRST_IN_LINE,
        },
    ).fetchall()
    return [row[0] for row in rows]
