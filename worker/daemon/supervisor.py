"""``batch-worker run``: wires the loops together and owns the process's life.

Loops, each on its own thread and its own connections:
- the jobs consumer (AMQP) hands batches of requests to intake (one DB transaction each);
- the status loop reads the tracked jobs' statuses and steps those that moved;
- the engine claims due jobs and drives them through the API;
- the relay publishes the outbox with publisher confirms;
- the supervisor (the main thread) samples gauges and notices a loop thread that died.
Every loop beats ``Health`` each time round; the liveness watchdog (worker/daemon/liveness.py)
stops the process, exit code 1, when one stops making progress, as when one dies.
SIGTERM stops intake first (no new work), then the status reads, then lets the engine finish
the step in hand and hand the rest back, then lets the relay flush, all within
``GRACE_PERIOD``.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from urllib.parse import urlsplit

import psycopg
from psycopg_pool import PoolTimeout

from worker.api.client import BatchClient
from worker.daemon import liveness
from worker.daemon.consumer import JobsConsumer
from worker.daemon.engine import Engine
from worker.daemon.fleet_budget import FleetBudget
from worker.daemon.followups import RetryInputWriter
from worker.daemon.health import Health, ProbeServer
from worker.daemon.inbound import InboundMessage, TakeSteps
from worker.daemon.intake import Intake, ReadBatch
from worker.daemon.liveness import Watchdog
from worker.daemon.presence import Presence
from worker.daemon.relay import Relay
from worker.daemon.status_loop import StatusLoop
from worker.daemon.tiles import TileReader
from worker.metrics import Metrics
from worker.redact import register_secret
from worker.settings import Settings
from worker.store import capacity, db, history, outbox
from worker.wire.outgoing import OutboxMessage

log = logging.getLogger(__name__)

# How often the supervisor looks at the loop threads; how often it samples the outbox.
_SUPERVISE_EVERY = 1.0
_GAUGES_EVERY = 5.0
# Events past EVENT_HISTORY_DAYS are deleted this often (seconds), and once at start.
_PRUNE_EVERY = 3600.0


@dataclass
class _Loop:
    name: str
    target: Callable[[], None]
    stop: Callable[[], None]
    # Per-thread loops (liveness.PER_THREAD_LOOPS) this loop has threads of its own take up
    # (job steps): watched until no loop that takes them up is left running.
    shares: tuple[str, ...] = ()
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


# Python collects its youngest generation every 700 new container objects. Intake makes
# thousands a batch (models, rows, events) that live until the batch commits, so the same
# objects were scanned over and over and promoted into older generations, scanned again:
# a sixth of the consumer thread in a burst (docs/performance.md). A collection every
# 10,000 keeps the same protection against cycles, a few megabytes later at most.
GC_YOUNG_THRESHOLD = 10_000


def tune_gc() -> None:
    """The process's collector set for a worker (called once, before the loops start)."""
    young, *older = gc.get_threshold()
    gc.set_threshold(max(young, GC_YOUNG_THRESHOLD), *older)


def register_settings_secrets(settings: Settings) -> None:
    """Every secret the settings hold is masked wherever it might appear in text."""
    register_secret(settings.client_secret.get_secret_value())
    for url in (*settings.broker_urls, settings.database_url.get_secret_value()):
        password = urlsplit(url).password
        if password:
            register_secret(password)


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(
            fleet_id=settings.fleet_id,
            api_budget_per_minute=settings.api_budget_per_minute,
            tenants=settings.tenants,
        )
        self.health = Health()
        self._stopping = threading.Event()
        self._bounds = liveness.progress_bounds(settings)
        self._next_prune = 0.0

    def run(self) -> int:
        settings = self.settings
        register_settings_secrets(settings)
        tune_gc()
        probes = ProbeServer(
            self.metrics, self.health, host=str(settings.metrics_host), port=settings.metrics_port
        )
        probes.start()
        log.info(
            "batch-worker starting",
            extra={"fleet_id": settings.fleet_id, "worker": settings.worker_name},
        )
        try:
            pool = db.open_pool(settings, min_size=2, max_size=16)
        except BaseException:
            probes.stop()
            raise
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
        health = self.health
        client = BatchClient.from_settings(
            settings,
            hooks=liveness.progress_hooks(health, self.metrics.api_hooks()),
            budget=FleetBudget(settings.api_budget_per_minute, pool, settings.fleet_id),
        )
        intake = Intake(settings, pool, metrics=self.metrics)

        consumer = JobsConsumer(
            settings,
            _BeatingIntake(intake, lambda: health.beat(liveness.CONSUMER_LOOP)),
            on_connection_change=connections.callback(liveness.CONSUMER_LOOP),
            on_progress=lambda: health.beat(liveness.CONSUMER_LOOP),
        )
        relay = Relay(
            settings,
            pool,
            on_published=self._count_published,
            on_connection_change=connections.callback(liveness.RELAY_LOOP),
            on_progress=lambda: health.beat(liveness.RELAY_LOOP),
            on_outbox_progress=lambda: health.beat(liveness.RELAY_OUTBOX_LOOP),
        )
        tiles = TileReader(metrics=self.metrics, on_progress=health.beat_thread)
        engine = Engine(
            settings,
            pool,
            client,
            tiles=tiles,
            retry_inputs=RetryInputWriter(tiles),
            metrics=self.metrics,
            worker_name=settings.worker_name,
            on_progress=health.beat,
            on_idle=health.idle,
            # (Late bound: the marks are made next, to wake this engine.)
            lease_guard=lambda job, generation, at: marks.lease_valid(job, generation, at),  # noqa: PLW0108
        )
        # A dead worker's jobs freed: this worker's engine claims them now, not at its next
        # idle round.
        marks = Presence(settings, on_taken_over=lambda _count: engine.wake())
        status = StatusLoop(
            settings,
            pool,
            client,
            engine,
            worker_name=settings.worker_name,
            on_progress=lambda: health.beat(liveness.POLLER_LOOP),
        )
        steps = (liveness.STEPS_LOOP,)
        # Stopping order matters: intake first (no new work), the status reads and the
        # engine next, relay last so that the events of the last steps are flushed.
        loops = [
            _Loop(liveness.CONSUMER_LOOP, consumer.run, consumer.request_stop),
            _Loop(liveness.POLLER_LOOP, status.run, status.request_stop, shares=steps),
            _Loop(liveness.ENGINE_LOOP, engine.run, engine.request_stop, shares=steps),
            _Loop(
                liveness.RELAY_LOOP,
                relay.run,
                relay.request_stop,
                shares=(liveness.RELAY_OUTBOX_LOOP,),
            ),
        ]
        self._install_signal_handlers()
        for name, bound in self._bounds.items():
            health.register(name, bound, per_thread=name in liveness.PER_THREAD_LOOPS)
            self.metrics.watch_loop(name, partial(self._progress_age, name), bound)
        watchdog = Watchdog(
            health,
            self.stop,
            grace_period=settings.grace_period,
            # Only the real process ends itself: an embedded daemon (the demo, tests) runs
            # off the main thread and must not take its host down.
            hard_exit=threading.current_thread() is threading.main_thread(),
        )
        watchdog.start()
        # The mark and lease renewals run from before the first claim to after the last
        # step: a step in hand keeps its lease however long it takes.
        marking = threading.Thread(target=marks.run, name="presence", daemon=True)
        marking.start()
        for loop in loops:
            loop.thread = threading.Thread(target=self._guard(loop), name=loop.name, daemon=True)
            loop.thread.start()
        failed = False
        next_gauges = 0.0
        try:
            while not self._stopping.wait(_SUPERVISE_EVERY):
                health.beat(liveness.SUPERVISOR_LOOP)
                for loop in loops:
                    if loop.thread is None or not loop.thread.is_alive():
                        # Fail fast: the durable state makes a restart lose nothing, and a
                        # half-alive worker would hold leases it cannot serve.
                        log.error("loop %s stopped unexpectedly; shutting down", loop.name)
                        failed = True
                        self.stop()
                if time.monotonic() >= next_gauges:
                    next_gauges = time.monotonic() + _GAUGES_EVERY
                    self._now_and_then(pool)
        finally:
            stopped = self._shutdown(loops)
            marks.request_stop()
            marking.join(5.0)
            client.close()
            watchdog.close(orderly=stopped)
        return 1 if failed or watchdog.stalled else 0

    def _progress_age(self, name: str) -> float:
        age, _bound = self.health.progress().get(name, (0.0, 0.0))
        return age

    def _now_and_then(self, pool: db.Pool) -> None:
        """The outbox gauge sampled, the active count's rows folded (every few seconds)."""
        try:
            with pool.connection(timeout=2) as conn:
                self.metrics.outbox_pending(outbox.pending_count(conn))
                self.metrics.outbox_parked(outbox.parked_count(conn))
                conn.commit()
                capacity.compact(conn, self.settings.fleet_id)
        except (psycopg.Error, PoolTimeout) as exc:  # the relay reports DB trouble itself
            log.debug("outbox gauge or active count fold skipped (%s)", type(exc).__name__)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + _PRUNE_EVERY
            self._prune_history(pool)

    def _prune_history(self, pool: db.Pool) -> None:
        """Events older than EVENT_HISTORY_DAYS leave the history (every worker of a fleet
        does it now and then: a DELETE of what another already deleted costs an index probe)."""
        try:
            with pool.connection(timeout=2) as conn:
                gone = history.prune_older(conn, days=self.settings.event_history_days)
            if gone:
                log.info(
                    "event history: %d events older than %g days forgotten",
                    gone,
                    self.settings.event_history_days,
                )
        except (psycopg.Error, PoolTimeout) as exc:
            log.debug("event history prune skipped (%s)", type(exc).__name__)

    def _count_published(self, message: OutboxMessage) -> None:
        # Events only: reply_to copies and dead letters are not events of their own.
        if message.exchange == self.settings.events_exchange:
            self.metrics.event_published(str(message.properties.get("type", "")))

    def _guard(self, loop: _Loop) -> Callable[[], None]:
        def target() -> None:
            try:
                loop.target()
            except Exception:
                # The supervisor sees the thread gone and stops the process (exit code 1);
                # the durable state makes the restart lose nothing.
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

    def _shutdown(self, loops: list[_Loop]) -> bool:
        """Stop the loops in order within the grace period; whether every one stopped."""
        # The supervisor's turns are over: from here its thread is the one stopping.
        self.health.unregister(liveness.SUPERVISOR_LOOP)
        deadline = time.monotonic() + self.settings.grace_period
        running = list(loops)
        for loop in loops:
            loop.stop()
            if loop.thread is not None:
                loop.thread.join(max(0.0, deadline - time.monotonic()))
                if loop.thread.is_alive():
                    log.warning("loop %s did not stop within the grace period", loop.name)
                    continue
            # Ended on purpose: no longer watched, nor the work only it had threads for.
            running.remove(loop)
            self.health.unregister(loop.name)
            for shared in loop.shares:
                if not any(shared in other.shares for other in running):
                    self.health.unregister(shared)
        return not running


class _BeatingIntake:
    """Intake whose every transaction counts as the consumer's progress: a batch retried one
    message at a time is many transactions in one turn of the consumer."""

    def __init__(self, intake: Intake, beat: Callable[[], None]) -> None:
        self._intake = intake
        self._beat = beat

    def read(self, batch: list[InboundMessage]) -> ReadBatch:
        return self._intake.read(batch)

    def take_in_steps(self, batch: ReadBatch) -> TakeSteps:
        self._beat()
        return self._intake.take_in_steps(batch)
