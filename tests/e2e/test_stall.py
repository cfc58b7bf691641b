"""A worker whose database stops answering (connections open, no bytes back) is stalled, not
dead: /healthz says so, and the worker ends itself with exit code 1. So is a worker whose
job steps hang while its loops keep going round.

The database (or the API) sits behind a TCP proxy the test can pause: paused, it keeps every
connection open and forwards nothing, like a network path that blackholes packets. Bounds
are scaled down with LIVENESS_FACTOR so the test takes seconds, not minutes.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.e2e.conftest import CLIENT_SECRET, Producer, Stack, WorkerProcess, free_port
from tests.tcp_proxy import PausableProxy
from worker.daemon import liveness
from worker.settings import Settings

pytestmark = pytest.mark.integration

FACTOR = 0.1  # bounds of 9 to 27 s: above any pause of a loaded test machine
EXAMPLE = "max-ndvi-geotiff.json"


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
    stack: Stack, proxy: PausableProxy, start_worker: Callable[..., WorkerProcess]
) -> None:
    parts = urlsplit(stack.database_url)
    proxied = urlunsplit(parts._replace(netloc=f"{parts.hostname}:{proxy.port}"))
    port = free_port()
    grace = 3.0
    # One attempt per outbox row: the outbox loop's bound grows with the attempts (each a
    # relay turn), and the healthy phase below outlasts the longest bound.
    attempts = 1
    worker = start_worker(
        database_url=proxied,
        liveness_factor=FACTOR,
        metrics_port=port,
        grace_period=grace,
        outbox_max_attempts=attempts,
    )
    bounds = liveness.progress_bounds(
        Settings(**_settings_of(stack), liveness_factor=FACTOR, outbox_max_attempts=attempts)
    )

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
    # Every watched loop: the consumer, engine, poller, relay and its outbox, supervisor, steps.
    assert f"ok: {len(bounds)} loops making progress" in healthz(port)[1]

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
    # The stall itself, logged by worker.daemon.health (the probe's own DEBUG lines quote it too).
    stall_lines = [
        line
        for line in log.splitlines()
        if '"logger": "worker.daemon.health", "message": "loop ' in line
        and "progress again" not in line
    ]
    assert stall_lines and all('"level": "ERROR"' in line for line in stall_lines)
    assert all("stalled: no progress for" in line for line in stall_lines)
    named = [line.split("loop ")[1].split(" ")[0] for line in stall_lines]
    assert len(named) == len(set(named)), "a stall was logged more than once"
    assert set(named) <= set(bounds)
    assert "stopping: loop(s)" in log


def test_a_step_whose_call_never_returns_stalls_the_step_loop_and_the_worker_ends_itself(
    stack: Stack, producer: Producer, start_worker: Callable[..., WorkerProcess]
) -> None:
    # The API behind a proxy that holds every POST (a create, here): the job's step thread
    # waits for an answer that never comes, while GETs and lists (the poller's) go through
    # and every loop keeps going round. The token endpoint is reached directly.
    api_timeout = 60.0  # the held create answers never, as far as this test can tell
    simulator = urlsplit(stack.simulator.url)
    api = PausableProxy((simulator.hostname or "127.0.0.1", simulator.port or 80), hold=b"POST ")
    port = free_port()
    grace = 3.0
    try:
        worker = start_worker(
            api_url=urlunsplit(simulator._replace(netloc=f"127.0.0.1:{api.port}")),
            token_url=stack.simulator.token_url,
            api_timeout=api_timeout,
            liveness_factor=FACTOR,
            metrics_port=port,
            grace_period=grace,
        )
        settings = Settings(**_settings_of(stack), api_timeout=api_timeout, liveness_factor=FACTOR)
        bound = liveness.progress_bounds(settings)[liveness.STEPS_LOOP]
        exit_by = bound + liveness.WATCH_EVERY + grace + liveness.EXIT_MARGIN
        assert exit_by + 10 < api_timeout  # the worker must end itself well before any timeout

        # The probe answers before the loops are registered ("ok: 0 loops"): wait for them.
        deadline = time.monotonic() + 30
        loops = len(liveness.progress_bounds(settings))
        while healthz(port) != (200, f"ok: {loops} loops making progress\n"):
            assert time.monotonic() < deadline, worker.log()[-3000:]
            time.sleep(0.2)

        producer.publish(stack.payload(EXAMPLE))
        assert api.held.wait(30), worker.log()[-3000:]
        held_at = time.monotonic()
        seen: list[str] = []
        while worker.process.poll() is None:
            assert time.monotonic() < held_at + exit_by + 10, "the stalled worker did not end"
            status, body = healthz(port)
            if status == 503:
                seen.append(body)
            time.sleep(0.2)
        # Ended by the watchdog, not by the held call giving up: the stuck step thread would
        # have kept the process from exiting by itself until its timeout.
        assert time.monotonic() < held_at + api_timeout
        assert worker.process.returncode == 1
    finally:
        api.close()
    assert seen, "no 503 from /healthz before the worker ended"
    # The claim loop and the poller kept going round: the step loop alone is named.
    assert all(body.startswith("loop engine-steps stalled: no progress for ") for body in seen)
    assert seen[0].count(" stalled: ") == 1

    log = worker.log()
    assert "stopping: loop(s) engine-steps stalled" in log
    assert "exiting now" in log  # the hard exit: a stop cannot wait out a call like this
    assert CLIENT_SECRET not in log


def _settings_of(stack: Stack) -> dict[str, Any]:
    """The settings the worker's bounds depend on, as the harness sets them."""
    env = stack.env()
    return {
        "poll_interval": float(env["BATCH_WORKER_POLL_INTERVAL"]),
        "api_budget_per_minute": int(env["BATCH_WORKER_API_BUDGET_PER_MINUTE"]),
    }
