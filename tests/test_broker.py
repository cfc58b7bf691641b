"""Connections: heartbeat, TLS options, names per purpose; the definitions command."""

from __future__ import annotations

import socket
import ssl
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
from amqp.transport import TCPTransport

from worker import broker
from worker.settings import Settings


def test_connection_sets_heartbeat_and_names_its_purpose() -> None:
    settings = Settings(heartbeat=7, worker_name="w-1")
    conn = broker.connection(settings, purpose="publish")
    assert conn.heartbeat == 7
    props = conn.transport_options["client_properties"]
    assert props["connection_name"] == "batch-worker w-1 publish"
    assert props["purpose"] == "publish"
    assert not conn.ssl


def test_amqps_uses_tls_with_the_configured_files(tmp_path: Path) -> None:
    files = {}
    for name in ("ca", "cert", "key"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("-", encoding="utf-8")
    settings = Settings(
        broker_url="amqps://u:p@rabbit.example:5671/vh",
        broker_ca_file=files["ca"],
        broker_cert_file=files["cert"],
        broker_key_file=files["key"],
    )
    conn = broker.connection(settings, purpose="consume")
    assert conn.ssl["ca_certs"] == str(files["ca"])
    assert conn.ssl["certfile"] == str(files["cert"])
    assert conn.ssl["keyfile"] == str(files["key"])
    assert conn.ssl["cert_reqs"] == ssl.CERT_REQUIRED
    assert "p@" not in conn.as_uri()  # kombu masks the password when showing the URL


@pytest.mark.integration
def test_negotiated_heartbeat_and_client_properties(broker_url: str) -> None:
    settings = Settings(broker_url=broker_url, heartbeat=9, worker_name="w-hb")
    conn = broker.ensure_connected(broker.connection(settings, purpose="consume"))
    try:
        assert conn.connection.heartbeat == 9
        assert conn.connection.client_properties["connection_name"] == "batch-worker w-hb consume"
    finally:
        conn.release()


# -- py-amqp under the consumer -------------------------------------------------------


def _frame(channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", 3, channel, len(payload)) + payload + b"\xce"


def test_read_ahead_takes_whole_chunks_and_still_reads_frame_by_frame() -> None:
    mine, peer = socket.socketpair()
    with mine, peer:
        transport = TCPTransport("127.0.0.1:5672")
        transport.sock, transport._quick_recv = mine, mine.recv
        asked: list[int] = []
        real_recv = mine.recv

        class Counting:
            def recv(self, n: int) -> bytes:
                asked.append(n)
                return real_recv(n)

        transport.sock = Counting()  # type: ignore[assignment]
        assert broker.read_ahead(SimpleNamespace(transport=transport), size=4096)
        transport.sock = mine  # read_ahead took the counting recv; timeouts need the socket
        payloads = [bytes([n]) * (100 + 700 * n) for n in range(5)]  # up to 2.9 KB
        peer.sendall(b"".join(_frame(n, p) for n, p in enumerate(payloads)))
        assert [transport.read_frame() for _ in payloads] == [
            (3, n, p) for n, p in enumerate(payloads)
        ]
        assert all(n >= 4096 for n in asked)
        assert len(asked) < 3 * len(payloads) / 2  # exact reads: three per frame

        # A frame cut short by a timeout is kept whole for the next read.
        frame = _frame(7, b"x" * 5000)
        peer.sendall(frame[:3000])
        with pytest.raises(socket.timeout), transport.having_timeout(0.05):
            transport.read_frame()
        peer.sendall(frame[3000:] + _frame(8, b"next"))
        with transport.having_timeout(1.0):
            assert transport.read_frame() == (3, 7, b"x" * 5000)
            assert transport.read_frame() == (3, 8, b"next")


def test_read_ahead_leaves_other_transports_alone() -> None:
    assert not broker.read_ahead(SimpleNamespace(transport=object()))
    assert not broker.read_ahead(object())


def test_a_run_of_drains_sets_the_socket_timeout_once_and_puts_it_back() -> None:
    left, right = socket.socketpair()
    try:
        transport = SimpleNamespace(sock=left)
        with broker.socket_timeout(transport, 0.25):
            assert left.gettimeout() == 0.25
        assert left.gettimeout() is None  # writes (acks) block as before
        left.settimeout(0.25)
        with broker.socket_timeout(transport, 0.25):
            pass
        assert left.gettimeout() == 0.25
        left.settimeout(None)
        with broker.socket_timeout(transport, 0.5):
            left.close()  # the connection went away meanwhile: nothing to put back
        with broker.socket_timeout(SimpleNamespace(sock=None), 0.5):
            pass
    finally:
        left.close()
        right.close()
