"""The events' history on a real PostgreSQL: written with the outbox rows, once per event,
never for a rolled-back transaction, pruned by age."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from worker.lifecycle import Echo
from worker.store import db, history, outbox
from worker.wire import events

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def conn(database_url: str):
    with psycopg.connect(database_url, autocommit=True) as connection:
        db.apply_schema(connection)
        yield connection


def _accepted(job_id: str, *, fleet: str = "f1", reply_to: str | None = None, at=T0):
    return events.command_event(
        "accepted",
        fleet_id=fleet,
        exchange="batch.events",
        worker="w1",
        now=at,
        job_id=job_id,
        action="submit",
        echo=Echo(message_id=f"m-{job_id}-{at.timestamp()}", reply_to=reply_to),
    )


def test_events_are_kept_once_with_their_outbox_rows(conn: psycopg.Connection) -> None:
    sent = _accepted("j1", reply_to="my.replies")  # the event and its reply_to copy
    with conn.transaction():
        outbox.enqueue(conn, sent)
    # A re-publish of the same event (same id) adds nothing.
    with conn.transaction():
        outbox.enqueue(conn, sent[:1])
    kept = history.job_events(conn, "f1", "j1")
    assert len(sent) == 2
    assert [event["id"] for event in kept] == [sent[0].properties["message_id"]]
    assert kept[0]["type"] == sent[0].properties["type"]
    assert history.job_events(conn, "f1", "other") == []


def test_a_rolled_back_transaction_leaves_no_event(conn: psycopg.Connection) -> None:
    class Abort(Exception):
        pass

    with pytest.raises(Abort), conn.transaction():
        outbox.enqueue(conn, _accepted("j2"))
        raise Abort
    assert history.job_events(conn, "f1", "j2") == []
    assert outbox.pending_count(conn) == 0


def test_dead_letters_and_fleets_are_told_apart(conn: psycopg.Connection) -> None:
    from worker.wire.job_requests import RejectCode, Rejection

    letter = events.dead_letter(
        b'{"job_id": "j3"}',
        {"content_type": "application/json"},
        {},
        dlq="batch.jobs.dlq",
        rejection=Rejection(RejectCode.MALFORMED_JSON, "not JSON"),
        now=T0,
    )
    with conn.transaction():
        outbox.enqueue(conn, [letter, *_accepted("j3", fleet="f2")])
    assert history.job_events(conn, "f1", "j3") == []
    assert len(history.job_events(conn, "f2", "j3")) == 1


def test_prune_forgets_only_what_is_older(conn: psycopg.Connection) -> None:
    with conn.transaction():
        outbox.enqueue(conn, _accepted("old", at=T0 - timedelta(days=40)))
        outbox.enqueue(conn, _accepted("new", at=T0))
    with conn.transaction():
        assert history.prune(conn, before=T0 - timedelta(days=30)) == 1
    assert history.job_events(conn, "f1", "old") == []
    assert len(history.job_events(conn, "f1", "new")) == 1


def test_prune_older_goes_by_days_of_the_database_clock(conn: psycopg.Connection) -> None:
    now = datetime.now(UTC)
    with conn.transaction():
        outbox.enqueue(conn, _accepted("stale", at=now - timedelta(days=3)))
        outbox.enqueue(conn, _accepted("fresh", at=now - timedelta(hours=1)))
    with conn.transaction():
        assert history.prune_older(conn, days=2) == 1
    assert history.job_events(conn, "f1", "stale") == []
    assert len(history.job_events(conn, "f1", "fresh")) == 1


def test_the_engines_save_keeps_its_events_only_when_the_fenced_update_applied(
    pool,
) -> None:
    from tests.store.store_support import FLEET, claim, insert, job
    from worker.store import leases

    state = job("j5", status="CREATED", batch_request_id="b5", sequence=2)
    assert insert(pool, state)
    (claimed,) = claim(pool)
    sent = events.job_event(state, "status", exchange="batch.events", worker="w1", now=T0)
    with pool.connection() as conn:
        with pytest.raises(leases.LeaseLost):
            leases.save_step(
                conn, state, generation=claimed.generation + 1, owner="w1", messages=sent
            )
        conn.rollback()
        assert history.job_events(conn, FLEET, "j5") == []
        saved = leases.save_step(
            conn, state, generation=claimed.generation, owner="w1", messages=sent
        )
        conn.commit()
        assert saved is None
        kept = history.job_events(conn, FLEET, "j5")
    assert [event["id"] for event in kept] == [sent[0].properties["message_id"]]
    assert kept[0]["data"]["sequence"] == 2


def test_the_engines_save_keeps_an_event_once_as_sent_and_not_its_reply_copy(pool) -> None:
    from tests.store.store_support import FLEET, claim, insert, job
    from worker.store import leases

    state = job(
        "j6",
        status="PROCESSING",
        batch_request_id="b6",
        sequence=3,
        echo=Echo(reply_to="replies", correlation_id="c6"),
    )
    assert insert(pool, state)
    (claimed,) = claim(pool)
    sent = events.job_event(state, "progress", exchange="batch.events", worker="w1", now=T0)
    assert [m.exchange for m in sent] == ["batch.events", ""]  # the event and its reply copy
    with pool.connection() as conn:
        assert (
            leases.save_step(conn, state, generation=claimed.generation, owner="w1", messages=sent)
            is None
        )
        conn.commit()
        kept = history.job_events(conn, FLEET, "j6")
        queued = conn.execute("SELECT count(*) FROM bw_outbox").fetchone()
    assert queued == (2,)
    assert kept == [json.loads(sent[0].body)]
