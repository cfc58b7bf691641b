"""``batch-worker run``: wires the loops together and owns the process's life.

Three loops, each on its own thread and its own connections:
- the jobs consumer (AMQP) hands batches of requests to intake (one DB transaction each);
- the engine claims due jobs and drives them through the API;
- the relay publishes the outbox with publisher confirms.
SIGTERM stops intake first (no new work), then lets the engine finish the step in hand and
hand the rest back, then lets the relay flush, all within ``GRACE_PERIOD``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from urllib.parse import urlsplit

import psycopg
from psycopg_pool import PoolTimeout

from worker import db, outbox
from worker.api.client import BatchClient
from worker.consumer import JobsConsumer
from worker.engine import Engine
from worker.events import OutboxMessage
from worker.health import Health, ProbeServer
from worker.intake import Intake
from worker.metrics import Metrics
from worker.redact import register_secret
from worker.relay import Relay
from worker.settings import Settings
from worker.tiles import TileReader

log = logging.getLogger(__name__)

# A loop thread is alive if it has not exited; the supervisor beats for it this often.
_SUPERVISE_EVERY = 1.0
_LIVENESS_ALLOWANCE = 10.0
_GAUGES_EVERY = 5.0


@dataclass
class _Loop:
    name: str
    target: Callable[[], None]
    stop: Callable[[], None]
    thread: threading.Thread | None = None


@dataclass
class _Connections:
    """Readiness needs both AMQP connections: the consumer's and the relay's."""

    health: Health
    metrics: Metrics
    up: dict[str, bool] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def callback(self, name: str) -> Callable[[bool], None]:
        self.up[name] = False

        def changed(connected: bool) -> None:
            with self.lock:
                self.up[name] = connected
                ready = all(self.up.values())
            self.health.set_ready(ready)
            self.metrics.broker_connected(ready)
            log.info("broker connection %s %s", name, "up" if connected else "down")

        return changed


def register_settings_secrets(settings: Settings) -> None:
    """Every secret the settings hold is masked wherever it might appear in text."""
    register_secret(settings.client_secret.get_secret_value())
    for url in (settings.broker_url, settings.database_url):
        password = urlsplit(url.get_secret_value()).password
        if password:
            register_secret(password)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.health = Health()
        self._stopping = threading.Event()

    def run(self) -> int:
        settings = self.settings
        register_settings_secrets(settings)
        probes = ProbeServer(self.metrics, self.health, port=settings.metrics_port)
        probes.start()
        log.info(
            "batch-worker starting",
            extra={"fleet_id": settings.fleet_id, "worker": settings.worker_name},
        )
        pool = db.open_pool(settings, min_size=2, max_size=16)
        try:
            db.ensure_schema(pool)
            return self._run_loops(pool)
        finally:
            pool.close()
            probes.stop()
            log.info("batch-worker stopped")

    def _run_loops(self, pool: db.Pool) -> int:
        settings = self.settings
        connections = _Connections(self.health, self.metrics)
        client = BatchClient.from_settings(settings, hooks=self.metrics.api_hooks())
        intake = Intake(settings, pool, metrics=self.metrics)
        consumer = JobsConsumer(
            settings, intake.handle_batch, on_connection_change=connections.callback("consumer")
        )
        relay = Relay(
            settings,
            pool,
            on_published=self._count_published,
            on_connection_change=connections.callback("relay"),
        )
        engine = Engine(
            settings,
            pool,
            client,
            tiles=TileReader(metrics=self.metrics),
            metrics=self.metrics,
            worker_name=settings.worker_name,
        )
        # Stopping order matters: intake first (no new work), engine next, relay last so
        # that the events of the last steps are flushed.
        loops = [
            _Loop("consumer", consumer.run, consumer.request_stop),
            _Loop("engine", engine.run, engine.request_stop),
            _Loop("relay", relay.run, relay.request_stop),
        ]
        self._install_signal_handlers()
        for loop in loops:
            self.health.register(loop.name, _LIVENESS_ALLOWANCE)
            loop.thread = threading.Thread(target=self._guard(loop), name=loop.name, daemon=True)
            loop.thread.start()
        failed = False
        next_gauges = 0.0
        try:
            while not self._stopping.wait(_SUPERVISE_EVERY):
                for loop in loops:
                    if loop.thread is not None and loop.thread.is_alive():
                        self.health.beat(loop.name)
                    else:
                        # Fail fast: the durable state makes a restart lose nothing, and a
                        # half-alive worker would hold leases it cannot serve.
                        log.error("loop %s stopped unexpectedly; shutting down", loop.name)
                        failed = True
                        self.stop()
                if time.monotonic() >= next_gauges:
                    next_gauges = time.monotonic() + _GAUGES_EVERY
                    self._sample_outbox(pool)
        finally:
            self._shutdown(loops)
            client.close()
        return 1 if failed else 0

    def _sample_outbox(self, pool: db.Pool) -> None:
        try:
            with pool.connection(timeout=2) as conn:
                self.metrics.outbox_pending(outbox.pending_count(conn))
        except (psycopg.Error, PoolTimeout) as exc:  # the relay reports DB trouble itself
            log.debug("could not sample the outbox (%s)", type(exc).__name__)

    def _count_published(self, message: OutboxMessage) -> None:
        # Events only: reply_to copies and dead letters are not events of their own.
        if message.exchange == self.settings.events_exchange:
            self.metrics.event_published(str(message.properties.get("type", "")))

    def _guard(self, loop: _Loop) -> Callable[[], None]:
        def target() -> None:
            try:
                loop.target()
            except Exception:
                # A dead loop turns /healthz red so the pod is restarted; the durable state
                # makes the restart lose nothing.
                log.exception("loop %s died", loop.name)

        return target

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded (the demo, tests): the owner calls stop()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        self.health.set_shutting_down()
        self._stopping.set()

    def _shutdown(self, loops: list[_Loop]) -> None:
        deadline = time.monotonic() + self.settings.grace_period
        for loop in loops:
            loop.stop()
            if loop.thread is not None:
                loop.thread.join(max(0.0, deadline - time.monotonic()))
                if loop.thread.is_alive():
                    log.warning("loop %s did not stop within the grace period", loop.name)
