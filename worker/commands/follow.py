"""Following jobs through their events, as any event consumer should, as long as they run.

Used by ``submit --wait`` and the demo. De-duplicates exactly as the contract asks event
consumers to: drop an ``id`` already seen, and a ``sequence`` at or below the last one seen
for that job. Rendering is in ``render``.

A job may run for hours, through broker restarts. The follower keeps its connection's
heartbeats (no drain waits longer than a quarter of the heartbeat, and the heartbeat is
checked after each), and when the connection is lost it makes a new one, as often as it
takes. It does not lose its place meanwhile: its queue is durable and outlives the
connection (it expires only after ``FOLLOW_QUEUE_EXPIRES`` seconds unused), so it goes on
collecting the events, which are persistent, across a broker restart too; and deliveries
are acked only once folded in, so those on the wire when the connection broke come again.
After each reconnect the jobs' durable state is read from PostgreSQL as well (what
``batch-worker status`` reads), so not even an outage past the queue's expiry or its length
limit can hide a job's end. Whatever arrives twice is dropped by the de-duplication.

Where the request was for a job that has already ended (a ``cancel`` or ``start`` of an
ended job changes nothing, and no event follows its ``command.accepted``), the state read
before publishing answers at once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import amqp.exceptions
import kombu.exceptions
import psycopg
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.message import Message
from kombu.messaging import Consumer

from worker.broker import CLOSE_TIMEOUT, CONNECT_TIMEOUT, connection, release, socket_timeout
from worker.commands.status import job_status
from worker.lifecycle import TERMINAL
from worker.redact import redact_text
from worker.settings import Settings
from worker.wire.event_models import COMMAND_ACCEPTED, COMMAND_REJECTED

# What a command-line client of the broker may meet: refused or lost connections (OSError,
# kombu's OperationalError after retries) and the broker's own refusals (no such exchange).
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    amqp.exceptions.AMQPError,
    kombu.exceptions.KombuError,
)

# How long the broker keeps a follower's queue once nothing uses it: the outage a follower
# rides out without missing an intermediate event (past it, the durable state still gives
# the job's end), and how long a follower that died leaves its queue behind.
FOLLOW_QUEUE_EXPIRES = 600
# A follower away that long on a busy fleet must not fill the broker: the oldest go first.
FOLLOW_QUEUE_MAX_LENGTH = 10_000
FOLLOW_PREFETCH = 100
# Reconnect attempts: at once, then 0.5 s, 1 s, 2 s, ... at most 5 s apart.
RECONNECT_FIRST = 0.5
RECONNECT_MAX = 5.0


@dataclass(frozen=True)
class StoredJob:
    """What PostgreSQL holds of a job, for a follower: its sequence and latest status event."""

    sequence: int
    ended: bool
    latest_status_event: dict[str, Any] | None


def read_stored_job(settings: Settings, job_id: str) -> StoredJob | None:
    """The job's durable state; None when the fleet has no such job (or no worker of this
    database has ever started). Raises psycopg.Error when PostgreSQL cannot be read."""
    try:
        status = job_status(settings, job_id)
    except psycopg.errors.UndefinedTable:
        return None
    if status is None:
        return None
    return StoredJob(
        sequence=int(status["sequence"]),
        ended=status["phase"] == "ENDED",
        latest_status_event=status["latest_status_event"],
    )


@dataclass
class JobView:
    """What a reader of the events knows of one job.

    ``action`` and ``command_id`` (the request's message id) are those of the request
    being followed, when there is one: only its own ``command.*`` events answer it.
    ``baseline_sequence`` is the job's sequence before that request was published; a
    state at or below it is not news of the request.
    """

    job_id: str
    action: str = "submit"
    command_id: str | None = None
    status: str = "SUBMITTED"
    completion: float = 0.0
    tiles: dict[str, Any] | None = None
    cost_pu: float | None = None
    batch_request_id: str | None = None
    stopped_reason: str | None = None
    error: dict[str, Any] | None = None
    rejected: dict[str, Any] | None = None
    answer: str | None = None  # "accepted" or "rejected": the worker took the request in
    baseline_sequence: int = 0
    ended_before: bool = False  # the job had ended before the request was published
    events: int = 0
    last_sequence: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def finished(self) -> bool:
        return self.ended is not None

    @property
    def news(self) -> bool:
        """The state shown came after the request: it was answered, or the job moved on."""
        return self.answer is not None or self.last_sequence > self.baseline_sequence

    @property
    def resting(self) -> bool:
        return self.status == "ANALYSIS_DONE" and self.news


class JobTracker:
    """Folds events into JobViews; returns whether an event was new.

    ``changes`` lists each status change in the order seen, for the caller to show and
    clear: (job id, status, whether it was the state found before the request).
    """

    def __init__(
        self, job_ids: list[str], *, action: str = "submit", command_id: str | None = None
    ) -> None:
        self.views = {
            job_id: JobView(job_id, action=action, command_id=command_id) for job_id in job_ids
        }
        self.changes: list[tuple[str, str, bool]] = []
        self._seen: set[str] = set()
        self._baseline = False

    def baseline(self, job_id: str, stored: StoredJob) -> None:
        """The job's state before the request is published."""
        view = self.views[job_id]
        view.baseline_sequence = stored.sequence
        view.ended_before = stored.ended
        if stored.latest_status_event is not None:
            self._baseline = True
            try:
                self.apply(stored.latest_status_event)
            finally:
                self._baseline = False

    def apply(self, event: dict[str, Any]) -> bool:
        data = event.get("data") or {}
        view = self.views.get(str(event.get("subject") or data.get("job_id")))
        event_id = str(event.get("id"))
        if view is None or event_id in self._seen:
            return False
        self._seen.add(event_id)
        kind = str(event.get("type", ""))
        if kind in (COMMAND_ACCEPTED, COMMAND_REJECTED):
            view.events += 1
            ours = view.command_id is None or event.get("causationid") == view.command_id
            if ours and kind == COMMAND_REJECTED:
                view.answer = "rejected"
                view.rejected = data
                self._set_status(view, "REJECTED")
            elif ours:
                view.answer = view.answer or "accepted"
            self._settle(view)
            return True
        if not kind.startswith("batchworker.job."):
            view.events += 1
            return True
        sequence = int(data.get("sequence") or 0)
        if sequence <= view.last_sequence:
            return False
        view.events += 1
        view.last_sequence = sequence
        self._set_status(view, data.get("status") or view.status)
        view.completion = float(data.get("completion_percentage") or 0.0)
        view.tiles = data.get("tiles")
        view.cost_pu = data.get("cost_pu")
        view.batch_request_id = data.get("batch_request_id")
        view.stopped_reason = data.get("stopped_reason")
        view.error = data.get("error")
        self._settle(view)
        return True

    def _set_status(self, view: JobView, status: str) -> None:
        if status != view.status:
            self.changes.append((view.job_id, status, self._baseline))
        view.status = status

    @staticmethod
    def _settle(view: JobView) -> None:
        """End the view once it answers the request.

        A terminal status found before a ``submit`` is not its answer yet: a different
        request under the job's id is rejected, and that is what the submitter must see.
        A ``cancel`` or ``start`` of an ended job changes nothing: the ended job answers.
        """
        if view.ended is not None:
            return
        terminal = view.status in TERMINAL and (view.action != "submit" or view.news)
        if view.rejected is not None or terminal:
            view.ended = time.monotonic()


Note = Callable[[str], None]
StoreReader = Callable[[Settings, str], StoredJob | None]


def _ignore(text: str) -> None:
    pass


class EventFollower:
    """A durable private queue bound to the events exchange (kombu), kept across lost
    connections until ``close``; the tracker's jobs' state read from PostgreSQL at the
    start and after every reconnect. ``on_note`` hears of outages and reconnects."""

    def __init__(
        self,
        settings: Settings,
        tracker: JobTracker,
        *,
        on_note: Note = _ignore,
        read_store: StoreReader = read_stored_job,
    ) -> None:
        self.tracker = tracker
        self.outages: list[float] = []  # seconds each lost connection took to make again
        self._settings = settings
        self._note = on_note
        self._read_store = read_store
        self._store_readable = True
        self._connection: Connection | None = None
        self._channel: Any = None
        heartbeat = settings.heartbeat
        # kombu wants a heartbeat check at least twice per interval; drains in between.
        self._tick = min(1.0, max(0.05, heartbeat / 4)) if heartbeat else 1.0
        self._lost_at: float | None = None
        self._retry_at = 0.0
        self._backoff = RECONNECT_FIRST
        exchange = Exchange(settings.events_exchange, type="topic", durable=True, passive=True)
        self._queue = Queue(
            f"batch-worker.commands.follow.{uuid.uuid4().hex[:12]}",
            exchange=exchange,
            routing_key="#",
            durable=True,
            auto_delete=False,
            queue_arguments={
                "x-expires": FOLLOW_QUEUE_EXPIRES * 1000,
                "x-max-length": FOLLOW_QUEUE_MAX_LENGTH,
            },
        )
        self._connect()  # a broker it cannot reach at first is the caller's to report
        try:
            # Bound before the durable state is read: whatever changes after the read
            # comes as an event.
            self._read_stored_state(baseline=True)
        except BaseException:
            self.close()
            raise

    @property
    def queue_name(self) -> str:
        return str(self._queue.name)

    @property
    def connected(self) -> bool:
        return self._connection is not None

    def _connect(self) -> None:
        conn = connection(self._settings, purpose="follow")
        try:
            # One attempt at each node of a BROKER_URL list, no pause: drain() paces the
            # next round.
            conn.ensure_connection(max_retries=max(len(conn.alt), 1) - 1)
            # The handshake is bounded by the connect timeout, the replies to come are not:
            # a path that goes dark now must not hold the follower for ever.
            with socket_timeout(conn.connection.transport, CONNECT_TIMEOUT):
                channel = conn.channel()
                consumer = Consumer(
                    channel,
                    queues=[self._queue],
                    callbacks=[self._on_message],
                    prefetch_count=FOLLOW_PREFETCH,
                )
                consumer.consume()
        except BaseException:
            release(conn, broken=True)
            raise
        self._connection, self._channel = conn, channel

    def _on_message(self, body: Any, message: Message) -> None:
        try:
            event = json.loads(message.body)
        except ValueError:
            event = None
        if isinstance(event, dict):
            self.tracker.apply(event)
        # Acked once folded in: one on the wire when the connection breaks comes again.
        message.ack()

    def _read_stored_state(self, *, baseline: bool = False) -> None:
        for job_id in self.tracker.views:
            try:
                stored = self._read_store(self._settings, job_id)
            except psycopg.Error:
                if self._store_readable:
                    self._note(
                        "cannot read the jobs' state from PostgreSQL"
                        " (BATCH_WORKER_DATABASE_URL): following their events alone"
                    )
                self._store_readable = False
                return
            self._store_readable = True
            if stored is None:
                continue
            if baseline:
                self.tracker.baseline(job_id, stored)
            elif stored.latest_status_event is not None:
                self.tracker.apply(stored.latest_status_event)

    def drain(self, seconds: float) -> None:
        """Take in what arrives within ``seconds``, keeping the connection alive (or making
        it again)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self._connection is None:
                wait = self._retry_at - time.monotonic()
                if wait > 0:
                    time.sleep(min(wait, left))
                else:
                    self._reconnect()
                continue
            try:
                with suppress(TimeoutError):  # an OSError, but only a quiet socket
                    self._connection.drain_events(timeout=min(left, self._tick))
                self._connection.heartbeat_check()
            except BROKER_ERRORS as exc:
                self._lost(exc)

    def _lost(self, exc: BaseException) -> None:
        self._drop()
        self._lost_at = time.monotonic()
        self._retry_at = self._lost_at  # the first attempt at once
        self._backoff = RECONNECT_FIRST
        reason = redact_text(str(exc)) or type(exc).__name__
        self._note(f"lost the broker connection ({reason}); reconnecting")

    def _reconnect(self) -> None:
        try:
            self._connect()
        except BROKER_ERRORS:
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, RECONNECT_MAX)
            return
        outage = time.monotonic() - (self._lost_at or time.monotonic())
        self.outages.append(outage)
        self._lost_at = None
        self._note(f"reconnected to the broker after {outage:.1f} s")
        self._read_stored_state()

    def _drop(self) -> None:
        """Let a lost connection go without a word to the broker: a closing handshake on
        a path gone dark would wait for its answer for ever."""
        conn, self._connection, self._channel = self._connection, None, None
        if conn is not None:
            release(conn, broken=True)

    def close(self) -> None:
        """Delete the queue and close the connection, when the broker answers in time (else
        the queue expires by itself)."""
        conn, channel = self._connection, self._channel
        self._connection = self._channel = None
        if conn is None or channel is None:
            return
        deleted = False
        with suppress(*BROKER_ERRORS), socket_timeout(conn.connection.transport, CLOSE_TIMEOUT):
            channel.queue_delete(self.queue_name)
            deleted = True
        release(conn, broken=not deleted)
