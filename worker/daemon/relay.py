"""The relay: publishes the outbox with publisher confirms, then deletes what was confirmed.

One round: take the relay lock, claim up to ``batch_size`` rows in id order, publish them on
a confirm-mode channel with many in flight (waiting for each confirm in turn caps near
1.7k msgs/s, ENVIRONMENT-NOTES), and delete the acked rows as their confirms arrive, one
transaction per chunk. At most ``chunk_size`` rows are ever published and not yet deleted:
the window is refilled as chunks are deleted. Rows not acked (nacked, or no answer within
the timeout) stay for the next round. Delivery is at-least-once: a relay killed mid-round
republishes at most ``chunk_size`` rows (consumers drop an event id already seen).

Relays of several processes take turns through a transaction-scoped advisory lock, held
on its own connection for the whole round while the chunks' deletes commit on another, so
the outbox is published in one id order fleet-wide and one job's events never overtake each
other. A killed relay's lock goes with its connection.

A row the broker refuses on its own account (it closes the channel on it: a ``user_id``
that is not the relay's login, a bad ``reply_to``; or it nacks it) must not hold back the
rows behind it. The rows in flight when the broker refused one become *suspects*: the next
rounds publish them one at a time, each waiting for its confirm, so a refusal is pinned on
the one row that drew it. Each such refusal is counted on the row (``attempts``); at
``OUTBOX_MAX_ATTEMPTS`` the row is parked (kept, skipped, listed by ``batch-worker outbox
parked``) and the rows behind it go on. Timeouts and lost connections are the broker's or
the network's, never counted against a row.

The relay sleeps on PostgreSQL LISTEN (``outbox.enqueue`` NOTIFYs at commit) and polls
every second as a fallback. Its AMQP connection is its own (purpose ``publish``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import amqp
import psycopg
from kombu.exceptions import OperationalError
from psycopg_pool import ConnectionPool

from worker.broker import broker_problem
from worker.daemon.relay_flight import Flight, amqp_message
from worker.daemon.relay_link import BrokerLink, OutboxListener
from worker.settings import Settings
from worker.store import db, outbox
from worker.wire.outgoing import OutboxMessage

log = logging.getLogger(__name__)

# pg_try_advisory_xact_lock key: the bytes of "bw_outbx" read as a big-endian int64.
RELAY_LOCK_KEY = int.from_bytes(b"bw_outbx", "big")
POLL_SECONDS = 1.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0
# Without a confirm for this long, the round ends; its unconfirmed rows wait for the next.
CONFIRM_TIMEOUT = 30.0
BATCH_SIZE = 1000
# Rows published and not yet deleted, at most: what a kill republishes. Measured with
# bench/bench_relay.py against one delete per 1,000-row round (docs/performance.md).
CHUNK_SIZE = 100


class _Unsettled(Exception):
    """Some publishes of a round were nacked or not answered in time."""


# The broker closed the channel over what was published on it (403, 404, 406, 311...), or
# the connection with a hard error (a direct reply-to name that decodes to no process
# draws 541 INTERNAL_ERROR): the message's doing, unlike a connection lost, a broker
# shutting down (320, recoverable) or a confirm that never came.
_REFUSALS = (amqp.exceptions.ChannelError, amqp.exceptions.IrrecoverableConnectionError)


_AMQP_ERRORS = (
    amqp.exceptions.AMQPError,  # connection and channel errors both
    OperationalError,  # kombu, once its connect retries are exhausted
    OSError,
    _Unsettled,
)


class Relay:
    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool[Any],
        *,
        on_published: Callable[[OutboxMessage], None] | None = None,
        on_connection_change: Callable[[bool], None] | None = None,
        on_progress: Callable[[], None] | None = None,
        on_outbox_progress: Callable[[], None] | None = None,
        on_parked: Callable[[int, str], None] | None = None,
        batch_size: int = BATCH_SIZE,
        chunk_size: int = CHUNK_SIZE,
        confirm_timeout: float = CONFIRM_TIMEOUT,
    ) -> None:
        """``on_progress`` is called each time round and after each chunk (the daemon's
        liveness watch, worker/daemon/health.py). ``on_outbox_progress`` only when the
        outbox moved on: rows published or parked, nothing to publish (or another relay's
        turn), or no broker or database to reach (readiness shows those, and a restart
        would not bring them back); a relay that goes round with rows and moves none of
        them does not call it (the ``relay-outbox`` liveness bound). ``on_parked`` is
        called with a row's id and the broker's reason when it is parked."""
        if batch_size < 1 or chunk_size < 1:
            raise ValueError("batch_size and chunk_size must be positive")
        self._settings = settings
        self._pool = pool
        self._on_published = on_published
        self._on_progress = on_progress or (lambda: None)
        self._on_outbox_progress = on_outbox_progress or (lambda: None)
        self._on_parked = on_parked
        self._max_attempts = settings.outbox_max_attempts
        # Rows in flight when the broker last refused one: published one at a time until
        # each has been confirmed or parked.
        self._suspects: set[int] = set()
        self._reaching = False  # connecting to the broker (a failure then is an outage)
        self._pinned = False  # the last refusal was counted on the one row that drew it
        self._batch_size = batch_size
        self._chunk_size = chunk_size
        self._confirm_timeout = confirm_timeout
        self._stop = threading.Event()
        self._flight = Flight()
        self._link = BrokerLink(
            settings,
            on_ack=self._on_ack,
            on_nack=self._on_nack,
            on_return=self._on_return,
            on_connection_change=on_connection_change,
        )
        self._listener = OutboxListener(settings)

    def request_stop(self) -> None:
        """Thread-safe: finish the round in hand (publish, confirm, delete), then return."""
        self._stop.set()

    def run(self) -> None:
        backoff = BACKOFF_FIRST
        try:
            while not self._stop.is_set():
                self._on_progress()
                try:
                    moved = self.relay_once()
                    if moved < self._batch_size:
                        # Waiting reads the connection too: a broker gone away shows here.
                        self._wait_for_work()
                except _AMQP_ERRORS as exc:
                    if self._reaching:
                        self._on_outbox_progress()  # an outage: readiness says so
                    log.warning(
                        "relay: %s; retrying",
                        broker_problem(self._settings.broker_url.get_secret_value(), exc),
                    )
                    self._drop_channel(broken=True)
                    if self._pinned:
                        # The broker is well: it refused one row, now counted on it. Backing
                        # off would hold every row behind it for minutes before the row is
                        # parked (15 s a refusal, measured); the next try comes at once.
                        self._pinned = False
                        backoff = BACKOFF_FIRST
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                except psycopg.Error as exc:
                    self._on_outbox_progress()  # no database: not this relay's to cure
                    log.warning("relay: database unavailable (%s)", type(exc).__name__)
                    self._close_listener()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                except Exception:
                    # A bug must not end the relay for good: the rows stay, it tries again.
                    log.exception("relay round failed unexpectedly")
                    self._drop_channel()
                    self._stop.wait(BACKOFF_MAX)
                    continue
                backoff = BACKOFF_FIRST
        finally:
            self.close()

    def close(self) -> None:
        """Close the relay's connections (``run`` does it on return)."""
        self._drop_channel()
        self._close_listener()

    # -- one round ------------------------------------------------------------------

    def relay_once(self) -> int:
        """Publish one claimed batch; return how many rows it held (0: nothing to do)."""
        self._reaching = True
        channel = self._ensure_channel()
        self._reaching = False
        with self._pool.connection() as conn:
            # This connection's transaction holds the lock (and nothing else) all round.
            locked = conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s)", (RELAY_LOCK_KEY,)
            ).fetchone()
            if not locked or not locked[0]:
                self._on_outbox_progress()
                return 0  # another relay is publishing; it will get to these rows
            claimed = outbox.claim(conn, self._batch_size)
            # Suspects another relay published, or an operator dropped, are no longer ours.
            self._suspects &= {row_id for row_id, _ in claimed}
            if not claimed:
                self._on_outbox_progress()
                return 0
            try:
                with self._pool.connection() as marker:
                    if self._suspects:
                        return self._publish_suspects(channel, claimed, marker)
                    try:
                        flight = self._publish(channel, claimed, marker)
                    except _REFUSALS:
                        self._suspect(self._flight)
                        raise
            finally:
                # A row this large left libpq's read buffer as large, for the connection's
                # life (store/db.py): a fresh one next round. Nothing was written on this
                # connection, and closing it lets the lock go, as its commit would have.
                if any(len(message.body) > db.LARGE_MESSAGE_BYTES for _, message in claimed):
                    db.discard(conn)
        unsettled = len(claimed) - len(flight.deleted)
        if unsettled:
            if flight.nacked:
                self._suspect(flight)
            raise _Unsettled(f"{unsettled} publish(es) not confirmed")
        return len(claimed)

    def _suspect(self, flight: Flight) -> None:
        """The rows of ``flight`` the broker did not ack: one of them drew its refusal."""
        self._suspects.update(flight.rows[seq][0] for seq in (*flight.unsettled, *flight.nacked))

    def _publish_suspects(
        self,
        channel: Any,
        claimed: Sequence[tuple[int, OutboxMessage]],
        marker: psycopg.Connection[Any],
    ) -> int:
        """Publish the suspects among ``claimed`` one by one, in id order, each confirmed
        before the next: a refusal now is that row's, counted on it (and parks it at
        ``OUTBOX_MAX_ATTEMPTS``). Raises as a round does on a refusal, so the relay backs
        off and reconnects before the next try."""
        done = 0
        for row in claimed:
            if row[0] not in self._suspects:
                continue
            flight = self._flight = Flight()
            seq = self._link.next_seq()
            flight.add(seq, row)
            try:
                self._basic_publish(channel, row[1])
                confirmed = self._await_confirms(flight, 0)
            except _REFUSALS as exc:
                self._refused(row[0], f"closed by the broker: {exc}", marker)
                raise
            if not confirmed:
                raise _Unsettled("a suspect publish was not confirmed in time")
            if flight.nacked:
                self._refused(row[0], "nacked by the broker", marker)
                raise _Unsettled("a suspect publish was nacked")
            self._delete_acked(flight, marker)
            self._suspects.discard(row[0])
            done += 1
        return done

    def _refused(self, row_id: int, reason: str, marker: psycopg.Connection[Any]) -> None:
        with marker.transaction():
            parked = outbox.record_refusal(marker, row_id, reason, self._max_attempts)
        self._pinned = True
        if not parked:
            log.warning("relay: outbox row %d refused by the broker (%s)", row_id, reason)
            return
        self._suspects.discard(row_id)
        log.error(
            "relay: outbox row %d parked after %d refusals (%s); the rows behind it go on"
            " (batch-worker outbox parked / replay / drop)",
            row_id,
            self._max_attempts,
            reason,
        )
        if self._on_parked is not None:
            self._on_parked(row_id, reason)
        self._on_outbox_progress()

    def _basic_publish(self, channel: Any, message: OutboxMessage) -> None:
        channel.basic_publish(
            amqp_message(message),
            exchange=message.exchange,
            routing_key=message.routing_key,
            mandatory=message.mandatory,
        )

    def _publish(
        self,
        channel: Any,
        claimed: Sequence[tuple[int, OutboxMessage]],
        marker: psycopg.Connection[Any],
    ) -> Flight:
        """Publish ``claimed`` in id order, never more than a chunk ahead of the deletes."""
        flight = self._flight = Flight()
        queue = deque(claimed)
        # A chunk is deleted once half of it is acked, so the window refills while the
        # rest of it is still in flight.
        refill_at = max(1, self._chunk_size // 2)
        while True:
            while queue and flight.in_window < self._chunk_size and not flight.nacked:
                seq = self._link.next_seq()
                row = queue.popleft()
                flight.add(seq, row)
                self._basic_publish(channel, row[1])
            if not flight.in_window:
                return flight
            want = min(refill_at, flight.in_window) if queue and not flight.nacked else 0
            if not self._await_confirms(flight, want):
                self._delete_acked(flight, marker)
                return flight  # no confirm in time: the rest waits for the next round
            self._delete_acked(flight, marker)
            if flight.nacked and not flight.outstanding:
                return flight

    def _await_confirms(self, flight: Flight, want: int) -> bool:
        """Wait until ``want`` rows are acked and not deleted (0: until nothing is
        outstanding); False when no confirm came within the timeout."""
        deadline = time.monotonic() + self._confirm_timeout
        while flight.outstanding and (not want or flight.acked_in_window < want):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            settled = flight.settled
            with suppress(TimeoutError):
                self._link.connection().drain_events(timeout=min(remaining, 1.0))
            if flight.settled > settled:
                deadline = time.monotonic() + self._confirm_timeout
        return True

    def _delete_acked(self, flight: Flight, marker: psycopg.Connection[Any]) -> None:
        """Delete the acked rows not deleted yet, in their own transaction; then report."""
        seqs = sorted(flight.acked - flight.deleted)
        if not seqs:
            return
        with marker.transaction():
            # A delete lost to a database crash only means a duplicate publish later, which
            # consumers drop: not worth waiting for the WAL flush of every chunk.
            marker.execute("SET LOCAL synchronous_commit = off")
            outbox.delete(marker, [flight.rows[seq][0] for seq in seqs])
        flight.deleted.update(seqs)
        if self._on_published is not None:
            for seq in seqs:
                if seq not in flight.returned:
                    self._on_published(flight.rows[seq][1])
        self._on_progress()
        self._on_outbox_progress()

    # -- confirm-mode callbacks (run inside drain_events, on this thread) ----------------

    def _on_ack(self, delivery_tag: int, multiple: bool) -> None:
        self._flight.settle(delivery_tag, multiple, self._flight.acked)

    def _on_nack(self, delivery_tag: int, multiple: bool) -> None:
        self._flight.settle(delivery_tag, multiple, self._flight.nacked)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        # The broker returns an unroutable mandatory publish (a reply_to queue that does not
        # exist), then acks it: the row is deleted, never retried. A return carries no
        # sequence number, so it is matched to the oldest unreturned publish like it.
        for seq, (_row_id, sent) in self._flight.rows.items():
            if (
                seq not in self._flight.returned
                and sent.mandatory
                and sent.exchange == exchange
                and sent.routing_key == routing_key
                and sent.body == message.body
            ):
                self._flight.returned.add(seq)
                break
        log.warning(
            "unroutable message dropped: exchange=%r routing_key=%r message_id=%r (%s)",
            exchange,
            routing_key,
            message.properties.get("message_id"),
            exc,
        )

    # -- connections (worker.daemon.relay_link) -----------------------------------------

    def _ensure_channel(self) -> Any:
        return self._link.channel()

    def _drop_channel(self, *, broken: bool = False) -> None:
        self._link.drop(broken=broken)

    def _wait_for_work(self) -> None:
        """Sleep until a NOTIFY, a second at most; keep the AMQP connection alive."""
        self._listener.wait(POLL_SECONDS)
        self._link.keep_alive()

    def _close_listener(self) -> None:
        self._listener.close()
