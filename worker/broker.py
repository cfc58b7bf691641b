"""Connections to RabbitMQ, and the topology they declare.

One connection per purpose (``consume``, ``publish``): RabbitMQ applies flow control to
publishing connections only, so a blocked relay must not stall the consumer's acks or its
heartbeats. Every connection carries a heartbeat (kombu's default is off, DESIGN-NOTES) and
names itself in ``client_properties`` so operators can tell them apart in the management UI.

``batch-worker definitions [PATH]`` writes the definitions file.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from functools import lru_cache
from typing import Any

import amqp.exceptions
import kombu.exceptions
from amqp import spec as amqp_spec
from amqp.transport import TCPTransport
from kombu.connection import Connection

from worker import APP_ID
from worker.redact import redact_text
from worker.settings import Settings
from worker.wire.topology import (
    Topology,
    declare_on_channel,
    rabbitmq_major,
    topology,
    unrouted_name,
)

__all__ = [
    "CONNECT_RETRY",
    "Topology",
    "broker_major",
    "broker_problem",
    "broker_target",
    "connection",
    "connection_name",
    "declare_topology",
    "ensure_connected",
    "release",
    "topology",
    "unrouted_name",
]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
# The longest a close handshake waits for the broker's answer (see release).
CLOSE_TIMEOUT = 2.0

# kombu's ensure_connection back-off: 0.5 s, then 1.5, 2.5, ... capped at 5 s. Bounded so
# that a caller (the consumer's run loop, the relay) gets control back to notice a stop.
CONNECT_RETRY: dict[str, float] = {
    "max_retries": 5,
    "interval_start": 0.5,
    "interval_step": 1.0,
    "interval_max": 5.0,
}


def connection_name(settings: Settings, purpose: str) -> str:
    return f"{APP_ID} {settings.worker_name} {purpose}"


def _ssl_options(settings: Settings) -> dict[str, Any] | bool:
    if not settings.broker_uses_tls:
        return False
    options: dict[str, Any] = {
        "cert_reqs": ssl.CERT_REQUIRED,
        # None: kombu fills in the URL's host name, so SNI is sent and the host checked.
        "server_hostname": None,
    }
    if settings.broker_ca_file is not None:
        options["ca_certs"] = str(settings.broker_ca_file)
    if settings.broker_cert_file is not None:
        options["certfile"] = str(settings.broker_cert_file)
    if settings.broker_key_file is not None:
        options["keyfile"] = str(settings.broker_key_file)
    return options


class _FailoverConnection(Connection):
    """kombu's Connection, with the TLS host name following a failover.

    kombu fills ``server_hostname`` (SNI and the certificate's host check) in from the host
    of the first connection attempt, in the TLS options every later attempt shares: after a
    switch to the next node of a BROKER_URL list, that node's certificate was checked against
    the first node's name and refused. Each switch clears it for kombu to fill in again.
    """

    def switch(self, conn_str: str) -> None:
        super().switch(conn_str)  # type: ignore[no-untyped-call]
        if isinstance(self.ssl, dict) and "server_hostname" in self.ssl:
            self.ssl = {**self.ssl, "server_hostname": None}


def connection(settings: Settings, *, purpose: str) -> Connection:
    """A (not yet connected) kombu connection for one purpose: ``consume`` or ``publish``.

    A BROKER_URL list (``;``-separated) is kombu's failover list: each connection attempt
    goes to the next URL, round-robin; a new connection starts from the first.
    """
    return _FailoverConnection(  # type: ignore[no-untyped-call]
        settings.broker_url.get_secret_value(),
        heartbeat=settings.heartbeat,
        ssl=_ssl_options(settings),
        connect_timeout=CONNECT_TIMEOUT,
        transport_options={
            "client_properties": {
                "connection_name": connection_name(settings, purpose),
                "application": APP_ID,
                "worker": settings.worker_name,
                "purpose": purpose,
            },
        },
    )


@lru_cache(maxsize=16)
def broker_target(url: str) -> str:
    """Where a broker URL points, as kombu reads it: ``host:port vhost "/" (TLS)`` or
    ``(no TLS)``, each host of a failover URL (``amqp://a//;amqp://b//``) joined by " or ".
    No user, no password."""
    with Connection(url) as whole:
        urls = list(whole.alt) or [url]
    places = []
    for one in urls:
        with Connection(one) as conn:
            host = str(conn.hostname or "localhost")
            if ":" in host:
                host = f"[{host}]"  # an IPv6 address
            # The transport's defaults, as kombu connects: amqps:// turns TLS on, port 5671.
            defaults = conn.transport.default_connection_params
            port = conn.port or defaults["port"]
            tls = bool(conn.ssl)
            vhost = conn.virtual_host
        places.append(f'{host}:{port} vhost "{vhost}" ({"TLS" if tls else "no TLS"})')
    return " or ".join(places)


def _connection_url(conn: Connection) -> str:
    """The URL a kombu connection was made from, all its hosts (the password masked)."""
    return ";".join(conn.alt) if conn.alt else str(conn.as_uri())


def broker_problem(url: str, exc: BaseException) -> str:
    """One line for a failed broker connection, naming what was tried (never a password)."""
    where = broker_target(url)
    # The broker's own words (ACCESS_REFUSED - ...), without py-amqp's frame numbers.
    text = redact_text(str(getattr(exc, "reply_text", "") or exc)) or type(exc).__name__
    if isinstance(exc, amqp.exceptions.AccessRefused):
        with Connection(url) as conn:
            user = conn.userid
        return f"RabbitMQ at {where} refused the login of user {user!r}: {text}"
    if isinstance(exc, OSError | kombu.exceptions.OperationalError):
        return f"cannot reach RabbitMQ at {where}: {text}"
    return f"RabbitMQ at {where}: {text}"


def ensure_connected(conn: Connection) -> Connection:
    """Connect with bounded retries; raises the last connection error past them."""

    def _on_error(exc: Exception, interval: float) -> None:
        log.warning("%s; retrying in %.1f s", broker_problem(_connection_url(conn), exc), interval)

    conn.ensure_connection(_on_error, **CONNECT_RETRY)
    return conn


def release(conn: Connection, *, broken: bool = False) -> None:
    """Close ``conn`` without ever waiting long on a broker that stopped answering.

    kombu's ``release()`` closes channels and the connection with handshakes that wait for
    the broker's answer with no time limit: on a node that hangs, or behind a network path
    that drops its packets, for good (a frozen cluster node held a worker's consumer and
    relay in ``channel.close``: bench/bench_cluster.py --freeze). ``broken``: the connection
    failed already, the socket is dropped with no handshake; otherwise the handshake gets
    CLOSE_TIMEOUT (the socket's own timeout), then the socket is dropped.
    """
    raw = getattr(conn, "_connection", None)  # not .connection: that would connect
    if raw is None:
        conn.release()  # nothing open: no handshake to wait for
        return
    if not broken:
        sock = getattr(getattr(raw, "transport", None), "sock", None)
        if sock is not None:
            with suppress(OSError):
                sock.settimeout(CLOSE_TIMEOUT)
        try:
            conn.release()
        except Exception:  # whatever the handshake ran into, the socket goes below
            log.debug("broker connection closed without its handshake", exc_info=True)
        else:
            return
    conn.collect()


def broker_major(conn: Connection) -> int:
    """The major version of the RabbitMQ that ``conn`` is connected to (connects)."""
    return rabbitmq_major(getattr(conn.connection, "server_properties", None))


def declare_topology(conn: Connection, settings: Settings) -> None:
    """Declare the whole topology on ``conn`` (idempotent; matches the definitions file
    of the broker's major version)."""
    declare_on_channel(conn.default_channel, topology(settings, rabbitmq=broker_major(conn)))


# -- py-amqp under the consumer: reads, timeouts, settling many at once -----------------

# Bytes py-amqp may take from the socket per read (see read_ahead).
READ_AHEAD_BYTES = 16_384


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


@contextmanager
def socket_timeout(transport: Any, seconds: float) -> Iterator[None]:
    """The socket's timeout set once for a run of drains.

    py-amqp sets the timeout a drain asks for around each frame it reads, and puts the old
    one back after: two system calls a frame, six a delivery, unless the socket already has
    that timeout. Writes (acks) still find the socket as it was (blocking).
    """
    sock = getattr(transport, "sock", None)
    before = sock.gettimeout() if sock is not None else seconds
    if before != seconds:
        sock.settimeout(seconds)  # type: ignore[union-attr]
    try:
        yield
    finally:
        if before != seconds:
            with suppress(OSError):  # the connection may have closed meanwhile
                sock.settimeout(before)  # type: ignore[union-attr]


def buffered(transport: Any) -> bool:
    """Bytes read from the socket and not yet taken as frames."""
    return bool(getattr(transport, "_read_buffer", None))


def requeue_up_to(channel: Any, delivery_tag: int) -> None:
    """basic.nack(multiple, requeue): every unsettled delivery up to ``delivery_tag``.

    py-amqp has no ``basic_nack`` for consumers; the frame is RabbitMQ's extension.
    """
    channel.send_method(amqp_spec.Basic.Nack, "Lbb", (delivery_tag, True, True))
