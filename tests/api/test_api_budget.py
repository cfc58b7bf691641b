"""The request budget: a token bucket shared by threads (fake clock: no real waiting)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from worker.api.budget import Priority, RequestBudget


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


# --- priorities: threads against a clock only the test moves --------------------------


class SteppedTime:
    """A clock that only the test moves; ``sleep`` blocks until it reaches the deadline.

    Unlike ``FakeTime``, sleepers really wait, so the order in which threads get out of
    ``acquire`` follows the budget's decisions, one clock step at a time.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.sleepers = 0
        self._changed = threading.Condition()

    def clock(self) -> float:
        with self._changed:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._changed:
            deadline = self.now + seconds
            self.sleepers += 1
            self._changed.notify_all()
            self._changed.wait_for(lambda: self.now >= deadline - 1e-9)
            self.sleepers -= 1
            self._changed.notify_all()

    def advance(self, seconds: float) -> None:
        with self._changed:
            self.now += seconds
            self._changed.notify_all()

    def wait_until(self, ready: Callable[[], bool]) -> None:
        """Block until ``ready()`` holds (threads have reached their waits); 5 s means a hang."""
        with self._changed:
            assert self._changed.wait_for(ready, timeout=5.0), "threads never got there"


class Served:
    """Runs ``acquire`` calls on threads and records the order they return in."""

    def __init__(self, budget: RequestBudget) -> None:
        self.budget = budget
        self.order: list[str] = []
        self.waits: dict[str, float] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self, name: str, priority: Priority | None) -> None:
        """``priority=None`` calls ``acquire()`` as callers written before priorities do."""

        def take() -> None:
            waited = self.budget.acquire() if priority is None else self.budget.acquire(priority)
            with self._lock:
                self.order.append(name)
                self.waits[name] = waited

        thread = threading.Thread(target=take, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def count(self) -> int:
        with self._lock:
            return len(self.order)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(timeout=5.0)
            assert not thread.is_alive()


def _equals(read: Callable[[], int], expected: int) -> Callable[[], bool]:
    return lambda: read() == expected


def _stepped(per_minute: int, burst: int) -> tuple[RequestBudget, SteppedTime, Served]:
    fake = SteppedTime()
    budget = RequestBudget(per_minute, burst, clock=fake.clock, sleep=fake.sleep)
    return budget, fake, Served(budget)


def test_a_read_arriving_behind_queued_creates_is_served_first() -> None:
    budget, fake, served = _stepped(per_minute=60, burst=1)  # one token a second
    budget.acquire()  # the bucket is empty from now on
    served.start("create-1", Priority.LOW)
    fake.wait_until(lambda: fake.sleepers == 1)  # the first create waits for a token
    served.start("create-2", Priority.LOW)
    fake.wait_until(lambda: budget.low_priority_waiting == 2)
    served.start("read", Priority.HIGH)
    fake.wait_until(lambda: fake.sleepers == 2)

    fake.advance(1.0)
    fake.wait_until(lambda: served.count() == 1 and fake.sleepers == 1)
    fake.advance(1.0)
    fake.wait_until(lambda: served.count() == 2 and fake.sleepers == 1)
    fake.advance(1.0)
    served.join()

    assert served.order == ["read", "create-1", "create-2"]
    assert served.waits == {
        "read": pytest.approx(1.0),
        "create-1": pytest.approx(2.0),
        "create-2": pytest.approx(3.0),
    }


def test_creates_take_every_token_no_read_waits_for() -> None:
    budget, fake, served = _stepped(per_minute=60, burst=2)

    assert [budget.acquire(Priority.LOW) for _ in range(2)] == [0.0, 0.0]  # the burst

    served.start("create", Priority.LOW)
    fake.wait_until(lambda: fake.sleepers == 1)
    fake.advance(1.0)  # the next token goes to the create: nobody else wants it
    served.join()
    assert served.waits == {"create": pytest.approx(1.0)}


def test_creates_are_served_in_arrival_order() -> None:
    budget, fake, served = _stepped(per_minute=60, burst=1)
    budget.acquire()
    names = [f"create-{n}" for n in range(5)]
    for queued, name in enumerate(names, start=1):
        served.start(name, Priority.LOW)
        fake.wait_until(_equals(lambda: budget.low_priority_waiting, queued))

    for step in range(1, 6):
        fake.wait_until(lambda: fake.sleepers == 1)
        fake.advance(1.0)
        fake.wait_until(_equals(served.count, step))
    served.join()

    assert served.order == names
    assert [served.waits[name] for name in names] == pytest.approx([1.0, 2.0, 3.0, 4.0, 5.0])


def test_reads_are_served_in_arrival_order() -> None:
    budget, fake, served = _stepped(per_minute=60, burst=1)
    budget.acquire()
    names = [f"read-{n}" for n in range(4)]
    for sleeping, name in enumerate(names, start=1):
        served.start(name, Priority.HIGH)
        fake.wait_until(_equals(lambda: fake.sleepers, sleeping))

    for step in range(1, 5):
        fake.advance(1.0)
        fake.wait_until(_equals(served.count, step))
    served.join()

    assert served.order == names
    assert [served.waits[name] for name in names] == pytest.approx([1.0, 2.0, 3.0, 4.0])


def test_a_create_waiting_for_a_token_is_held_back_by_defer() -> None:
    budget, fake, served = _stepped(per_minute=60, burst=1)
    budget.acquire()
    served.start("create", Priority.LOW)
    fake.wait_until(lambda: fake.sleepers == 1)

    budget.defer(3.0)  # a 429 while the create sleeps: it must not go out at t=1
    fake.advance(1.0)
    fake.wait_until(lambda: fake.now == 1.0 and fake.sleepers == 1)
    assert served.count() == 0
    fake.advance(3.0)
    served.join()

    assert served.waits == {"create": pytest.approx(4.0)}
    assert budget.low_priority_waiting == 0


def test_the_default_priority_is_high() -> None:
    budget, fake, served = _stepped(per_minute=60, burst=1)
    budget.acquire()
    served.start("create", Priority.LOW)
    fake.wait_until(lambda: fake.sleepers == 1)
    served.start("default", None)
    fake.wait_until(lambda: fake.sleepers == 2)

    fake.advance(1.0)
    fake.wait_until(lambda: served.count() == 1 and fake.sleepers == 1)
    fake.advance(1.0)
    served.join()

    assert served.order == ["default", "create"]
