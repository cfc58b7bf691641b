"""The request budget: a token bucket shared by threads (fake clock: no real waiting)."""

from __future__ import annotations

import threading

import pytest

from worker.api.budget import RequestBudget


class FakeTime:
    """A clock that sleeping moves forward; thread-safe enough for the budget's use."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)


def _budget(per_minute: int, burst: int | None = None) -> tuple[RequestBudget, FakeTime]:
    fake = FakeTime()
    return RequestBudget(per_minute, burst, clock=fake.clock, sleep=fake.sleep), fake


def test_a_burst_goes_at_once_then_requests_are_spaced_by_the_rate() -> None:
    budget, fake = _budget(per_minute=60, burst=3)  # one per second

    waits = [budget.acquire() for _ in range(5)]

    assert waits == [0.0, 0.0, 0.0, pytest.approx(1.0), pytest.approx(2.0)]
    assert fake.slept == waits[3:]


def test_time_refills_the_bucket_up_to_its_capacity() -> None:
    budget, fake = _budget(per_minute=60, burst=2)
    budget.acquire()
    budget.acquire()
    fake.now += 100.0  # a long pause refills only up to the burst

    assert [budget.acquire() for _ in range(3)] == [0.0, 0.0, pytest.approx(1.0)]


def test_the_default_burst_is_ten_seconds_of_rate() -> None:
    assert RequestBudget(300).capacity == 50
    assert RequestBudget(1).capacity == 1


def test_waiting_threads_queue_in_turn() -> None:
    budget, _ = _budget(per_minute=600, burst=1)  # one per 0.1 s
    budget.acquire()
    waits: list[float] = []
    lock = threading.Lock()

    def take() -> None:
        waited = budget.acquire()
        with lock:
            waits.append(waited)

    threads = [threading.Thread(target=take) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(waits) == pytest.approx([0.1 * n for n in range(1, 11)])


def test_defer_holds_everyone_back() -> None:
    budget, _ = _budget(per_minute=60, burst=5)

    budget.defer(3.0)

    assert budget.acquire() == pytest.approx(4.0)


@pytest.mark.parametrize(("per_minute", "burst"), [(0, None), (10, 0)])
def test_nonsense_limits_are_refused(per_minute: int, burst: int | None) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RequestBudget(per_minute, burst)
