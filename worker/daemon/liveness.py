"""Progress-based liveness: how long each loop may legitimately pause, and what a stall does.

Every loop of the daemon beats ``Health`` each time round, idle or not (worker/daemon/health.py).
A loop's *bound* is the sum of every wait one turn of it may legitimately contain (its
sleep, its back-off cap, a reconnect with kombu's bounded retries, a database call behind
the pool's checkout timeout, an API call with its retries), plus slack for a loaded
machine. A loop past its bound is stalled: a thread that is alive but not going round, on a
read without a timeout, a deadlock, or a database that accepted the connection and never
answers. Job steps run on pools of threads, not on a loop of their own: they are watched as
the loop ``engine-steps``, per busy thread (``Health.register(per_thread=True)``), so a
step silent past that bound is a stall like any other and a thread with no job is not
(unwatched, step threads all stuck in calls that never return would leave the claim loop
going round, claiming nothing, with ``/healthz`` green). Restarting is the cure (the
durable state makes it lose nothing), so:

- ``/healthz`` answers 503 naming the loop (Kubernetes' liveness probe restarts the pod);
- the ``Watchdog`` stops the process itself with exit code 1, as for a loop that died,
  because outside Kubernetes nothing else would. An orderly stop may be stuck behind the
  very call that stalled, and a step thread stuck for good keeps the interpreter from
  exiting after it, so when the process is still there ``grace_period`` plus a margin
  later, it ends with ``os._exit(1)`` (like a SIGKILL, which loses nothing either).

The watchdog does no I/O and holds no lock but ``Health``'s, so it cannot stall on what
stalled a loop. What it cannot see: a hang that holds the GIL (a C extension blocking
without releasing it) freezes the probe server too; Kubernetes' probe then times out and
restarts the pod, which is why the chart keeps the probe as the backstop.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from worker.api.client import ApiHooks
from worker.api.retry import RetryPolicy
from worker.broker import CONNECT_RETRY, CONNECT_TIMEOUT
from worker.daemon import bucket_files, consumer, engine, loops, relay
from worker.daemon.health import Health
from worker.settings import Settings

__all__ = [
    "CONSUMER_LOOP",
    "ENGINE_LOOP",
    "PER_THREAD_LOOPS",
    "POLLER_LOOP",
    "RELAY_LOOP",
    "RELAY_OUTBOX_LOOP",
    "STEPS_LOOP",
    "SUPERVISOR_LOOP",
    "Watchdog",
    "progress_bounds",
    "progress_hooks",
]

log = logging.getLogger(__name__)

CONSUMER_LOOP = loops.CONSUMER
ENGINE_LOOP = loops.ENGINE
POLLER_LOOP = loops.POLLER
RELAY_LOOP = loops.RELAY
RELAY_OUTBOX_LOOP = loops.RELAY_OUTBOX
SUPERVISOR_LOOP = loops.SUPERVISOR
STEPS_LOOP = loops.STEPS
# Loops watched per busy thread, not per turn (``Health.register(per_thread=True)``).
PER_THREAD_LOOPS = frozenset({STEPS_LOOP})

# One database call: psycopg_pool's checkout timeout (30 s, the default the daemon's pool
# keeps) plus a statement of generous length on a busy server.
DB_CALL = 60.0
# Slack on every bound: a 2-core machine under load, a long GC pause.
SLACK = 30.0
# Threads that may queue for API budget tokens ahead of one call: the engine's step threads,
# the status loop's poll-step threads and the status loop itself (8 threads in each pool by
# default).
BUDGET_QUEUE = 8 + 8 + 1
# botocore's cap on one back-off of its standard retry mode (the tile reader's S3 client).
S3_BACKOFF_CAP = 20.0
# How often the watchdog looks; and how long past the grace period a stalled process that
# has not exited on its own is ended.
WATCH_EVERY = 1.0
EXIT_MARGIN = 10.0


def amqp_connect_seconds() -> float:
    """The longest ``ensure_connection`` with the project's bounded retries may take."""
    retries = int(CONNECT_RETRY["max_retries"])
    start, step, cap = (
        CONNECT_RETRY["interval_start"],
        CONNECT_RETRY["interval_step"],
        CONNECT_RETRY["interval_max"],
    )
    sleeps = sum(min(start + i * step, cap) for i in range(retries))
    return (retries + 1) * CONNECT_TIMEOUT + sleeps


def api_call_seconds(settings: Settings, retry: RetryPolicy | None = None) -> float:
    """The longest gap between two attempts of one API call made by one thread.

    A retry sleep (back-off, or a 429's Retry-After) never ends past ``max_total_seconds``
    from the first try; then the next attempt may queue for budget and wait for its answer.
    Every attempt is progress (``progress_hooks``), so this, not a whole round, is what a
    loop making API calls may pause for.
    """
    policy = retry or RetryPolicy()
    budget_wait = BUDGET_QUEUE * 60.0 / settings.api_budget_per_minute
    return policy.max_total_seconds + budget_wait + settings.api_timeout


def s3_request_seconds() -> float:
    """The longest one S3 request of a tile read may take before its answer: every try
    with its connect and read timeouts, and the back-offs between them."""
    tries = bucket_files.S3_MAX_ATTEMPTS
    attempt = bucket_files.S3_CONNECT_TIMEOUT + bucket_files.S3_READ_TIMEOUT
    return tries * attempt + (tries - 1) * S3_BACKOFF_CAP


def progress_bounds(settings: Settings) -> dict[str, float]:
    """Each loop's longest legitimate pause, in seconds (docs/operations.md "Liveness")."""
    connect = amqp_connect_seconds()
    bounds = {
        # Reconnect (declaring the topology), or one intake transaction per message of a
        # batch retried one by one (each is a turn: the daemon beats around intake calls),
        # then its one-second drain or reconnect wait.
        CONSUMER_LOOP: max(connect, DB_CALL) + 2 * consumer.IDLE_DRAIN_SECONDS + SLACK,
        # A claim and the gauges' queries, then the idle wait or the error back-off.
        ENGINE_LOOP: 2 * DB_CALL + engine.BACKOFF_MAX + SLACK,
        # The status loop: its wait (never longer than the poll interval), then the round's
        # database reads (two before its first API call, two after its last), or one API
        # call of the round (each call counts as progress).
        POLLER_LOOP: settings.poll_interval + max(2 * DB_CALL, api_call_seconds(settings)) + SLACK,
        # Reconnect, claim, one chunk's confirms and its delete, then the back-off cap.
        RELAY_LOOP: connect + 2 * DB_CALL + relay.CONFIRM_TIMEOUT + relay.BACKOFF_MAX + SLACK,
        # The outbox moving on: every refusal of a poison row is one relay turn (a
        # reconnect, a claim, a confirm wait, the back-off), and the row is parked after
        # OUTBOX_MAX_ATTEMPTS of them; a chunk of confirms that never come repeats for ever.
        RELAY_OUTBOX_LOOP: settings.outbox_max_attempts
        * (connect + 2 * DB_CALL + relay.CONFIRM_TIMEOUT + relay.BACKOFF_MAX)
        + SLACK,
        # Its one-second tick and the outbox count (a database call).
        SUPERVISOR_LOOP: WATCH_EVERY + DB_CALL + SLACK,
        # One busy step thread between two marks of progress: the engine marks each
        # lifecycle step and save, each action and the release; every API attempt and every
        # MiB of a tile file counts too. So the longest gap is one database call, one API
        # call's gap between attempts, or one S3 request with its retries.
        STEPS_LOOP: max(DB_CALL, api_call_seconds(settings), s3_request_seconds()) + SLACK,
    }
    return {name: bound * settings.liveness_factor for name, bound in bounds.items()}


def progress_hooks(health: Health, hooks: ApiHooks) -> ApiHooks:
    """``hooks`` that also count every API attempt (and budget wait) as progress of the
    loop whose thread made it (``Health.beat_thread``)."""
    on_request, on_budget_wait = hooks.on_request, hooks.on_budget_wait

    def requested(endpoint: str, code: str, seconds: float) -> None:
        health.beat_thread()
        if on_request is not None:
            on_request(endpoint, code, seconds)

    def waited(seconds: float) -> None:
        health.beat_thread()
        if on_budget_wait is not None:
            on_budget_wait(seconds)

    return ApiHooks(on_request=requested, on_budget_wait=waited)


@dataclass
class Watchdog:
    """Stops the process when a loop stalls; ends it if the stop does not finish in time.

    ``stop`` is the daemon's orderly stop. ``hard_exit`` ends the process with
    ``os._exit(1)`` when it is still running ``grace_period + EXIT_MARGIN`` after a stall;
    only for the real process (an embedded daemon, in the demo or a test, must not take
    its host down).
    """

    health: Health
    stop: Callable[[], None]
    grace_period: float
    hard_exit: bool
    every: float = WATCH_EVERY
    exit_margin: float = EXIT_MARGIN
    _exit: Callable[[int], None] = os._exit

    def __post_init__(self) -> None:
        self._done = threading.Event()  # the daemon is over: nothing more to watch
        self._stalled = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stalled(self) -> bool:
        """Whether a stall stopped the process."""
        return self._stalled.is_set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="liveness-watch", daemon=True)
        self._thread.start()

    def close(self, *, orderly: bool = True) -> None:
        """The daemon is over (stopped for any reason): stop watching.

        ``orderly`` False: a loop was still running when the stop gave up waiting for it.
        After a stall the hard exit then stays due: a step thread stuck in a call that never
        returns keeps the process from exiting by itself (the interpreter joins the
        engine's pool threads at exit).
        """
        if not orderly and self._stalled.is_set():
            return
        self._done.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.every * 2)

    def _run(self) -> None:
        while not self._done.wait(self.every):
            stalled = self.health.stalled()
            if stalled:
                break
        else:
            return
        names = ", ".join(name for name, _, _ in stalled)
        log.error("stopping: loop(s) %s stalled; a restart loses nothing", names)
        self._stalled.set()
        self.stop()
        if not self.hard_exit:
            return
        if self._done.wait(self.grace_period + self.exit_margin):
            return
        log.critical("still running %.0f s after a stall: exiting now", self.grace_period)
        for handler in logging.getLogger().handlers:
            handler.flush()
        self._exit(1)
