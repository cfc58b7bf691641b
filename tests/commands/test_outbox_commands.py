"""``python -m worker outbox parked | replay ID | drop ID`` against real PostgreSQL (named apart
from tests/store/test_outbox.py: two test_outbox.py in rootdir-less folders cannot be
imported side by side)."""

from __future__ import annotations

import json

import psycopg
import pytest

from tests.cli_support import clean_env, run_cli
from worker.store import db, outbox
from worker.wire.outgoing import OutboxMessage

pytestmark = pytest.mark.integration


def _parked_rows(database_url: str) -> tuple[int, int]:
    """Two rows parked the way the relay parks them, the second with a reason."""
    messages = [
        OutboxMessage("ev", "job.done", b"{}", {"message_id": f"m{n}", "type": "t"}, {})
        for n in range(2)
    ]
    with psycopg.connect(database_url) as conn:
        db.apply_schema(conn)
        with conn.transaction():
            outbox.enqueue(conn, messages)
            first, second = (row_id for row_id, _ in outbox.claim(conn, 10))
            reason = "closed by the broker: (406, 'PRECONDITION_FAILED - user_id property')"
            for row_id in (first, second):
                assert outbox.record_refusal(conn, row_id, reason, 1)
    return first, second


def test_outbox_commands_list_replay_and_drop_parked_rows(database_url: str) -> None:
    first, second = _parked_rows(database_url)
    env = clean_env(database_url=database_url)

    listed = run_cli("outbox", "parked", env=env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [int(line.split("\t")[0]) for line in lines] == [first, second]
    assert "routing_key='job.done'" in lines[0] and "PRECONDITION_FAILED" in lines[0]

    as_json = json.loads(run_cli("outbox", "parked", "--json", env=env).stdout)
    assert [(r["id"], r["attempts"], r["message_id"]) for r in as_json] == [
        (first, 1, "m0"),
        (second, 1, "m1"),
    ]

    assert run_cli("outbox", "replay", str(first), env=env).returncode == 0
    assert run_cli("outbox", "drop", str(second), env=env).returncode == 0
    again = run_cli("outbox", "drop", str(first), env=env)  # in line now: not for dropping
    assert again.returncode == 1 and f"no parked outbox row {first}" in again.stderr
    assert run_cli("outbox", "parked", env=env).stdout.strip() == "no parked outbox rows"
    with psycopg.connect(database_url) as conn:
        assert outbox.pending_count(conn) == 1
        assert outbox.parked_count(conn) == 0
        (row,) = outbox.claim(conn, 10)
    assert row[0] == first and row[1].properties["message_id"] == "m0"


def test_outbox_commands_on_a_database_no_worker_used(database_url: str) -> None:
    result = run_cli("outbox", "parked", env=clean_env(database_url=database_url))
    assert result.returncode == 1
    assert "no outbox in this database" in result.stderr
