"""The relay's two connections that are not its rows' (worker.daemon.relay): its AMQP
connection with a confirm-mode channel (purpose ``publish``), and the PostgreSQL
connection it sleeps on, LISTENing for ``outbox.enqueue``'s NOTIFY."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import Any

import psycopg
from kombu.exceptions import OperationalError

from worker.broker import connection, declare_topology, ensure_connected, release
from worker.settings import Settings
from worker.store import outbox

Confirm = Callable[[int, bool], None]
Returned = Callable[[Exception, str, str, Any], None]


class BrokerLink:
    """One AMQP connection and one confirm-mode channel on it, opened when first asked for.

    ``on_ack``/``on_nack``/``on_return`` are the channel's confirm callbacks (run inside
    ``drain_events``, on the caller's thread); ``on_connection_change`` hears of the
    connection coming and going (readiness)."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_ack: Confirm,
        on_nack: Confirm,
        on_return: Returned,
        on_connection_change: Callable[[bool], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_ack = on_ack
        self._on_nack = on_nack
        self._on_return = on_return
        self._on_connection_change = on_connection_change
        self._conn: Any = None  # kombu Connection (untyped)
        self._channel: Any = None
        self._next_seq = 1
        self._connected: bool | None = None

    def connection(self) -> Any:
        if self._conn is None:
            raise OperationalError("relay is not connected")
        return self._conn

    def next_seq(self) -> int:
        """The confirm sequence number of the channel's next publish."""
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def channel(self) -> Any:
        if self._channel is not None:
            return self._channel
        if self._conn is None:
            conn = ensure_connected(connection(self._settings, purpose="publish"))
            # Declared so that the exchanges published to exist: publishing to a missing
            # exchange closes the channel, and the round would fail forever.
            declare_topology(conn, self._settings)
            self._conn = conn
        channel = self.connection().channel()
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        channel.confirm_select()
        self._channel = channel
        self._next_seq = 1
        self._set_connected(True)
        return channel

    def drop(self, *, broken: bool = False) -> None:
        conn = self._conn
        self._channel = self._conn = None
        if conn is not None:
            # Closing the connection closes its channel; never a wait on a silent broker.
            with suppress(Exception):
                release(conn, broken=broken)
        self._set_connected(False)

    def keep_alive(self) -> None:
        """Read what the broker sent meanwhile and send a heartbeat when one is due: a
        broker gone away shows here."""
        if self._conn is not None:
            with suppress(TimeoutError):
                self._conn.drain_events(timeout=0.001)
            self._conn.heartbeat_check()

    def _set_connected(self, connected: bool) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        if self._on_connection_change is not None:
            self._on_connection_change(connected)


class OutboxListener:
    """A connection of its own, LISTENing on the outbox's NOTIFY channel."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._listener: psycopg.Connection[Any] | None = None

    def wait(self, timeout: float) -> None:
        """Until a NOTIFY, ``timeout`` seconds at most."""
        listener = self._ensure()
        for _ in listener.notifies(timeout=timeout, stop_after=1):
            pass

    def _ensure(self) -> psycopg.Connection[Any]:
        if self._listener is None or self._listener.closed:
            listener = psycopg.connect(
                self._settings.database_url.get_secret_value(), autocommit=True
            )
            listener.execute(f"LISTEN {outbox.NOTIFY_CHANNEL}")
            self._listener = listener
        return self._listener

    def close(self) -> None:
        if self._listener is not None:
            with suppress(Exception):
                self._listener.close()
            self._listener = None
