"""JobTracker folds events as the contract tells consumers to: drop an id already seen and a
sequence at or below the last one seen (CONTRACT.md "Events")."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions
import pytest
from pydantic import SecretStr
from rich.console import Console

from tests.conftest import AmqpNames, pika_parameters
from tests.tcp_proxy import PausableProxy
from worker.broker import connection, declare_topology
from worker.commands.follow import EventFollower, JobTracker, StoredJob
from worker.commands.render import describe, show_changes, summary
from worker.settings import Settings


def _status(job_id: str, sequence: int, status: str, **data: Any) -> dict[str, Any]:
    return {
        "id": f"{job_id}-{sequence}",
        "type": "batchworker.job.status",
        "subject": job_id,
        "data": {"job_id": job_id, "sequence": sequence, "status": status, **data},
    }


def test_duplicates_and_stale_sequences_are_dropped() -> None:
    tracker = JobTracker(["a"])
    assert tracker.apply(_status("a", 1, "CREATED"))
    assert tracker.apply(_status("a", 3, "PROCESSING", completion_percentage=40.0))
    assert not tracker.apply(_status("a", 3, "PROCESSING"))  # same id again
    stale = _status("a", 2, "ANALYSIS_DONE")
    assert not tracker.apply(stale)
    view = tracker.views["a"]
    assert (view.status, view.completion, view.events, view.last_sequence) == (
        "PROCESSING",
        40.0,
        2,
        3,
    )
    assert not view.finished


def test_events_of_other_jobs_are_ignored() -> None:
    tracker = JobTracker(["a"])
    assert not tracker.apply(_status("b", 1, "DONE"))
    assert tracker.views["a"].status == "SUBMITTED"


def test_a_terminal_status_ends_the_view_with_its_details() -> None:
    tracker = JobTracker(["a"])
    tiles = {"total": 4, "processed": 3, "failed": 1}
    tracker.apply(
        _status("a", 1, "STOPPED", stopped_reason="COST_LIMIT", tiles=tiles, cost_pu=12.5)
    )
    view = tracker.views["a"]
    assert view.finished and view.stopped_reason == "COST_LIMIT"
    assert "STOPPED COST_LIMIT" in describe(view)
    assert "tiles 3/4 (1 failed)" in describe(view)


def test_resting_after_analysis_is_not_finished() -> None:
    tracker = JobTracker(["a"])
    tracker.apply(_status("a", 1, "ANALYSIS_DONE"))
    assert tracker.views["a"].resting and not tracker.views["a"].finished


def test_a_rejection_ends_the_view_and_shows_its_code() -> None:
    tracker = JobTracker(["a"])
    rejected = {
        "id": "r-1",
        "type": "batchworker.command.rejected",
        "subject": "a",
        "data": {"job_id": "a", "code": "JOB_CONFLICT", "message": "a different request"},
    }
    assert tracker.apply(rejected)
    view = tracker.views["a"]
    assert view.finished and view.status == "REJECTED"
    console = Console(width=200, record=True)
    console.print(summary(tracker, "t"))
    assert "REJECTED JOB_CONFLICT" in console.export_text()


def test_accepted_counts_as_an_event_without_changing_status() -> None:
    tracker = JobTracker(["a"])
    accepted = {"id": "c-1", "type": "batchworker.command.accepted", "subject": "a", "data": {}}
    assert tracker.apply(accepted)
    assert tracker.views["a"].events == 1 and tracker.views["a"].status == "SUBMITTED"


# -- what a request's follower waits for -------------------------------------------------


def _accepted(job_id: str, causation: str, n: int = 1) -> dict[str, Any]:
    return {
        "id": f"acc-{causation}-{n}",
        "type": "batchworker.command.accepted",
        "subject": job_id,
        "causationid": causation,
        "data": {"job_id": job_id},
    }


def _rejected(job_id: str, causation: str) -> dict[str, Any]:
    return {
        "id": f"rej-{causation}",
        "type": "batchworker.command.rejected",
        "subject": job_id,
        "causationid": causation,
        "data": {"job_id": job_id, "code": "JOB_CONFLICT", "message": "a different request"},
    }


def _ended(job_id: str, sequence: int, status: str = "DONE") -> StoredJob:
    return StoredJob(sequence, True, _status(job_id, sequence, status))


@pytest.mark.parametrize("action", ["cancel", "start"])
def test_a_cancel_or_start_of_an_ended_job_is_answered_by_its_stored_end(action: str) -> None:
    tracker = JobTracker(["a"], action=action, command_id="m-1")
    tracker.baseline("a", _ended("a", 7))
    view = tracker.views["a"]
    assert view.finished and view.ended_before and view.status == "DONE"
    assert tracker.changes == [("a", "DONE", True)]


def test_a_submit_of_an_ended_job_waits_for_its_own_answer() -> None:
    """A different request under an ended job's id is rejected: that must be what shows."""
    tracker = JobTracker(["a"], action="submit", command_id="m-1")
    tracker.baseline("a", _ended("a", 7))
    view = tracker.views["a"]
    assert not view.finished
    # The re-published latest status (same id) and someone else's request say nothing.
    assert not tracker.apply(_status("a", 7, "DONE"))
    assert tracker.apply(_accepted("a", "m-other"))
    assert not view.finished

    assert tracker.apply(_accepted("a", "m-1"))
    assert view.finished and view.ended_before and view.status == "DONE"


def test_a_conflicting_submit_of_an_ended_job_ends_rejected() -> None:
    tracker = JobTracker(["a"], action="submit", command_id="m-1")
    tracker.baseline("a", _ended("a", 7))
    tracker.apply(_rejected("a", "m-1"))
    view = tracker.views["a"]
    assert view.finished and view.status == "REJECTED"
    assert tracker.changes == [("a", "DONE", True), ("a", "REJECTED", False)]


def test_someone_elses_rejection_does_not_end_the_followed_request() -> None:
    tracker = JobTracker(["a"], action="submit", command_id="m-1")
    assert tracker.apply(_rejected("a", "m-other"))
    assert not tracker.views["a"].finished and tracker.views["a"].status == "SUBMITTED"


def test_an_active_job_is_followed_from_its_stored_state_to_its_end() -> None:
    tracker = JobTracker(["a"], action="cancel", command_id="m-1")
    # The job has moved on past its last status event (progress events).
    tracker.baseline("a", StoredJob(6, False, _status("a", 4, "PROCESSING")))
    view = tracker.views["a"]
    assert view.status == "PROCESSING" and not view.finished and not view.news
    assert not tracker.apply(_status("a", 4, "PROCESSING"))  # the stored one, once more
    assert tracker.apply(_status("a", 7, "STOPPED", stopped_reason="USER_ACTION"))
    assert view.finished and not view.ended_before


def test_resting_found_before_a_submit_is_not_its_answer() -> None:
    tracker = JobTracker(["a"], action="submit", command_id="m-1")
    tracker.baseline("a", StoredJob(3, False, _status("a", 3, "ANALYSIS_DONE")))
    assert not tracker.views["a"].resting
    tracker.apply(_accepted("a", "m-1"))
    assert tracker.views["a"].resting


def test_each_status_change_is_listed_once_however_often_it_arrives() -> None:
    tracker = JobTracker(["a"])
    for event in [
        _status("a", 1, "CREATED"),
        _status("a", 1, "CREATED"),  # redelivered
        _status("a", 2, "PROCESSING", completion_percentage=10.0),
        _status("a", 3, "PROCESSING", completion_percentage=50.0),  # progress only
        _status("a", 4, "DONE"),
        _status("a", 4, "DONE"),  # re-published, and read back from the store
    ]:
        tracker.apply(event)
    assert tracker.changes == [
        ("a", "CREATED", False),
        ("a", "PROCESSING", False),
        ("a", "DONE", False),
    ]
    console = Console(width=200, record=True)
    show_changes(console, tracker)
    lines = console.export_text().splitlines()
    assert [line.split()[1:] for line in lines] == [
        ["a", "CREATED"],
        ["a", "PROCESSING"],
        ["a", "DONE"],
    ]
    assert tracker.changes == []


# -- against a real broker ---------------------------------------------------------------


@dataclass
class Recorded:
    """Notes the follower gives, and the durable state it reads (none here)."""

    notes: list[str] = field(default_factory=list)
    store_reads: list[str] = field(default_factory=list)

    def read_store(self, settings: Settings, job_id: str) -> StoredJob | None:
        self.store_reads.append(job_id)
        return None


@pytest.fixture
def follow_settings(broker_url: str, amqp_names: AmqpNames) -> Settings:
    """Heartbeats of a second: silence past two or three of them loses a connection."""
    settings = Settings(
        broker_url=broker_url,
        heartbeat=1,
        worker_name=f"test-{amqp_names.prefix}",
        **amqp_names.settings(),
    )
    with connection(settings, purpose="test") as conn:
        declare_topology(conn, settings)
    return settings


def _publish_events(settings: Settings, *events: dict[str, Any]) -> None:
    """As the relay does: persistent, to the events exchange, with confirms."""
    conn = pika.BlockingConnection(pika_parameters(settings.broker_url.get_secret_value()))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for event in events:
            status = event["data"].get("status", "progress")
            channel.basic_publish(
                settings.events_exchange,
                f"job.{status.lower()}",
                json.dumps(event).encode(),
                pika.BasicProperties(delivery_mode=2, content_type="application/json"),
            )
    finally:
        conn.close()


def _drain_until(follower: EventFollower, predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 45
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        follower.drain(0.2)


def _follower(settings: Settings) -> tuple[Recorded, JobTracker, EventFollower]:
    """A follower of job ``a``: what it notes and reads recorded, its tracker's views."""
    recorded = Recorded()
    tracker = JobTracker(["a"])
    follower = EventFollower(
        settings, tracker, on_note=recorded.notes.append, read_store=recorded.read_store
    )
    return recorded, tracker, follower


def _proxied(settings: Settings, proxy: PausableProxy) -> Settings:
    parts = urlsplit(settings.broker_url.get_secret_value())
    url = urlunsplit(parts._replace(netloc=f"{parts.netloc.rsplit(':', 1)[0]}:{proxy.port}"))
    return settings.model_copy(update={"broker_url": SecretStr(url)})


@pytest.fixture
def proxy(follow_settings: Settings) -> Iterator[PausableProxy]:
    parts = urlsplit(follow_settings.broker_url.get_secret_value())
    running = PausableProxy((parts.hostname or "127.0.0.1", parts.port or 5672))
    yield running
    running.close()


@pytest.mark.integration
def test_a_quiet_follower_keeps_its_connection_by_heartbeats(follow_settings: Settings) -> None:
    recorded, tracker, follower = _follower(follow_settings)
    try:
        follower.drain(6)  # six heartbeat intervals without a single event
        _publish_events(follow_settings, _status("a", 1, "PROCESSING"))
        _drain_until(follower, lambda: tracker.views["a"].status == "PROCESSING", "the event")
        assert follower.outages == []
        assert recorded.notes == []
    finally:
        follower.close()


@pytest.mark.integration
def test_a_cut_connection_is_made_again_and_what_came_meanwhile_is_not_lost(
    follow_settings: Settings, proxy: PausableProxy
) -> None:
    recorded, tracker, follower = _follower(_proxied(follow_settings, proxy))
    try:
        _publish_events(follow_settings, _status("a", 1, "CREATED"))
        _drain_until(follower, lambda: tracker.views["a"].status == "CREATED", "CREATED")
        proxy.cut()
        # Published while the follower is away: its queue outlives the connection.
        _publish_events(
            follow_settings, _status("a", 2, "ANALYSING"), _status("a", 3, "PROCESSING")
        )
        _drain_until(follower, lambda: tracker.views["a"].status == "PROCESSING", "PROCESSING")
        assert len(follower.outages) == 1
        assert [status for _, status, _ in tracker.changes] == [
            "CREATED",
            "ANALYSING",
            "PROCESSING",
        ]
        # The durable state is read as the follower starts and after each reconnect.
        assert recorded.store_reads == ["a", "a"]
        assert recorded.notes[0].startswith("lost the broker connection")
        assert recorded.notes[1].startswith("reconnected to the broker after")
    finally:
        follower.close()


@pytest.mark.integration
def test_a_blackholed_connection_is_noticed_by_its_heartbeats_and_made_again(
    follow_settings: Settings, proxy: PausableProxy
) -> None:
    recorded, tracker, follower = _follower(_proxied(follow_settings, proxy))
    try:
        proxy.paused.set()  # nothing moves, nothing closes: only heartbeats can tell
        _drain_until(follower, lambda: not follower.connected, "the loss to be noticed")
        _publish_events(follow_settings, _status("a", 1, "PROCESSING"))
        proxy.paused.clear()
        _drain_until(follower, lambda: tracker.views["a"].status == "PROCESSING", "PROCESSING")
        assert len(follower.outages) == 1
        assert "heartbeat" in recorded.notes[0].lower()
    finally:
        follower.close()


@pytest.mark.integration
def test_closing_the_follower_deletes_its_queue(follow_settings: Settings) -> None:
    follower = EventFollower(follow_settings, JobTracker(["a"]), read_store=Recorded().read_store)
    name = follower.queue_name
    follower.close()
    conn = pika.BlockingConnection(pika_parameters(follow_settings.broker_url.get_secret_value()))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as gone:
            conn.channel().queue_declare(name, passive=True)
        assert gone.value.reply_code == 404
    finally:
        if conn.is_open:
            conn.close()
