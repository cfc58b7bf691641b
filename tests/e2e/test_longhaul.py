"""The long haul, lean (bench/bench_longhaul.py runs it longer, with broker and PostgreSQL
restarts): two workers, a worker SIGKILLed at random every few seconds and a new one started,
and at the end every accepted job has exactly one terminal event and one batch request."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from tests.e2e.conftest import Events, Producer, Stack, WorkerProcess
from tests.e2e.test_recovery import assert_each_once

pytestmark = pytest.mark.integration

StartWorker = Callable[..., WorkerProcess]
GEOTIFF = "max-ndvi-geotiff.json"
JOBS = 30
KILLS = 4


def test_jobs_survive_a_worker_killed_every_few_seconds(
    stack: Stack, start_worker: StartWorker, events: Events, producer: Producer
) -> None:
    stack.simulator.configure(speed=60.0, latency=0.2)
    dice = random.Random(11)
    alive = [start_worker(), start_worker()]
    jobs = [stack.payload(GEOTIFF, features=2) for _ in range(JOBS)]
    for job in jobs:
        producer.publish(job)
    for _ in range(KILLS):
        events.pump(dice.uniform(2.0, 4.0))  # reads events meanwhile (waits ~3 s)
        victim = alive.pop(dice.randrange(len(alive)))
        victim.kill()
        alive.append(start_worker())
    stack.simulator.configure(latency=0.0)
    assert_each_once(stack, events, jobs)
