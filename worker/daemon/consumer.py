"""The jobs consumer: job-request messages in batches to intake, acked after it commits.

Everything runs on the consumer's own thread, which owns the channel (channels are not
thread-safe): draining deliveries, reading each batch (intake's pure half: parse, validate,
build rows and events), taking it in (the other half, one transaction) and settling it
(acks in delivery order). The transaction goes in steps that send statements and read the
answers a step later, and the consumer works between them: while PostgreSQL looks up and
writes batch N, the consumer drains and reads batch N+1. The database's time and the
Python work overlap, on one thread: a second thread would only fight this one for the GIL.
Batches are therefore at most half the prefetch window, or batch N+1 could not arrive
before N is acked. ``drain_events`` never blocks longer than a second, so heartbeats are
serviced between batches.

How a batch is settled once intake is done with it (acked, rejected, held, given back; a
failed batch retried one message at a time, an unavailable intake paused without spending a
delivery attempt) is decided in worker/daemon/settlement.py, a pure function of the batch
and intake's outcome; this module performs it on the channel.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from kombu.exceptions import OperationalError
from kombu.messaging import Consumer, Queue
from kombu.mixins import ConsumerMixin

from worker.broker import (
    CONNECT_RETRY,
    broker_problem,
    buffered,
    connection,
    declare_topology,
    read_ahead,
    release,
    requeue_up_to,
    socket_timeout,
)
from worker.daemon.inbound import BatchIntake, InboundMessage, IntakeUnavailable, TakeSteps
from worker.daemon.settlement import (
    FAILED,
    TAKEN,
    UNAVAILABLE,
    Outcome,
    Settlement,
    Trial,
    after_trial,
    settle,
    settle_alone,
)
from worker.settings import Settings

log = logging.getLogger(__name__)

IDLE_DRAIN_SECONDS = 1.0
# With a transaction under way, a socket this quiet means nothing more is coming for now.
QUIET_SECONDS = 0.005
# kombu asks for a check at least twice per heartbeat interval (seconds, not minutes);
# once a second is plenty, and not once per message.
HEARTBEAT_CHECK_SECONDS = 1.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


@dataclass
class _Batch:
    """A batch on its way: read (``read``), then in its transaction (``steps``)."""

    messages: list[InboundMessage]
    read: Any
    steps: TakeSteps | None = None
    stepped: int = 0  # steps taken: the lookup goes out with the first, the writes next

    @property
    def written(self) -> bool:
        return self.stepped >= 2


class JobsConsumer(ConsumerMixin):
    def __init__(
        self,
        settings: Settings,
        intake: BatchIntake[Any],
        *,
        on_connection_change: Callable[[bool], None] | None = None,
        on_progress: Callable[[], None] | None = None,
        batch_max: int = 200,
        batch_wait: float = 0.05,
    ) -> None:
        self.settings = settings
        self.connection = connection(settings, purpose="consume")
        self._intake = intake
        self._on_connection_change = on_connection_change
        # Called each time round, idle or not: the daemon's liveness watch (daemon/health.py).
        self._on_progress = on_progress or (lambda: None)
        # Half the prefetch window, so that the next batch can arrive (and be read) while
        # this one is in its transaction; a window of one still works, one at a time.
        self._batch_max = max(1, min(batch_max, settings.prefetch // 2))
        self._batch_wait = batch_wait
        self._stop = threading.Event()
        self._pending: list[InboundMessage] = []
        self._first_pending_at = 0.0
        self._resume_at = 0.0
        self._backoff = BACKOFF_FIRST
        self._read: _Batch | None = None  # read, waiting for the transaction thread
        self._taking: _Batch | None = None  # in its transaction
        self._connected: bool | None = None
        self._heartbeat_checked_at = 0.0
        self._quiet = False  # the last drain found nothing
        self._transport: Any = None  # py-amqp's, for the socket under the drains

    # -- lifecycle ------------------------------------------------------------------

    @property
    def should_stop(self) -> bool:
        return self._stop.is_set()

    @should_stop.setter
    def should_stop(self, value: bool) -> None:
        # ConsumerMixin assigns this attribute; keep it backed by the event.
        if value:
            self._stop.set()

    def request_stop(self) -> None:
        """Thread-safe: stop consuming after the batch in hand is handled and settled."""
        self._stop.set()

    def run(self) -> None:  # type: ignore[override]
        """Consume until stopped; on connection loss, reconnect with kombu's back-off."""
        errors = (
            *self.connection.connection_errors,
            *self.connection.channel_errors,
            OperationalError,
        )
        while not self._stop.is_set():
            self._on_progress()
            try:
                for _ in self.consume():
                    self._on_progress()
            except errors as exc:
                log.warning(
                    "jobs consumer lost the broker: %s; reconnecting",
                    broker_problem(self.settings.broker_url.get_secret_value(), exc),
                )
            except Exception:
                # A bug must not end consumption for good; the connection is gone with it.
                log.exception("jobs consumer failed; reconnecting")
            else:
                continue
            self._set_connected(False)
            self._pending.clear()  # unacked: the broker requeued them with the connection
            self._stop.wait(1.0)
        self._set_connected(False)

    # -- kombu hooks ------------------------------------------------------------------

    @contextmanager
    def establish_connection(self) -> Iterator[Any]:
        conn = self.create_connection()  # type: ignore[no-untyped-call]
        try:
            conn.ensure_connection(self.on_connection_error, **CONNECT_RETRY)
            yield conn
        except BaseException:
            # Lost (or a bug): a broker that stopped answering would never answer a close.
            release(conn, broken=True)
            raise
        release(conn)

    def get_consumers(self, consumer_class: Any, channel: Any) -> list[Any]:
        queue = Queue(self.settings.jobs_queue, no_declare=True)
        return [
            consumer_class(
                queues=[queue],
                on_message=self._on_message,
                # Given to the Consumer itself: a qos() afterwards comes too late
                # (ENVIRONMENT-NOTES), every queued message would already be here.
                prefetch_count=self.settings.prefetch,
                no_ack=False,
            )
        ]

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        self._set_connected(False)
        log.warning(
            "%s; retrying in %.1f s",
            broker_problem(self.settings.broker_url.get_secret_value(), exc),
            interval,
        )

    def consume(  # type: ignore[override]
        self, limit: int | None = None, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[None]:
        """Drain deliveries into batches until stopped (``limit``/``timeout`` unused)."""
        with self.establish_connection() as conn:
            channel = conn.default_channel
            # The DLQ (the dead-letter target) must exist before the first delivery, and
            # a broker may have been reset: declare on every (re)connect.
            declare_topology(conn, self.settings)
            read_ahead(conn.connection)
            self._transport = conn.connection.transport
            consumers = self.get_consumers(partial(Consumer, channel), channel)
            try:
                with self._consume_from(*consumers):  # type: ignore[no-untyped-call]
                    self._set_connected(True)
                    log.info("consuming from %s", self.settings.jobs_queue)
                    while not self._stop.is_set():
                        self._drain(conn)
                        self._advance(channel)
                        yield
                    # Stopping: the batches in hand are taken in and settled before the
                    # channel closes; what was prefetched but not drained goes back then.
                    self._finish_taking(channel, stopping=True)
                    while self._pending:
                        self._flush(channel, stopping=True)
            finally:
                # The connection is gone (or stopping went wrong): a transaction in steps
                # is rolled back, and its messages come back from the broker.
                if self._taking is not None and self._taking.steps is not None:
                    self._taking.steps.close()
                self._taking = self._read = None

    # -- batching ---------------------------------------------------------------------

    def _on_message(self, message: Any) -> None:
        if not self._pending:
            self._first_pending_at = time.monotonic()
        self._pending.append(InboundMessage.from_delivery(message))

    def _drain(self, conn: Any) -> None:
        now = time.monotonic()
        wait = IDLE_DRAIN_SECONDS
        if self._pending:
            wait = max(0.0, max(self._first_pending_at + self._batch_wait, self._resume_at) - now)
        if self._taking is not None:
            # A transaction waits on what comes next: do not sit long on a quiet socket.
            wait = min(wait, QUIET_SECONDS)
        self._quiet = False
        timeout = min(max(wait, 0.001), IDLE_DRAIN_SECONDS)
        transport = self._transport
        try:
            with socket_timeout(transport, timeout):
                conn.drain_events(timeout=timeout)
                # Whatever the last read brought is drained too, without coming round
                # the loop for each: a read takes up to broker.READ_AHEAD_BYTES, several
                # deliveries.
                while len(self._pending) < self._batch_max and buffered(transport):
                    conn.drain_events(timeout=timeout)
        except TimeoutError:
            self._quiet = True
        if now - self._heartbeat_checked_at >= HEARTBEAT_CHECK_SECONDS:
            conn.heartbeat_check()
            self._heartbeat_checked_at = now

    def _nothing_coming(self) -> bool:
        """No delivery in the last drain, or none can come before a batch is settled."""
        in_hand = len(self._pending)
        for batch in (self._read, self._taking):
            in_hand += len(batch.messages) if batch is not None else 0
        return self._quiet or in_hand >= self.settings.prefetch

    def _batch_due(self) -> bool:
        if not self._pending:
            return False
        now = time.monotonic()
        if now < self._resume_at:
            return False
        return (
            len(self._pending) >= self._batch_max
            or now >= self._first_pending_at + self._batch_wait
        )

    def _next_batch(self) -> list[InboundMessage]:
        batch = self._pending[: self._batch_max]
        del self._pending[: len(batch)]
        if self._pending:
            self._first_pending_at = time.monotonic()
        return batch

    def _advance(self, channel: Any) -> None:
        """Move the pipeline on: batch N's transaction in steps around reading batch N+1.

        Batch N's lookup goes out when it starts; its writes go out once batch N+1 has
        arrived, just before N+1 is read; it commits and is settled after that read. When
        nothing more arrives there is nothing to overlap, and it is finished at once.
        """
        while True:
            taking, due = self._taking, self._batch_due()
            idle = not due and self._nothing_coming()
            if taking is not None and not taking.written and (due or idle):
                self._step(channel)
            elif self._read is None and due:
                self._read_next(channel)
            elif taking is not None and (self._read is not None or idle):
                self._finish_taking(channel, stopping=False)
            elif taking is None and self._read is not None:
                self._taking, self._read = self._read, None
                self._taking.steps = self._intake.take_in_steps(self._taking.read)
                self._step(channel)
            else:
                return

    def _read_next(self, channel: Any) -> None:
        batch = self._next_batch()
        try:
            self._read = _Batch(batch, self._intake.read(batch))
        except Exception:
            # A bug: settle the batch the slow way, after the one before it (acks are
            # cumulative, so batches are settled in delivery order). Should that one be
            # held, this batch waits behind it.
            log.exception("intake could not read a batch of %d message(s)", len(batch))
            self._pending[:0] = batch
            self._finish_taking(channel, stopping=False)
            if self._pending[0] is batch[0]:
                del self._pending[: len(batch)]
                self._settle(channel, batch, Outcome(FAILED), stopping=False)

    def _step(self, channel: Any) -> None:
        """One step of the batch in its transaction; settle it if that was the last."""
        taking = self._taking
        assert taking is not None and taking.steps is not None
        outcome = self._next_step(taking.steps)
        if outcome is None:
            taking.stepped += 1
            return
        self._taking = None
        self._settle_taken(channel, taking, outcome, stopping=False)

    def _finish_taking(self, channel: Any, *, stopping: bool) -> None:
        """Run the batch in its transaction to its end and settle it."""
        taking, self._taking = self._taking, None
        if taking is None or taking.steps is None:
            return
        outcome = None
        while outcome is None:
            outcome = self._next_step(taking.steps)
        self._settle_taken(channel, taking, outcome, stopping=stopping)

    def _settle_taken(
        self, channel: Any, batch: _Batch, outcome: Outcome, *, stopping: bool
    ) -> None:
        if not outcome.taken_whole and self._read is not None:
            # The batch read ahead goes back first, in order: held or retried messages
            # of this batch go in front of it, and it is read again when its turn comes.
            self._pending[:0] = self._read.messages
            self._first_pending_at = time.monotonic()
            self._read = None
        self._settle(channel, batch.messages, outcome, stopping=stopping)

    def _flush(self, channel: Any, *, stopping: bool = False) -> None:
        """Take a batch in on this thread and settle it (stopping: nothing else to overlap)."""
        batch = self._next_batch()
        self._settle(channel, batch, self._try(batch), stopping=stopping)

    def _settle(
        self, channel: Any, batch: list[InboundMessage], outcome: Outcome, *, stopping: bool
    ) -> None:
        settlement = settle(batch, outcome)
        if not settlement.one_by_one:
            self._perform(channel, settlement, stopping=stopping)
            return
        trial = Trial()
        for index, message in enumerate(batch):
            settlement, trial = settle_alone(batch, index, self._try([message]), trial)
            self._perform(channel, settlement, stopping=stopping)
            if trial.over:
                break
        self._perform(channel, after_trial(trial), stopping=stopping)

    def _perform(self, channel: Any, settlement: Settlement, *, stopping: bool) -> None:
        """Do what ``settlement`` says, on the channel and to intake's pace."""
        if settlement.ack_up_to is not None:
            channel.basic_ack(settlement.ack_up_to, multiple=True)
        for tag in settlement.ack:
            channel.basic_ack(tag)
        for tag in settlement.reject:
            channel.basic_reject(tag, requeue=True)
        if settlement.give_back_up_to is not None:
            requeue_up_to(channel, settlement.give_back_up_to)
        if settlement.hold:
            # In hand, unacked: no delivery attempt spent.
            self._pending[:0] = settlement.hold
            self._first_pending_at = time.monotonic()
        if settlement.taken:
            self._backoff = BACKOFF_FIRST
        if settlement.pause is None:
            return
        if stopping:
            # Nothing more to try before exit: hand back whatever is still pending.
            self._give_back(channel)
        else:
            log.warning("%s; pausing %.0f s before the next batch", settlement.pause, self._backoff)
            self._resume_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _give_back(self, channel: Any) -> None:
        if self._pending:
            requeue_up_to(channel, self._pending[-1].delivery_tag)
            self._pending.clear()

    def _try(self, batch: list[InboundMessage]) -> Outcome:
        """Read and take ``batch``, all at once."""
        try:
            steps = self._intake.take_in_steps(self._intake.read(batch))
        except Exception:
            log.exception("intake could not read a batch of %d message(s)", len(batch))
            return Outcome(FAILED)
        outcome = None
        while outcome is None:
            outcome = self._next_step(steps)
        return outcome

    @staticmethod
    def _next_step(steps: TakeSteps) -> Outcome | None:
        """One step of a transaction; its outcome once it has ended, None before."""
        try:
            next(steps)
        except StopIteration as done:
            return Outcome(TAKEN, done.value)
        except IntakeUnavailable as exc:
            log.warning("intake unavailable (%s)", exc)
            return Outcome(UNAVAILABLE)
        except Exception:
            log.exception("intake failed on a batch")
            return Outcome(FAILED)
        return None

    def _set_connected(self, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        if self._on_connection_change is not None:
            self._on_connection_change(connected)
