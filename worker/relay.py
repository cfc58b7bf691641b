"""The relay: publishes the outbox with publisher confirms, then deletes what was confirmed.

One round = one DB transaction: claim up to ``batch_size`` rows in id order, publish them all
on a confirm-mode channel (many in flight: waiting for each confirm in turn caps near
1.7k msgs/s, ENVIRONMENT-NOTES), wait for the broker's acks, delete the acked rows, commit.
Rows not acked (nacked, or no answer within the timeout) stay for the next round, so
delivery is at-least-once: a relay killed mid-round republishes that round's rows.

Relays of several processes take turns through a transaction-scoped advisory lock, so the
outbox is published in one id order fleet-wide and one job's events never overtake each
other; SKIP LOCKED in the claim keeps any other reader of the table apart as well.

The relay sleeps on PostgreSQL LISTEN (``outbox.enqueue`` NOTIFYs at commit) and polls
every second as a fallback. Its AMQP connection is its own (purpose ``publish``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import amqp
import psycopg
from kombu.exceptions import OperationalError
from psycopg_pool import ConnectionPool

from worker import outbox
from worker.broker import connection, declare_topology, ensure_connected
from worker.events import OutboxMessage
from worker.settings import Settings

log = logging.getLogger(__name__)

# pg_try_advisory_xact_lock key: the bytes of "bw_outbx" read as a big-endian int64.
RELAY_LOCK_KEY = int.from_bytes(b"bw_outbx", "big")
POLL_SECONDS = 1.0
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 15.0


class _Unsettled(Exception):
    """Some publishes of a round were nacked or not answered in time."""


_AMQP_ERRORS = (
    amqp.exceptions.AMQPError,  # connection and channel errors both
    OperationalError,  # kombu, once its connect retries are exhausted
    OSError,
    _Unsettled,
)


@dataclass
class _Flight:
    """Publishes of one round, keyed by the channel's confirm sequence number."""

    rows: dict[int, tuple[int, OutboxMessage]] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    nacked: set[int] = field(default_factory=set)
    returned: set[int] = field(default_factory=set)

    def settle(self, tag: int, multiple: bool, into: set[int]) -> None:
        if multiple:
            into.update(seq for seq in self.rows if seq <= tag and seq not in self.settled)
        elif tag in self.rows:
            into.add(tag)

    @property
    def settled(self) -> set[int]:
        return self.acked | self.nacked

    @property
    def outstanding(self) -> int:
        return len(self.rows) - len(self.settled)


def amqp_message(message: OutboxMessage) -> amqp.Message:
    """The py-amqp message for an outbox row (the timestamp property is int seconds)."""
    properties = dict(message.properties)
    timestamp = properties.get("timestamp")
    if isinstance(timestamp, datetime):
        properties["timestamp"] = int(timestamp.timestamp())
    if message.headers:
        properties["application_headers"] = message.headers
    return amqp.Message(message.body, **properties)


class Relay:
    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool[Any],
        *,
        on_published: Callable[[OutboxMessage], None] | None = None,
        on_connection_change: Callable[[bool], None] | None = None,
        batch_size: int = 1000,
        confirm_timeout: float = 30.0,
    ) -> None:
        self._settings = settings
        self._pool = pool
        self._on_published = on_published
        self._on_connection_change = on_connection_change
        self._batch_size = batch_size
        self._confirm_timeout = confirm_timeout
        self._stop = threading.Event()
        self._conn: Any = None  # kombu Connection (untyped)
        self._channel: Any = None
        self._next_seq = 1
        self._flight = _Flight()
        self._listener: psycopg.Connection[Any] | None = None
        self._connected: bool | None = None

    def request_stop(self) -> None:
        """Thread-safe: finish the round in hand (publish, confirm, delete), then return."""
        self._stop.set()

    def run(self) -> None:
        backoff = BACKOFF_FIRST
        try:
            while not self._stop.is_set():
                try:
                    moved = self.relay_once()
                    if moved < self._batch_size:
                        # Waiting reads the connection too: a broker gone away shows here.
                        self._wait_for_work()
                except _AMQP_ERRORS as exc:
                    log.warning("relay round failed (%s); retrying", type(exc).__name__)
                    self._drop_channel()
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                except psycopg.Error as exc:
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
        channel = self._ensure_channel()
        published: list[OutboxMessage] = []
        with self._pool.connection() as conn, conn.transaction():
            locked = conn.execute(
                "SELECT pg_try_advisory_xact_lock(%s)", (RELAY_LOCK_KEY,)
            ).fetchone()
            if not locked or not locked[0]:
                return 0  # another relay is publishing; it will get to these rows
            claimed = outbox.claim(conn, self._batch_size)
            if not claimed:
                return 0
            flight = self._publish(channel, claimed)
            done = [flight.rows[seq][0] for seq in sorted(flight.acked)]
            outbox.delete(conn, done)
            published = [flight.rows[seq][1] for seq in sorted(flight.acked - flight.returned)]
        if self._on_published is not None:
            for message in published:
                self._on_published(message)
        if len(done) < len(claimed):
            raise _Unsettled(f"{len(claimed) - len(done)} publish(es) not confirmed")
        return len(claimed)

    def _publish(self, channel: Any, claimed: Sequence[tuple[int, OutboxMessage]]) -> _Flight:
        flight = self._flight = _Flight()
        for row in claimed:
            seq = self._next_seq
            self._next_seq += 1
            flight.rows[seq] = row
            message = row[1]
            channel.basic_publish(
                amqp_message(message),
                exchange=message.exchange,
                routing_key=message.routing_key,
                mandatory=message.mandatory,
            )
        deadline = time.monotonic() + self._confirm_timeout
        while flight.outstanding:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with suppress(TimeoutError):
                self._connection().drain_events(timeout=min(remaining, 1.0))
        return flight

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

    # -- connections ------------------------------------------------------------------

    def _connection(self) -> Any:
        if self._conn is None:
            raise OperationalError("relay is not connected")
        return self._conn

    def _ensure_channel(self) -> Any:
        if self._channel is not None:
            return self._channel
        if self._conn is None:
            conn = ensure_connected(connection(self._settings, purpose="publish"))
            # Declared so that the exchanges published to exist: publishing to a missing
            # exchange closes the channel, and the round would fail forever.
            declare_topology(conn, self._settings)
            self._conn = conn
        channel = self._connection().channel()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        channel.confirm_select()
        self._channel = channel
        self._next_seq = 1
        self._set_connected(True)
        return channel

    def _drop_channel(self) -> None:
        channel, conn = self._channel, self._conn
        self._channel = self._conn = None
        if channel is not None:
            with suppress(Exception):
                channel.close()
        if conn is not None:
            with suppress(Exception):
                conn.release()
        self._set_connected(False)

    def _wait_for_work(self) -> None:
        """Sleep until a NOTIFY, a second at most; keep the AMQP connection alive."""
        listener = self._ensure_listener()
        for _ in listener.notifies(timeout=POLL_SECONDS, stop_after=1):
            pass
        if self._conn is not None:
            with suppress(TimeoutError):
                self._conn.drain_events(timeout=0.001)
            self._conn.heartbeat_check()

    def _ensure_listener(self) -> psycopg.Connection[Any]:
        if self._listener is None or self._listener.closed:
            listener = psycopg.connect(
                self._settings.database_url.get_secret_value(), autocommit=True
            )
            listener.execute(f"LISTEN {outbox.NOTIFY_CHANNEL}")
            self._listener = listener
        return self._listener

    def _close_listener(self) -> None:
        if self._listener is not None:
            with suppress(Exception):
                self._listener.close()
            self._listener = None

    def _set_connected(self, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        if self._on_connection_change is not None:
            self._on_connection_change(connected)
