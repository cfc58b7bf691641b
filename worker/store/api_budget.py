"""The fleet's API budget: one token bucket row per fleet, shared by every worker process.

``API_BUDGET_PER_MINUTE`` is the fleet's share of the account's limit (batch-v2-api.md
§10), whatever the number of replicas: each request takes a token from this row in one
atomic UPDATE (the row lock orders takers), refilled by PostgreSQL's own clock, so workers
on hosts whose clocks differ still share one bucket. Every function runs in the caller's
transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.store.jobs import Conn

SCHEMA = """
CREATE TABLE IF NOT EXISTS bw_api_budget (
    fleet_id text             PRIMARY KEY,
    tokens   double precision NOT NULL,
    stamp    timestamptz      NOT NULL
);
"""


@dataclass(frozen=True)
class Take:
    granted: bool
    wait: float  # seconds until the bucket holds what was asked for, when not granted
    fenced_out: bool = False  # the fence no longer holds: no token taken, nothing to send


@dataclass(frozen=True)
class Fence:
    """The claim a request is sent under: the job's generation and lease owner, as claimed.
    Checked in the token's own statement, the last round trip before the request goes."""

    job_id: str
    generation: int
    owner: str


_HELD = "SELECT 1 FROM bw_jobs WHERE fleet_id = %(fleet)s AND job_id = %(job)s"
_HELD += " AND generation = %(generation)s AND lease_owner = %(owner)s"
_ALWAYS = "SELECT 1"


def take(
    conn: Conn,
    fleet_id: str,
    *,
    rate: float,
    capacity: float,
    keep: float = 0.0,
    fence: Fence | None = None,
) -> Take:
    """One token, if the bucket holds one more than ``keep`` (a reserve left to others:
    creates leave one for status reads); else how long until it does.

    With a ``fence``, only while the job is still claimed under it (no other worker took it
    over since); else no token, and ``fenced_out``. One statement either way.

    ``rate`` is tokens per second, ``capacity`` the burst the bucket holds at most.
    """
    conn.execute(
        """
        INSERT INTO bw_api_budget (fleet_id, tokens, stamp)
        VALUES (%s, %s, clock_timestamp()) ON CONFLICT (fleet_id) DO NOTHING
        """,
        (fleet_id, capacity),
    )
    held = _HELD if fence is not None else _ALWAYS
    row = conn.execute(
        f"""
        WITH f AS ({held}), b AS (
            SELECT LEAST(%(capacity)s, tokens + %(rate)s
                         * GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp() - stamp))) AS avail,
                   clock_timestamp() AS at
            FROM bw_api_budget WHERE fleet_id = %(fleet)s FOR UPDATE
        )
        UPDATE bw_api_budget u
        SET tokens = b.avail - CASE
                WHEN b.avail >= 1 + %(keep)s AND EXISTS (SELECT FROM f) THEN 1 ELSE 0 END,
            stamp = b.at
        FROM b WHERE u.fleet_id = %(fleet)s
        RETURNING b.avail >= 1 + %(keep)s, b.avail, EXISTS (SELECT FROM f)
        """,
        {
            "fleet": fleet_id,
            "rate": rate,
            "capacity": capacity,
            "keep": keep,
            "job": fence.job_id if fence else None,
            "generation": fence.generation if fence else None,
            "owner": fence.owner if fence else None,
        },
    ).fetchone()
    assert row is not None  # inserted above
    if not row[2]:
        return Take(granted=False, wait=0.0, fenced_out=True)
    granted, available = bool(row[0]), float(row[1])
    return Take(granted, 0.0 if granted else (1 + keep - available) / rate)


def hold_back(conn: Conn, fleet_id: str, *, seconds: float, rate: float) -> None:
    """The API answered 429: every worker of the fleet waits ``seconds`` more."""
    conn.execute(
        """
        UPDATE bw_api_budget
        SET tokens = LEAST(tokens, 0) - %(debt)s, stamp = GREATEST(stamp, clock_timestamp())
        WHERE fleet_id = %(fleet)s
        """,
        {"fleet": fleet_id, "debt": seconds * rate},
    )
