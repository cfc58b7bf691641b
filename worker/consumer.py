"""The jobs consumer: job-request messages in batches to intake, acked after it commits.

Everything runs on the consumer's own thread, which owns the channel (channels are not
thread-safe): draining deliveries, calling ``handle_batch`` (a quick DB transaction, no
HTTP), acking. ``drain_events`` never blocks longer than a second, so heartbeats are
serviced between batches.

When ``handle_batch`` raises, nothing was committed; the messages go back to the queue
(``basic.reject``/``basic.nack`` with requeue). So that one poison message cannot fail its
whole batch forever, a failed batch is retried one message at a time: the poison one is
requeued alone (the quorum queue's delivery limit then dead-letters it) while the others
are taken in. Two failures in a row with no success look like an outage rather than poison:
the rest of the batch is requeued at once and intake is left alone for a growing back-off.

An outage intake can name (it raises ``IntakeUnavailable``: the database is down) costs no
delivery attempt at all: the batch stays in hand, unacked, and is tried again after a
growing back-off. Requeueing it instead would spend the quorum queue's delivery limit and
send good requests to the DLQ during a long outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

from amqp import spec as amqp_spec
from amqp.transport import TCPTransport
from kombu.exceptions import OperationalError
from kombu.messaging import Consumer, Queue
from kombu.mixins import ConsumerMixin

from worker.broker import CONNECT_RETRY, connection, declare_topology
from worker.settings import Settings

log = logging.getLogger(__name__)

IDLE_DRAIN_SECONDS = 1.0
# kombu asks for a check at least twice per heartbeat interval (seconds, not minutes);
# once a second is plenty, and not once per message.
HEARTBEAT_CHECK_SECONDS = 1.0
# Bytes py-amqp may take from the socket per read (see read_ahead).
READ_AHEAD_BYTES = 16_384
_TAKEN, _FAILED, _UNAVAILABLE = "taken", "failed", "unavailable"
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


class IntakeUnavailable(Exception):
    """Raised by ``handle_batch`` when its store is unreachable: the batch is fine, try later."""


@dataclass(frozen=True)
class InboundMessage:
    """One delivery, with everything needed to dead-letter it byte for byte.

    ``properties`` are the AMQP basic properties without the headers table
    (``timestamp`` as int seconds); ``headers`` is that table.
    """

    body: bytes
    content_type: str | None
    properties: dict[str, Any]
    headers: dict[str, Any]
    delivery_tag: int
    redelivered: bool

    @property
    def message_id(self) -> str | None:
        return self.properties.get("message_id")

    @property
    def correlation_id(self) -> str | None:
        return self.properties.get("correlation_id")

    @property
    def reply_to(self) -> str | None:
        return self.properties.get("reply_to")

    @classmethod
    def from_delivery(cls, message: Any) -> InboundMessage:
        """From a kombu message, undecoded (the body stays the bytes that were sent)."""
        properties = {
            key: value
            for key, value in message.properties.items()
            if key != "application_headers" and value is not None
        }
        body = message.body
        return cls(
            body=body.encode("utf-8") if isinstance(body, str) else bytes(body),
            content_type=message.content_type or None,
            properties=properties,
            headers=dict(message.headers or {}),
            delivery_tag=int(message.delivery_tag),
            redelivered=bool(message.delivery_info.get("redelivered", False)),
        )


def read_ahead(connection: Any, size: int = READ_AHEAD_BYTES) -> bool:
    """Let py-amqp's plain TCP transport take up to ``size`` bytes per socket read.

    It reads exactly the bytes of the next frame part (header, payload, end octet), each a
    poll and a recv: nine system calls per delivery, a tenth of the consumer's time in a
    burst. Its read loop already keeps whatever a read returns beyond what it wanted in its
    buffer for the next frame, so a larger read is all it takes. Only the plain TCP
    transport (TLS reads are SSL records); False when left as it was.
    """
    transport = getattr(connection, "transport", None)
    sock = getattr(transport, "sock", None)
    if not isinstance(transport, TCPTransport) or sock is None:
        return False
    if not hasattr(transport, "_quick_recv") or not hasattr(transport, "_read_buffer"):
        return False  # a py-amqp this was not written against: leave it alone
    recv: Callable[[int], bytes] = sock.recv

    def recv_ahead(wanted: int) -> bytes:
        return recv(max(wanted, size))

    transport._quick_recv = recv_ahead
    return True


def _requeue_up_to(channel: Any, delivery_tag: int) -> None:
    """basic.nack(multiple, requeue): every unsettled delivery up to ``delivery_tag``.

    py-amqp has no ``basic_nack`` for consumers; the frame is RabbitMQ's extension.
    """
    channel.send_method(amqp_spec.Basic.Nack, "Lbb", (delivery_tag, True, True))


class JobsConsumer(ConsumerMixin):
    def __init__(
        self,
        settings: Settings,
        handle_batch: Callable[[list[InboundMessage]], list[InboundMessage] | None],
        *,
        on_connection_change: Callable[[bool], None] | None = None,
        on_progress: Callable[[], None] | None = None,
        batch_max: int = 100,
        batch_wait: float = 0.05,
    ) -> None:
        self.settings = settings
        self.connection = connection(settings, purpose="consume")
        self._handle_batch = handle_batch
        self._on_connection_change = on_connection_change
        # Called each time round, idle or not: the daemon's liveness watch (worker/health.py).
        self._on_progress = on_progress or (lambda: None)
        # A batch larger than the prefetch window could never fill.
        self._batch_max = max(1, min(batch_max, settings.prefetch))
        self._batch_wait = batch_wait
        self._stop = threading.Event()
        self._pending: list[InboundMessage] = []
        self._first_pending_at = 0.0
        self._resume_at = 0.0
        self._backoff = BACKOFF_FIRST
        self._deferred: list[InboundMessage] = []
        self._connected: bool | None = None
        self._heartbeat_checked_at = 0.0

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
                log.warning("jobs consumer lost the broker (%s); reconnecting", type(exc).__name__)
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
        with self.create_connection() as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(self.on_connection_error, **CONNECT_RETRY)
            yield conn

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
        log.warning("broker unreachable (%s); retrying in %.1f s", type(exc).__name__, interval)

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
            consumers = self.get_consumers(partial(Consumer, channel), channel)
            with self._consume_from(*consumers):  # type: ignore[no-untyped-call]
                self._set_connected(True)
                log.info("consuming from %s", self.settings.jobs_queue)
                while not self._stop.is_set():
                    self._drain(conn)
                    if self._batch_due():
                        self._flush(channel)
                    yield
                while self._pending:
                    # Stopping: the batch in hand is handled and settled before the
                    # channel closes; what was prefetched but not drained goes back then.
                    self._flush(channel, stopping=True)

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
        with suppress(TimeoutError):
            conn.drain_events(timeout=min(max(wait, 0.001), IDLE_DRAIN_SECONDS))
        if now - self._heartbeat_checked_at >= HEARTBEAT_CHECK_SECONDS:
            conn.heartbeat_check()
            self._heartbeat_checked_at = now

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

    def _flush(self, channel: Any, *, stopping: bool = False) -> None:
        batch = self._pending[: self._batch_max]
        del self._pending[: len(batch)]
        if self._pending:
            self._first_pending_at = time.monotonic()
        outcome = self._try(batch)
        if outcome == _TAKEN and self._deferred:
            self._settle_all_but_deferred(channel, batch, stopping=stopping)
            return
        if outcome == _TAKEN:
            self._ack(channel, batch)
            self._backoff = BACKOFF_FIRST
            return
        if outcome == _UNAVAILABLE:
            self._hold(channel, batch, stopping=stopping)
            return
        taken = self._one_by_one(channel, batch, stopping=stopping) if len(batch) > 1 else 0
        if len(batch) == 1:
            channel.basic_reject(batch[0].delivery_tag, requeue=True)
        if taken:
            self._backoff = BACKOFF_FIRST
        elif stopping:
            # Nothing more to try before exit: hand back whatever is still pending.
            self._give_back(channel)
        else:
            self._pause("intake failed")

    def _settle_all_but_deferred(
        self, channel: Any, batch: list[InboundMessage], *, stopping: bool
    ) -> None:
        """Intake is at capacity (MAX_IN_FLIGHT): ack what it took, hold what it deferred."""
        deferred_tags = {m.delivery_tag for m in self._deferred}
        for message in batch:
            if message.delivery_tag not in deferred_tags:
                channel.basic_ack(message.delivery_tag)
        held = [m for m in batch if m.delivery_tag in deferred_tags]
        self._deferred = []
        self._hold(channel, held, stopping=stopping, why="at capacity (MAX_IN_FLIGHT)")

    def _hold(
        self,
        channel: Any,
        batch: list[InboundMessage],
        *,
        stopping: bool,
        why: str = "intake unavailable",
    ) -> None:
        """Keep ``batch`` in hand (unacked, no delivery attempt spent) and pause."""
        self._pending[:0] = batch
        self._first_pending_at = time.monotonic()
        if stopping:
            self._give_back(channel)
        else:
            self._pause(why)

    def _give_back(self, channel: Any) -> None:
        if self._pending:
            _requeue_up_to(channel, self._pending[-1].delivery_tag)
            self._pending.clear()

    def _pause(self, why: str) -> None:
        log.warning("%s; pausing %.0f s before the next batch", why, self._backoff)
        self._resume_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)

    def _one_by_one(self, channel: Any, batch: list[InboundMessage], *, stopping: bool) -> int:
        """Settle ``batch`` message by message (in delivery order); return how many were taken."""
        taken = failures_in_a_row = 0
        for index, message in enumerate(batch):
            outcome = self._try([message])
            if outcome == _TAKEN and self._deferred:
                self._deferred = []
                self._hold(channel, batch[index:], stopping=stopping, why="at capacity")
                return taken
            if outcome == _TAKEN:
                self._ack(channel, [message])
                taken += 1
                failures_in_a_row = 0
                continue
            if outcome == _UNAVAILABLE:
                self._hold(channel, batch[index:], stopping=stopping)
                return taken
            failures_in_a_row += 1
            if failures_in_a_row >= 2 and not taken:
                # Not one poison message: everything fails. Give the rest back at once.
                _requeue_up_to(channel, batch[-1].delivery_tag)
                return taken
            # Requeued alone: if it is poison, the delivery limit dead-letters it.
            channel.basic_reject(message.delivery_tag, requeue=True)
        return taken

    def _try(self, batch: list[InboundMessage]) -> str:
        try:
            deferred = self._handle_batch(batch) or []
        except IntakeUnavailable as exc:
            log.warning("intake unavailable (%s)", exc)
            return _UNAVAILABLE
        except Exception:
            log.exception("intake failed on a batch of %d message(s)", len(batch))
            return _FAILED
        self._deferred = deferred
        return _TAKEN

    @staticmethod
    def _ack(channel: Any, batch: list[InboundMessage]) -> None:
        # Batches are settled in delivery order, so every earlier delivery is already
        # settled and one multiple-ack covers exactly this batch.
        channel.basic_ack(batch[-1].delivery_tag, multiple=True)

    def _set_connected(self, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        if self._on_connection_change is not None:
            self._on_connection_change(connected)
