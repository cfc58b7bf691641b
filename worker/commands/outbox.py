"""``batch-worker outbox parked | replay ID | drop ID``: the outbox rows the relay parked.

A row is parked once the broker has refused it ``OUTBOX_MAX_ATTEMPTS`` times (it closed the
channel on it, or nacked it): it stays in PostgreSQL, unpublished, so that the rows behind
it go on (worker/daemon/relay.py). Replay puts it back in line (after the cause is fixed:
a missing queue declared, a permission granted); drop deletes it for good.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import psycopg

from worker.settings import Settings
from worker.store import db, outbox


def _with_db(settings: Settings, work: Callable[[psycopg.Connection[Any]], int]) -> int:
    url = settings.database_url.get_secret_value()
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            return work(conn)
    except psycopg.errors.UndefinedTable:
        print("no outbox in this database: no worker has started on it", file=sys.stderr)
        return 1
    except psycopg.OperationalError as exc:
        print(f"{db.connect_problem(url, exc)} (BATCH_WORKER_DATABASE_URL)", file=sys.stderr)
        return 1


def list_parked(settings: Settings, *, limit: int = 1000, as_json: bool = False) -> int:
    """One line per parked row (id, when, where to, attempts, the broker's reason)."""

    def work(conn: psycopg.Connection[Any]) -> int:
        rows = outbox.parked(conn, limit)
        if as_json:
            print(
                json.dumps(
                    [
                        {
                            "id": row.id,
                            "exchange": row.exchange,
                            "routing_key": row.routing_key,
                            "type": row.type,
                            "message_id": row.message_id,
                            "attempts": row.attempts,
                            "last_error": row.last_error,
                            "enqueued_at": row.enqueued_at.isoformat(),
                            "parked_at": row.parked_at.isoformat(),
                        }
                        for row in rows
                    ],
                    indent=2,
                )
            )
            return 0
        if not rows:
            print("no parked outbox rows")
            return 0
        for row in rows:
            print(
                f"{row.id}\t{row.parked_at.isoformat()}\texchange={row.exchange!r}"
                f" routing_key={row.routing_key!r} type={row.type or '-'}"
                f" message_id={row.message_id or '-'} attempts={row.attempts}"
                f"\t{row.last_error or ''}"
            )
        return 0

    return _with_db(settings, work)


def replay(settings: Settings, row_id: int) -> int:
    """Put parked row ``row_id`` back in line for the relay (its attempts start over)."""

    def work(conn: psycopg.Connection[Any]) -> int:
        if not outbox.replay(conn, row_id):
            print(f"no parked outbox row {row_id}", file=sys.stderr)
            return 1
        print(f"outbox row {row_id} is back in line")
        return 0

    return _with_db(settings, work)


def drop(settings: Settings, row_id: int) -> int:
    """Delete parked row ``row_id`` for good (its message is never published)."""

    def work(conn: psycopg.Connection[Any]) -> int:
        if not outbox.drop(conn, row_id):
            print(f"no parked outbox row {row_id}", file=sys.stderr)
            return 1
        print(f"outbox row {row_id} dropped")
        return 0

    return _with_db(settings, work)
