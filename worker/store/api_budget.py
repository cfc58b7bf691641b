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


def take(conn: Conn, fleet_id: str, *, rate: float, capacity: float, keep: float = 0.0) -> Take:
    """One token, if the bucket holds one more than ``keep`` (a reserve left to others:
    creates leave one for status reads); else how long until it does.

    ``rate`` is tokens per second, ``capacity`` the burst the bucket holds at most.
    """
    conn.execute(
        """
        INSERT INTO bw_api_budget (fleet_id, tokens, stamp)
        VALUES (%s, %s, clock_timestamp()) ON CONFLICT (fleet_id) DO NOTHING
        """,
        (fleet_id, capacity),
    )
    row = conn.execute(
        """
        WITH b AS (
            SELECT LEAST(%(capacity)s, tokens + %(rate)s
                         * GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp() - stamp))) AS avail,
                   clock_timestamp() AS at
            FROM bw_api_budget WHERE fleet_id = %(fleet)s FOR UPDATE
        )
        UPDATE bw_api_budget u
        SET tokens = b.avail - CASE WHEN b.avail >= 1 + %(keep)s THEN 1 ELSE 0 END,
            stamp = b.at
        FROM b WHERE u.fleet_id = %(fleet)s
        RETURNING b.avail >= 1 + %(keep)s, b.avail
        """,
        {"fleet": fleet_id, "rate": rate, "capacity": capacity, "keep": keep},
    ).fetchone()
    assert row is not None  # inserted above
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
