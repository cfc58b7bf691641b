"""worker.daemon.liveness: loop bounds from the settings, the watchdog, a blocked loop over HTTP."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator

import pytest

from tests.fakes import FakeClock
from worker.api.client import ApiHooks
from worker.daemon import liveness
from worker.daemon.health import Health, ProbeServer
from worker.daemon.liveness import Watchdog, progress_bounds
from worker.metrics import Metrics
from worker.settings import Settings

# --- bounds ----------------------------------------------------------------------------


def test_every_loop_of_the_daemon_has_a_bound() -> None:
    bounds = progress_bounds(Settings())
    assert set(bounds) == {
        "consumer",
        "engine",
        "poller",
        "relay",
        "relay-outbox",
        "supervisor",
        "engine-steps",
    }
    assert all(bound > liveness.SLACK for bound in bounds.values())
    assert set(liveness.PER_THREAD_LOOPS) == {"engine-steps"}


def test_default_bounds_cover_each_loops_longest_wait() -> None:
    settings = Settings()
    bounds = progress_bounds(settings)
    connect = liveness.amqp_connect_seconds()
    assert connect == 6 * 10.0 + (0.5 + 1.5 + 2.5 + 3.5 + 4.5)  # six tries, five sleeps
    # The poller waits up to a poll interval, then one API call: retries for up to 120 s,
    # the budget queue (17 threads at 300/min), one attempt's timeout.
    assert liveness.api_call_seconds(settings) == pytest.approx(120 + 17 * 0.2 + 30)
    assert bounds["poller"] == pytest.approx(30 + 153.4 + 30)
    assert bounds["relay"] == connect + 2 * 60 + 30 + 15 + 30
    assert bounds["engine"] == 2 * 60 + 30 + 30
    # A step thread between two marks: one API call's gap (above), longer than a database
    # call or a tile read's S3 request (three tries of 5 s connect + 30 s read, two 20 s
    # back-offs).
    assert liveness.s3_request_seconds() == 3 * (5 + 30) + 2 * 20
    assert bounds["engine-steps"] == pytest.approx(153.4 + 30)


def test_bounds_follow_the_settings() -> None:
    slow = progress_bounds(Settings(poll_interval=600, api_budget_per_minute=10))
    fast = progress_bounds(Settings(poll_interval=5))
    # 595 s more of poll interval; 17 budget waits of 6 s instead of 0.2 s.
    assert slow["poller"] - fast["poller"] == pytest.approx(595 + 17 * (6 - 0.2))
    assert slow["relay"] == fast["relay"]
    # A step waits for one API call, whatever its timeout; at the least for an S3 request.
    patient = progress_bounds(Settings(api_timeout=300))
    assert patient["engine-steps"] - fast["engine-steps"] == pytest.approx(270)
    hasty = progress_bounds(Settings(api_timeout=1, api_budget_per_minute=6000))
    assert hasty["engine-steps"] == liveness.s3_request_seconds() + liveness.SLACK


def test_the_liveness_factor_scales_every_bound() -> None:
    plain = progress_bounds(Settings())
    scaled = progress_bounds(Settings(liveness_factor=0.05))
    assert scaled == {name: pytest.approx(bound * 0.05) for name, bound in plain.items()}


def test_progress_hooks_count_api_attempts_and_keep_the_metrics_hooks() -> None:
    health = Health(clock=FakeClock())
    calls: list[tuple[object, ...]] = []
    hooks = liveness.progress_hooks(
        health,
        ApiHooks(
            on_request=lambda *args: calls.append(("request", *args)),
            on_budget_wait=lambda seconds: calls.append(("wait", seconds)),
        ),
    )
    beats: list[str] = []
    health.beat_thread = lambda: beats.append("beat")  # type: ignore[method-assign]
    assert hooks.on_request is not None and hooks.on_budget_wait is not None
    hooks.on_request("get", "200", 0.1)
    hooks.on_budget_wait(0.5)
    assert calls == [("request", "get", "200", 0.1), ("wait", 0.5)]
    assert beats == ["beat", "beat"]


# --- a loop that blocks, seen through /healthz ------------------------------------------


class BlockableLoop:
    """Goes round, beating, until told to block on an Event it then waits on."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self.release = threading.Event()
        self.block = threading.Event()
        self.blocked = threading.Event()
        self.turned = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.health.beat("engine")
            self.turned.set()
            if self.block.is_set():
                self.blocked.set()
                self.release.wait()  # the hang: alive, not going round
                self.block.clear()
            self.stop.wait(0.01)


@pytest.fixture
def blocked_setup() -> Iterator[tuple[FakeClock, Health, BlockableLoop, ProbeServer]]:
    clock = FakeClock()
    health = Health(clock=clock)
    health.register("engine", 60)
    loop = BlockableLoop(health)
    loop.thread.start()
    server = ProbeServer(Metrics(), health, host="127.0.0.1", port=0)
    server.start()
    yield clock, health, loop, server
    loop.stop.set()
    loop.release.set()
    loop.thread.join(5)
    server.stop()


def _healthz(server: ProbeServer) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.mark.integration
def test_a_blocked_loop_fails_healthz_and_recovers_when_released(
    blocked_setup: tuple[FakeClock, Health, BlockableLoop, ProbeServer],
) -> None:
    clock, _health, loop, server = blocked_setup
    clock.now += 50  # time passes while the loop keeps turning: it keeps up
    loop.turned.clear()
    assert loop.turned.wait(5)
    assert _healthz(server)[0] == 200

    loop.block.set()
    assert loop.blocked.wait(5)
    clock.now += 61
    status, body = _healthz(server)
    assert status == 503
    assert body == b"loop engine stalled: no progress for 61s (bound 60s)\n"

    loop.turned.clear()
    loop.release.set()
    assert loop.turned.wait(5)
    assert _healthz(server) == (200, b"ok: 1 loops making progress\n")


# --- the watchdog -----------------------------------------------------------------------


def _watchdog(health: Health, *, hard_exit: bool) -> tuple[Watchdog, threading.Event, list[int]]:
    stopped = threading.Event()
    exits: list[int] = []

    def exit_(code: int) -> None:
        exits.append(code)

    dog = Watchdog(
        health,
        stopped.set,
        grace_period=0.05,
        hard_exit=hard_exit,
        every=0.01,
        exit_margin=0.0,
        _exit=exit_,
    )
    return dog, stopped, exits


def test_watchdog_stops_the_process_on_a_stall_and_ends_it_if_the_stop_hangs() -> None:
    clock = FakeClock()
    health = Health(clock=clock)
    health.register("poller", 60)
    dog, stopped, exits = _watchdog(health, hard_exit=True)
    dog.start()
    try:
        assert not stopped.wait(0.1)  # progressing: nothing happens
        clock.now += 61
        assert stopped.wait(5)
        assert dog.stalled
        assert dog._thread is not None
        dog._thread.join(5)  # the grace period passes; the daemon never said it is over
        assert exits == [1]
    finally:
        dog.close()


def test_watchdog_leaves_an_orderly_stop_alone() -> None:
    clock = FakeClock()
    health = Health(clock=clock)
    health.register("poller", 60)
    dog, stopped, exits = _watchdog(health, hard_exit=True)
    dog.grace_period = 5.0
    dog.start()
    clock.now += 61
    assert stopped.wait(5)
    dog.close()  # the daemon stopped in time
    assert exits == []


def test_after_a_stall_a_stop_that_left_a_loop_running_still_ends_the_process() -> None:
    # A step thread stuck for good outlives the stop, and the interpreter would wait for it
    # at exit forever: closing the watchdog must not call off the hard exit.
    clock = FakeClock()
    health = Health(clock=clock)
    health.register("engine-steps", 60, per_thread=True)
    health.beat("engine-steps")
    dog, stopped, exits = _watchdog(health, hard_exit=True)
    dog.start()
    clock.now += 61
    assert stopped.wait(5)
    dog.close(orderly=False)
    assert dog._thread is not None
    dog._thread.join(5)
    assert exits == [1]


def test_a_stop_that_left_a_loop_running_without_a_stall_ends_the_watch() -> None:
    health = Health(clock=FakeClock())
    health.register("poller", 60)
    dog, stopped, exits = _watchdog(health, hard_exit=True)
    dog.start()
    dog.close(orderly=False)  # a SIGTERM stop: its own grace period, nothing stalled
    assert dog._thread is not None
    dog._thread.join(5)
    assert not dog._thread.is_alive()
    assert (stopped.is_set(), exits) == (False, [])


def test_an_embedded_watchdog_never_ends_the_process() -> None:
    clock = FakeClock()
    health = Health(clock=clock)
    health.register("poller", 60)
    dog, stopped, exits = _watchdog(health, hard_exit=False)
    dog.start()
    clock.now += 61
    assert stopped.wait(5)
    assert dog._thread is not None
    dog._thread.join(5)
    assert exits == []
    assert dog.stalled
