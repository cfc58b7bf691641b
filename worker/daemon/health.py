"""HTTP probes and metrics: ``/metrics``, ``/healthz``, ``/readyz`` on one port.

- ``/healthz`` (liveness) answers whether the process's loops are making progress. Each loop
  registers with a bound (its longest legitimate pause; worker/daemon/liveness.py derives
  them from the settings) and calls ``Health.beat`` each time round, idle or not. A loop
  whose thread is alive but that has not gone round within its bound is *stalled* (a read without a
  timeout, a deadlock, a database call that never returns): the probe answers 503 naming
  it, and the stall is logged once at ERROR. A broker outage does not fail it: a restart
  would not bring the broker back (DESIGN-NOTES "Kubernetes"), and loops keep going round
  while they wait to reconnect. Work done on pools of threads (the engine's job steps) is
  a loop registered ``per_thread``: a thread is busy on it from its first beat until it
  calls ``Health.idle``, the loop's age is its longest-silent busy thread's, and no thread
  busy is healthy (idle for want of work).
- ``/readyz`` (readiness) is 200 only while the broker connection is up and the process is
  not shutting down.

Served by prometheus-client's WSGI app behind the stdlib's threading WSGI server, in a
daemon thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from worker.metrics import Metrics

logger = logging.getLogger(__name__)

# How often the server thread checks for stop(): stopping is part of the SIGTERM grace period.
_SHUTDOWN_POLL = 0.1


class Health:
    """Liveness of the process's loops and readiness of the process. Thread-safe."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._bounds: dict[str, float] = {}
        self._last_beat: dict[str, float] = {}
        # Which loop a thread beat for last: API calls that thread makes count for it too.
        self._loop_of_thread: dict[int, str] = {}
        # Loops watched per busy thread, and each busy thread's loop and last progress. One
        # entry per thread, set and dropped in place: marking a step costs a dict update.
        self._per_thread: set[str] = set()
        self._busy: dict[int, tuple[str, float]] = {}
        self._reported: set[str] = set()  # stalls already logged
        self._ready = False
        self._shutting_down = False

    def register(self, name: str, bound: float, *, per_thread: bool = False) -> None:
        """Watch loop ``name``: it must beat at least every ``bound`` seconds.

        Registering counts as a first beat, so a loop has one bound to get going.
        ``per_thread``: the loop is work taken up by many threads (job steps on a pool), and
        only a busy thread must beat within ``bound``: one is busy from its first ``beat``
        until it calls ``idle``, and a loop with no thread busy is healthy.
        """
        if bound <= 0:
            raise ValueError(f"bound of loop {name!r} must be positive")
        with self._lock:
            self._bounds[name] = bound
            self._last_beat[name] = self._clock()
            if per_thread:
                self._per_thread.add(name)
            else:
                self._per_thread.discard(name)

    def unregister(self, name: str) -> None:
        """Stop watching a loop that ended on purpose (shutting down, for one)."""
        with self._lock:
            self._bounds.pop(name, None)
            self._last_beat.pop(name, None)
            self._reported.discard(name)
            self._per_thread.discard(name)
            for ident in [i for i, (loop, _) in self._busy.items() if loop == name]:
                del self._busy[ident]

    def beat(self, name: str) -> None:
        """Loop ``name`` went round, on the calling thread (for a ``per_thread`` loop: the
        calling thread made progress on it, and is busy until ``idle``). Loops never
        registered are ignored."""
        ident = threading.get_ident()
        with self._lock:
            if name not in self._bounds:
                return
            if name in self._per_thread:
                self._busy[ident] = (name, self._clock())
                return
            self._last_beat[name] = self._clock()
            self._loop_of_thread[ident] = name

    def idle(self, name: str) -> None:
        """The calling thread is done with its work on ``per_thread`` loop ``name``: it has
        nothing to make progress on until it beats again."""
        ident = threading.get_ident()
        with self._lock:
            busy = self._busy.get(ident)
            if busy is not None and busy[0] == name:
                del self._busy[ident]

    def beat_thread(self) -> None:
        """Progress for what the calling thread is doing: the ``per_thread`` loop it is
        busy on, and the loop it last beat for, if any.

        For work that happens inside one turn of a loop and may legitimately take many
        times longer than each of its parts (a status round of many API calls, each with
        its own timeout; a job's step with its saves, API calls and tile reads): each part
        counts as progress, so the bound covers one part.
        """
        ident = threading.get_ident()
        with self._lock:
            now = self._clock()
            busy = self._busy.get(ident)
            if busy is not None:
                self._busy[ident] = (busy[0], now)
            name = self._loop_of_thread.get(ident)
            if name is not None and name in self._bounds:
                self._last_beat[name] = now

    def progress(self) -> dict[str, tuple[float, float]]:
        """Per watched loop: (seconds since it last went round, its bound). A ``per_thread``
        loop's age is its longest-silent busy thread's, 0 while no thread is busy on it."""
        now = self._clock()
        with self._lock:
            last = dict(self._last_beat)
            for name in self._per_thread:
                last[name] = now
            for name, since in self._busy.values():
                if name in self._per_thread:
                    last[name] = min(last[name], since)
            return {
                name: (max(0.0, now - last[name]), bound) for name, bound in self._bounds.items()
            }

    def stalled(self) -> list[tuple[str, float, float]]:
        """The loops past their bound, by name: (name, seconds since progress, bound).

        The first time a loop is seen stalled it is logged at ERROR; a recovery at WARNING.
        """
        ages = self.progress()
        stalled = sorted((name, age, bound) for name, (age, bound) in ages.items() if age > bound)
        names = {name for name, _, _ in stalled}
        with self._lock:
            new = [entry for entry in stalled if entry[0] not in self._reported]
            recovered = sorted(self._reported - names)
            self._reported = names
        for name, age, bound in new:
            logger.error("loop %s stalled: no progress for %.0f s (bound %g s)", name, age, bound)
        for name in recovered:
            logger.warning("loop %s is making progress again", name)
        return stalled

    def liveness(self) -> tuple[bool, str]:
        """(alive, a line saying why)."""
        stalled = self.stalled()
        if stalled:
            return False, "; ".join(
                f"loop {name} stalled: no progress for {age:.0f}s (bound {bound:g}s)"
                for name, age, bound in stalled
            )
        with self._lock:
            watched = len(self._bounds)
        return True, f"ok: {watched} loops making progress"

    def set_ready(self, ready: bool) -> None:
        """Whether the broker connection is up."""
        with self._lock:
            self._ready = ready

    def set_shutting_down(self) -> None:
        """From now on the process is not ready, whatever the broker says."""
        with self._lock:
            self._shutting_down = True

    def readiness(self) -> tuple[bool, str]:
        """(ready, a line saying why)."""
        with self._lock:
            if self._shutting_down:
                return False, "shutting down"
            if not self._ready:
                return False, "broker not connected"
            return True, "ok"


def probe_app(metrics: Metrics, health: Health) -> WSGIApplication:
    """The WSGI application: ``/metrics`` from prometheus-client, the two probes here."""
    metrics_app = make_wsgi_app(metrics.registry)
    probes: dict[str, Callable[[], tuple[bool, str]]] = {
        "/healthz": health.liveness,
        "/readyz": health.readiness,
    }

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if path == "/metrics":
            body: Iterable[bytes] = metrics_app(environ, start_response)
            return body
        probe = probes.get(path)
        if probe is None:
            return _text(
                start_response, "404 Not Found", "not found: try /metrics, /healthz, /readyz"
            )
        ok, detail = probe()
        if not ok:
            # Not at WARNING: a stall is logged once at ERROR by Health, and readiness
            # fails for the whole of a broker outage, which the broker code logs.
            logger.debug("%s failing: %s", path, detail)
        status = "200 OK" if ok else "503 Service Unavailable"
        return _text(start_response, status, detail)

    return app


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = (body + "\n").encode()
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [data]


class _QuietHandler(WSGIRequestHandler):
    """Probes arrive every few seconds: their access lines go to DEBUG, not stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("probe %s: " + format, self.address_string(), *args)


class ListenError(OSError):
    """The probe server could not bind its address: taken, or not this process's to take."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror)
        self.host = host
        self.port = port


class ProbeServer:
    """Serves ``probe_app`` on ``host:port`` from a daemon thread."""

    def __init__(
        self, metrics: Metrics, health: Health, *, host: str = "0.0.0.0", port: int
    ) -> None:
        self._app = probe_app(metrics, health)
        self._host = host
        self._requested_port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve in a daemon thread. Port 0 picks a free port (see ``port``)."""
        if self._server is not None:
            raise RuntimeError("probe server already started")
        try:
            server = make_server(
                self._host,
                self._requested_port,
                self._app,
                server_class=ThreadingWSGIServer,
                handler_class=_QuietHandler,
            )
        except OSError as exc:
            raise ListenError(self._host, self._requested_port, exc) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, args=(_SHUTDOWN_POLL,), name="probe-server", daemon=True
        )
        self._thread.start()
        logger.info("serving /metrics, /healthz, /readyz on %s:%d", self._host, self.port)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("probe server not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = None
        self._thread = None
