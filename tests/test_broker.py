"""Connections: heartbeat, TLS options, names per purpose; the definitions command."""

from __future__ import annotations

import socket
import ssl
import struct
from contextlib import suppress
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit, urlunsplit

import kombu.exceptions
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
@pytest.mark.broker
def test_negotiated_heartbeat_and_client_properties(broker_url: str) -> None:
    settings = Settings(broker_url=broker_url, heartbeat=9, worker_name="w-hb")
    conn = broker.ensure_connected(broker.connection(settings, purpose="consume"))
    try:
        assert conn.connection.heartbeat == 9
        assert conn.connection.client_properties["connection_name"] == "batch-worker w-hb consume"
    finally:
        conn.release()


# -- a failover list (BROKER_URL with a cluster's nodes) -----------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: a connection there is refused, as by a node that is down


@pytest.mark.integration
@pytest.mark.broker
def test_a_node_that_is_down_is_passed_over_for_the_next(broker_url: str) -> None:
    parts = urlsplit(broker_url)
    down = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{_closed_port()}")
    settings = Settings(broker_url=f"{urlunsplit(down)};{broker_url}", worker_name="w-failover")
    conn = broker.ensure_connected(broker.connection(settings, purpose="consume"))
    try:
        assert conn.connected
        assert conn.port == (parts.port or 5672)
    finally:
        conn.release()


def _certificates(folder: Path, ip: str) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate it signed for the IP address ``ip`` alone."""
    from datetime import UTC, datetime, timedelta
    from ipaddress import ip_address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(text: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    now = datetime.now(UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder(subject_name=name("test ca"), issuer_name=name("test ca"))
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    cert = (
        x509.CertificateBuilder(subject_name=name(ip), issuer_name=ca.subject)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip_address(ip))]), False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_after_a_failover_tls_checks_the_next_nodes_own_name(tmp_path: Path) -> None:
    """The first node (127.0.0.1) is down; the second (127.0.0.2, a TLS listener whose
    certificate names 127.0.0.2 only) must be checked against its own name."""
    import threading

    ca, cert, key = _certificates(tmp_path, "127.0.0.2")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.2", 0))
    port = listener.getsockname()[1]
    handshakes: list[str] = []

    def serve() -> None:
        with listener:
            listener.settimeout(10)
            with suppress(OSError):
                raw, _ = listener.accept()
                with raw:
                    try:
                        with context.wrap_socket(raw, server_side=True):
                            handshakes.append("ok")  # then closed: no AMQP spoken here
                    except ssl.SSLError as exc:
                        handshakes.append(exc.reason or "refused")

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    settings = Settings(
        broker_url=f"amqps://u:p@127.0.0.1:{_closed_port()}//;amqps://u:p@127.0.0.2:{port}//",
        broker_ca_file=ca,
    )
    conn = broker.connection(settings, purpose="test")
    with pytest.raises(Exception):  # noqa: B017 - the listener speaks no AMQP after TLS
        conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
    server.join(10)
    assert handshakes == ["ok"]
    assert conn.ssl["server_hostname"] == "127.0.0.2"


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


PASSWORD = "pw-Zq81x-never-shown"


@pytest.mark.parametrize(
    ("url", "target"),
    [
        (
            f"amqp://worker:{PASSWORD}@rabbit.example:5672//",
            'rabbit.example:5672 vhost "/" (no TLS)',
        ),
        # kombu's defaults: vhost "/" when none is given, port 5671 with TLS
        ("amqp://rabbit.example", 'rabbit.example:5672 vhost "/" (no TLS)'),
        (f"amqps://u:{PASSWORD}@rabbit.example/prod", 'rabbit.example:5671 vhost "prod" (TLS)'),
        ("amqps://rabbit.example:5000/%2Fprod", 'rabbit.example:5000 vhost "/prod" (TLS)'),
        ("amqp://u@[::1]:5673//", '[::1]:5673 vhost "/" (no TLS)'),
        (
            f"amqp://u:{PASSWORD}@a.example//;amqps://u:{PASSWORD}@b.example/prod",
            'a.example:5672 vhost "/" (no TLS) or b.example:5671 vhost "prod" (TLS)',
        ),
    ],
)
def test_the_target_names_each_host_its_vhost_and_tls_never_the_credentials(
    url: str, target: str
) -> None:
    assert broker.broker_target(url) == target


def _connect_error(url: str) -> BaseException:
    conn = broker.connection(Settings(broker_url=url), purpose="test")
    try:
        conn.ensure_connection(max_retries=1, interval_start=0.01)
    except Exception as exc:
        return exc
    finally:
        conn.release()
    raise AssertionError(f"connected to {url}")


def test_a_broker_that_is_down_is_named_with_every_host_tried() -> None:
    # Nothing listens on ports 1 and 2 of this machine.
    url = f"amqp://guest:{PASSWORD}@127.0.0.1:1//;amqp://guest:{PASSWORD}@127.0.0.1:2/prod"

    text = broker.broker_problem(url, _connect_error(url))

    assert text == (
        'cannot reach RabbitMQ at 127.0.0.1:1 vhost "/" (no TLS) or 127.0.0.1:2 vhost "prod"'
        " (no TLS): [Errno 111] Connection refused"
    )


@pytest.mark.integration
@pytest.mark.broker
def test_a_refused_login_names_the_broker_and_the_user_not_the_password(broker_url: str) -> None:
    parts = urlsplit(broker_url)
    url = urlunsplit(parts._replace(netloc=f"guest:{PASSWORD}@{parts.hostname}:{parts.port}"))

    text = broker.broker_problem(url, _connect_error(url))

    assert text.startswith(
        f'RabbitMQ at {parts.hostname}:{parts.port} vhost "/" (no TLS) refused the login'
        " of user 'guest': ACCESS_REFUSED"
    )
    assert PASSWORD not in text


def test_retrying_to_connect_logs_what_it_tries(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(broker.CONNECT_RETRY, "max_retries", 1)
    monkeypatch.setitem(broker.CONNECT_RETRY, "interval_start", 0.01)
    settings = Settings(broker_url=f"amqp://guest:{PASSWORD}@127.0.0.1:1/jobs")

    with (
        caplog.at_level("WARNING", logger="worker.broker"),
        pytest.raises(kombu.exceptions.OperationalError),
    ):
        broker.ensure_connected(broker.connection(settings, purpose="publish"))

    assert [r.getMessage() for r in caplog.records] == [
        'cannot reach RabbitMQ at 127.0.0.1:1 vhost "jobs" (no TLS): [Errno 111] Connection'
        " refused; retrying in 0.0 s"
    ]
