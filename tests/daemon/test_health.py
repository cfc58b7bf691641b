"""worker.daemon.health: probe logic with a fake clock; the server over real loopback HTTP."""

from __future__ import annotations

import http.client
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes import FakeClock
from worker.daemon.health import Health, ProbeServer
from worker.metrics import Metrics


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> Health:
    return Health(clock=clock)


# --- liveness --------------------------------------------------------------------------


def test_alive_with_no_loops(health: Health) -> None:
    assert health.liveness()[0] is True


def test_registration_counts_as_a_first_beat(health: Health, clock: FakeClock) -> None:
    health.register("engine", 60)
    clock.now += 59
    assert health.liveness()[0] is True
    clock.now += 2
    ok, detail = health.liveness()
    assert ok is False
    assert "engine" in detail


def test_beats_keep_a_loop_alive(health: Health, clock: FakeClock) -> None:
    health.register("engine", 60)
    for _ in range(5):
        clock.now += 50
        health.beat("engine")
    assert health.liveness() == (True, "ok: 1 loops making progress")


def test_only_the_silent_loop_is_named(health: Health, clock: FakeClock) -> None:
    health.register("engine", 60)
    health.register("relay", 30)
    health.register("intake", 30)
    clock.now += 45
    health.beat("engine")
    health.beat("intake")
    ok, detail = health.liveness()
    assert ok is False
    assert "relay" in detail
    assert "engine" not in detail
    assert "intake" not in detail
    assert detail == "loop relay stalled: no progress for 45s (bound 30s)"


def test_unregistered_loop_is_no_longer_watched(health: Health, clock: FakeClock) -> None:
    health.register("consumer", 10)
    health.unregister("consumer")
    health.beat("consumer")  # a late beat of a loop that ended must not re-register it
    clock.now += 100
    assert health.liveness()[0] is True


def test_a_stall_is_logged_once_at_error_and_its_recovery_once(
    health: Health, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    health.register("poller", 60)
    health.register("relay", 60)
    caplog.set_level(logging.DEBUG, logger="worker.daemon.health")
    clock.now += 61
    health.beat("relay")
    for _ in range(3):  # probes and the watchdog ask again and again
        assert health.liveness()[0] is False
        assert [name for name, _age, _bound in health.stalled()] == ["poller"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "loop poller stalled: no progress for 61 s (bound 60 s)"
    ]
    health.beat("poller")
    assert health.liveness()[0] is True
    assert health.liveness()[0] is True
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["loop poller is making progress again"]


def test_beat_thread_counts_for_the_loop_that_thread_beat_for(
    health: Health, clock: FakeClock
) -> None:
    health.register("poller", 60)
    health.register("engine", 60)
    seen: list[tuple[str, float]] = []

    def poller_thread() -> None:
        health.beat("poller")
        clock.now += 50
        health.beat_thread()  # an API call made inside the poller's round
        seen.extend((name, age) for name, (age, _bound) in health.progress().items())

    thread = threading.Thread(target=poller_thread)
    thread.start()
    thread.join()
    assert sorted(seen) == [("engine", 50.0), ("poller", 0.0)]
    health.beat_thread()  # this thread never beat for a loop: nothing moves
    clock.now += 20
    ok, detail = health.liveness()
    assert ok is False
    assert detail.startswith("loop engine stalled")


# --- loops watched per busy thread (job steps on pools of threads) -----------------------


@pytest.fixture
def step_threads() -> Iterator[tuple[ThreadPoolExecutor, ThreadPoolExecutor]]:
    """Two long-lived threads, like a pool's: a thread's identity must not be reused mid-test
    (a new thread may get the ident of one that ended)."""
    with ThreadPoolExecutor(1) as first, ThreadPoolExecutor(1) as second:
        yield first, second


def on(thread: ThreadPoolExecutor, call: Callable[[], None]) -> None:
    thread.submit(call).result(timeout=5)


def test_a_per_thread_loop_with_no_thread_busy_is_healthy_however_long(
    health: Health, clock: FakeClock, step_threads: tuple[ThreadPoolExecutor, ThreadPoolExecutor]
) -> None:
    health.register("steps", 60, per_thread=True)
    clock.now += 1000
    assert health.liveness() == (True, "ok: 1 loops making progress")
    assert health.progress() == {"steps": (0.0, 60)}
    first, _ = step_threads
    on(first, lambda: health.beat("steps"))
    on(first, lambda: health.idle("steps"))  # a step that ended in time
    clock.now += 1000
    assert health.stalled() == []


def test_a_busy_thread_silent_past_the_bound_stalls_its_loop_by_name(
    health: Health, clock: FakeClock, step_threads: tuple[ThreadPoolExecutor, ThreadPoolExecutor]
) -> None:
    health.register("steps", 60, per_thread=True)
    health.register("engine", 60)
    first, second = step_threads
    on(first, lambda: health.beat("steps"))
    clock.now += 30
    on(second, lambda: health.beat("steps"))
    health.beat("engine")  # the claim loop keeps going round: it does not hide the step
    clock.now += 31
    ok, detail = health.liveness()
    assert (ok, detail) == (False, "loop steps stalled: no progress for 61s (bound 60s)")
    # The loop is as old as its longest-silent busy thread; when that one is done, the next.
    on(first, lambda: health.idle("steps"))
    assert health.progress()["steps"] == (31.0, 60)
    assert health.liveness()[0] is True


def test_progress_inside_a_step_keeps_its_thread_alive(
    health: Health, clock: FakeClock, step_threads: tuple[ThreadPoolExecutor, ThreadPoolExecutor]
) -> None:
    health.register("steps", 60, per_thread=True)
    first, second = step_threads
    on(first, lambda: health.beat("steps"))
    for _ in range(4):
        clock.now += 50
        on(first, health.beat_thread)  # an API attempt or a MiB of a tile file
    assert health.progress()["steps"] == (0.0, 60)
    # A thread's API calls never make it busy: only a step's own beat does.
    on(second, health.beat_thread)
    on(first, lambda: health.idle("steps"))
    on(first, health.beat_thread)
    clock.now += 100
    assert health.liveness()[0] is True


def test_a_loop_thread_stepping_a_job_inline_keeps_both_going(
    health: Health, clock: FakeClock
) -> None:
    health.register("poller", 60)
    health.register("steps", 60, per_thread=True)
    health.beat("poller")
    health.beat("steps")  # the poller drives a job itself (no step pool)
    clock.now += 50
    health.beat_thread()
    assert health.progress() == {"poller": (0.0, 60), "steps": (0.0, 60)}
    health.idle("poller")  # not a per-thread loop the thread is busy on: nothing changes
    health.idle("steps")
    clock.now += 50
    assert health.progress() == {"poller": (50.0, 60), "steps": (0.0, 60)}


def test_unregistering_a_per_thread_loop_forgets_its_busy_threads(
    health: Health, clock: FakeClock
) -> None:
    health.register("steps", 60, per_thread=True)
    health.beat("steps")
    health.unregister("steps")
    health.register("steps", 60, per_thread=True)
    clock.now += 100
    assert health.liveness()[0] is True


def test_progress_reports_age_and_bound(health: Health, clock: FakeClock) -> None:
    health.register("relay", 30)
    clock.now += 12.5
    assert health.progress() == {"relay": (12.5, 30)}


def test_broker_outage_does_not_fail_liveness(health: Health) -> None:
    health.register("engine", 60)
    health.set_ready(False)
    assert health.liveness()[0] is True
    assert health.readiness()[0] is False


def test_bound_must_be_positive(health: Health) -> None:
    with pytest.raises(ValueError, match="engine"):
        health.register("engine", 0)


# --- readiness -------------------------------------------------------------------------


def test_not_ready_until_the_broker_is_up(health: Health) -> None:
    assert health.readiness() == (False, "broker not connected")
    health.set_ready(True)
    assert health.readiness() == (True, "ok")
    health.set_ready(False)
    assert health.readiness()[0] is False


def test_shutting_down_wins_over_a_connected_broker(health: Health) -> None:
    health.set_ready(True)
    health.set_shutting_down()
    assert health.readiness() == (False, "shutting down")
    health.set_ready(True)
    assert health.readiness()[0] is False


# --- the server (integration: real HTTP over loopback) -----------------------------------


@pytest.fixture
def served(health: Health) -> Iterator[tuple[Metrics, Health, ProbeServer]]:
    metrics = Metrics()
    server = ProbeServer(metrics, health, host="127.0.0.1", port=0)
    server.start()
    yield metrics, health, server
    server.stop()


def get(server: ProbeServer, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@pytest.mark.integration
def test_metrics_endpoint_serves_the_registry(
    served: tuple[Metrics, Health, ProbeServer],
) -> None:
    metrics, _, server = served
    metrics.duplicate_stopped()
    status, headers, body = get(server, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }
    assert values["batch_worker_duplicates_stopped_total"] == 1


@pytest.mark.integration
def test_metrics_endpoint_honours_gzip(served: tuple[Metrics, Health, ProbeServer]) -> None:
    _, _, server = served
    status, headers, _ = get(server, "/metrics", **{"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers.get("Content-Encoding") == "gzip"


@pytest.mark.integration
def test_probes_answer_200_and_503(
    served: tuple[Metrics, Health, ProbeServer], clock: FakeClock
) -> None:
    _, health, server = served
    health.register("engine", 60)

    assert get(server, "/healthz")[0] == 200
    status, _, body = get(server, "/readyz")
    assert (status, body) == (503, b"broker not connected\n")

    health.set_ready(True)
    assert get(server, "/readyz")[0] == 200

    clock.now += 120
    status, _, body = get(server, "/healthz")
    assert (status, body) == (503, b"loop engine stalled: no progress for 120s (bound 60s)\n")
    health.beat("engine")
    assert get(server, "/healthz")[0] == 200

    health.set_shutting_down()
    assert get(server, "/readyz")[:3:2] == (503, b"shutting down\n")


@pytest.mark.integration
def test_unknown_path_is_404(served: tuple[Metrics, Health, ProbeServer]) -> None:
    assert get(served[2], "/")[0] == 404


@pytest.mark.integration
def test_stop_releases_the_port(health: Health) -> None:
    server = ProbeServer(Metrics(), health, host="127.0.0.1", port=0)
    server.start()
    port = server.port
    server.stop()
    again = ProbeServer(Metrics(), health, host="127.0.0.1", port=port)
    again.start()
    try:
        assert get(again, "/healthz")[0] == 200
    finally:
        again.stop()


def test_port_before_start_is_an_error(health: Health) -> None:
    with pytest.raises(RuntimeError):
        _ = ProbeServer(Metrics(), health, port=0).port


@pytest.mark.integration
def test_a_taken_port_is_a_listen_error_naming_the_address(health: Health) -> None:
    import errno
    import socket

    from worker.daemon.health import ListenError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ListenError) as caught:
            ProbeServer(Metrics(), health, host="127.0.0.1", port=port).start()
    assert (caught.value.host, caught.value.port) == ("127.0.0.1", port)
    assert caught.value.errno == errno.EADDRINUSE
