"""A worker whose database stops answering (connections open, no bytes back) is stalled, not
dead: /healthz says so, and the worker ends itself with exit code 1.

The database sits behind a TCP proxy the test can pause: paused, it keeps every connection
open and forwards nothing, like a network path that blackholes packets. Bounds are scaled
down with LIVENESS_FACTOR so the test takes seconds, not minutes.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.daemon.conftest import CLIENT_SECRET, Stack, WorkerProcess, free_port
from worker import liveness
from worker.settings import Settings

pytestmark = pytest.mark.integration

FACTOR = 0.1  # bounds of 9 to 27 s: above any pause of a loaded test machine


class PausableProxy:
    """Forwards TCP to ``target``; while paused, reads nothing and forwards nothing."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.paused = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        with contextlib.suppress(OSError):
            while not self._closed.is_set():
                if self.paused.is_set():
                    time.sleep(0.05)  # the bytes wait in the kernel's buffers
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.1)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peer[sock].sendall(data)

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()


@pytest.fixture
def proxy(stack: Stack) -> Iterator[PausableProxy]:
    parts = urlsplit(stack.database_url)
    running = PausableProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    yield running
    running.close()


def healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:  # not listening yet, or gone
        return 0, str(exc)


def test_a_database_that_stops_answering_stalls_loops_and_the_worker_ends_itself(
    stack: Stack, proxy: PausableProxy, start_worker: type[WorkerProcess]
) -> None:
    parts = urlsplit(stack.database_url)
    proxied = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{proxy.port}"))
    port = free_port()
    grace = 3.0
    worker = start_worker(
        database_url=proxied, liveness_factor=FACTOR, metrics_port=port, grace_period=grace
    )
    bounds = liveness.progress_bounds(Settings(**_settings_of(stack), liveness_factor=FACTOR))

    # Healthy for longer than every bound: each loop (consumer, engine, poller, relay,
    # supervisor) really goes round, or it would be stalled by now.
    deadline = time.monotonic() + 30
    while healthz(port)[0] != 200:
        assert time.monotonic() < deadline, worker.log()[-3000:]
        time.sleep(0.2)
    healthy_until = time.monotonic() + max(bounds.values()) + 1
    while time.monotonic() < healthy_until:
        status, body = healthz(port)
        assert status == 200, body
        time.sleep(0.5)
    assert "ok: 5 loops making progress" in healthz(port)[1]

    proxy.paused.set()
    stalled_at = time.monotonic()
    seen: list[str] = []
    limit = stalled_at + max(bounds.values()) + grace + liveness.EXIT_MARGIN + 20
    while worker.process.poll() is None:
        assert time.monotonic() < limit, "the stalled worker did not end itself"
        status, body = healthz(port)
        if status == 503:
            seen.append(body)
        time.sleep(0.2)
    assert worker.process.returncode == 1
    assert seen, "no 503 from /healthz before the worker ended"
    assert all(" stalled: no progress for " in body for body in seen)
    assert CLIENT_SECRET not in "".join(seen)

    log = worker.log()
    assert CLIENT_SECRET not in log
    # The stall itself, logged by worker.health (the probe's own DEBUG lines quote it too).
    stall_lines = [
        line
        for line in log.splitlines()
        if '"logger": "worker.health", "message": "loop ' in line and "progress again" not in line
    ]
    assert stall_lines and all('"level": "ERROR"' in line for line in stall_lines)
    assert all("stalled: no progress for" in line for line in stall_lines)
    named = [line.split("loop ")[1].split(" ")[0] for line in stall_lines]
    assert len(named) == len(set(named)), "a stall was logged more than once"
    assert set(named) <= set(bounds)
    assert "stopping: loop(s)" in log


def _settings_of(stack: Stack) -> dict[str, object]:
    """The settings the worker's bounds depend on, as the harness sets them."""
    env = stack.env()
    return {
        "poll_interval": float(env["BATCH_WORKER_POLL_INTERVAL"]),
        "api_budget_per_minute": int(env["BATCH_WORKER_API_BUDGET_PER_MINUTE"]),
    }
