"""The read schedule (worker/lifecycle/schedule.py): bounds held for every input, and the
reads it gives a steadily processing job from start to end."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from worker.lifecycle.schedule import (
    CHANGE_DUE,
    PROCESSING,
    Progress,
    next_read_at,
    predicted_end,
)

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
INTERVAL = timedelta(seconds=30)
FRESHNESS = timedelta(minutes=2)
REST = timedelta(minutes=10)
STATUSES = ["CREATED", "ANALYSING", "ANALYSIS_DONE", PROCESSING, "DONE", None]

seconds = st.floats(min_value=0, max_value=86_400, allow_nan=False)
completions = st.floats(min_value=0, max_value=100, allow_nan=False)


def read_at(
    status: str | None,
    seen: datetime,
    completion: float,
    first: Progress | None,
    *,
    freshness: timedelta = FRESHNESS,
    resting: bool = False,
) -> datetime:
    return next_read_at(
        status=status,
        seen_at=seen,
        completion=completion,
        first=first,
        interval=INTERVAL,
        freshness=freshness,
        rest=REST,
        resting=resting,
    )


@given(
    status=st.sampled_from(STATUSES),
    seen=seconds,
    completion=completions,
    first_at=seconds,
    first_completion=completions,
    has_first=st.booleans(),
    freshness=st.floats(min_value=0.1, max_value=3_600, allow_nan=False),
)
def test_a_read_comes_no_sooner_than_half_the_interval_and_no_later_than_the_freshness(
    status: str | None,
    seen: float,
    completion: float,
    first_at: float,
    first_completion: float,
    has_first: bool,
    freshness: float,
) -> None:
    seen_at = T0 + timedelta(seconds=seen)
    first = Progress(T0 + timedelta(seconds=first_at), first_completion) if has_first else None
    fresh = timedelta(seconds=freshness)
    at = read_at(status, seen_at, completion, first, freshness=fresh)
    assert at >= seen_at + INTERVAL / 2
    assert at <= seen_at + max(INTERVAL, fresh)
    if fresh <= INTERVAL:
        assert at == seen_at + INTERVAL  # the fixed clock of contract v1.0
    elif status in CHANGE_DUE or (status == PROCESSING and completion >= 100):
        assert at == seen_at + INTERVAL / 2  # a change is due within minutes
    elif status != PROCESSING:
        assert at == seen_at + INTERVAL  # DONE, an unknown status: nothing to foresee
    elif first is None:
        assert at == seen_at + INTERVAL  # processing, no rate yet


@given(status=st.sampled_from(STATUSES), seen=seconds, completion=completions)
def test_a_resting_job_is_read_at_the_rest_interval(
    status: str | None, seen: float, completion: float
) -> None:
    seen_at = T0 + timedelta(seconds=seen)
    assert read_at(status, seen_at, completion, Progress(T0, 0.0), resting=True) == seen_at + REST


@given(
    first_at=seconds,
    elapsed=st.floats(min_value=0.001, max_value=86_400, allow_nan=False),
    first_completion=completions,
    moved=st.floats(min_value=0.001, max_value=100, allow_nan=False),
)
def test_the_predicted_end_is_where_the_rate_reaches_100(
    first_at: float, elapsed: float, first_completion: float, moved: float
) -> None:
    first = Progress(T0 + timedelta(seconds=first_at), first_completion)
    seen_at = first.at + timedelta(seconds=elapsed)
    completion = first_completion + moved
    end = predicted_end(first, seen_at=seen_at, completion=completion)
    assert end is not None and end >= seen_at
    if completion <= 100:
        rate = moved / (seen_at - first.at).total_seconds()  # microseconds, as stored
        expected = (100 - completion) / rate
        assert abs((end - seen_at).total_seconds() - expected) <= 1e-6 * max(1.0, expected)


@given(first_at=seconds, seen=seconds, completion=completions)
def test_no_rate_without_movement(first_at: float, seen: float, completion: float) -> None:
    first = Progress(T0 + timedelta(seconds=first_at), completion)
    assert predicted_end(first, seen_at=T0 + timedelta(seconds=seen), completion=completion) is None


def reads_of_a_steady_job(duration: float, freshness: timedelta) -> list[float]:
    """The seconds (from the processing start) at which a job going 0 -> 100 % linearly
    over ``duration`` seconds is read, following the schedule, until its end is read."""
    first: Progress | None = None
    t, reads = 0.0, []
    while t < duration:
        completion = min(100.0, 100.0 * t / duration)
        seen = T0 + timedelta(seconds=t)
        reads.append(t)
        first = first or Progress(seen, completion)
        t = (read_at(PROCESSING, seen, completion, first, freshness=freshness) - T0).total_seconds()
    reads.append(t)
    return reads


@given(duration=st.floats(min_value=1, max_value=6 * 3_600, allow_nan=False))
def test_a_steady_job_is_read_at_the_freshness_and_its_end_within_half_an_interval(
    duration: float,
) -> None:
    reads = reads_of_a_steady_job(duration, FRESHNESS)
    end_read = reads[-1]
    # (The second read, at an interval, is the first that has a rate to go by.)
    half = INTERVAL.total_seconds() / 2
    assert duration <= end_read <= max(duration, INTERVAL.total_seconds()) + half + 1e-6
    # Far fewer reads than the fixed clock's: one a freshness, and about two around the end.
    fixed = duration / INTERVAL.total_seconds()
    assert len(reads) <= math.ceil(duration / FRESHNESS.total_seconds()) + 4
    if duration >= 3_600:
        assert len(reads) <= fixed / 3


def done_read(duration: float, lag: float) -> tuple[float, int]:
    """When a job reaching 100 % at ``duration`` and turning DONE ``lag`` later has its
    DONE read, and how many reads it took from its processing start."""
    first: Progress | None = None
    t, reads = 0.0, 0
    while t < duration + lag:
        completion = min(100.0, 100.0 * t / duration)
        seen = T0 + timedelta(seconds=t)
        reads += 1
        first = first or Progress(seen, completion)
        t = (read_at(PROCESSING, seen, completion, first) - T0).total_seconds()
    return t, reads + 1


@given(
    duration=st.floats(min_value=1, max_value=6 * 3_600, allow_nan=False),
    lag=st.floats(min_value=0, max_value=600, allow_nan=False),
)
def test_done_after_100_percent_is_read_within_half_an_interval(
    duration: float, lag: float
) -> None:
    done_at, _ = done_read(duration, lag)
    # A steady rate puts a read at 100 %; from there the job is read every half interval.
    half = INTERVAL.total_seconds() / 2
    assert duration + lag <= done_at <= max(duration + lag, INTERVAL.total_seconds()) + half + 1e-6


def test_an_hour_of_processing_costs_a_read_every_two_minutes_not_every_30_s() -> None:
    # 0 and 30 s (no rate yet), every 2 minutes to 3,390 s, then 3,510, 3,570 and the end.
    assert len(reads_of_a_steady_job(3_600, FRESHNESS)) == 33
    assert len(reads_of_a_steady_job(3_600, INTERVAL)) == 121  # the fixed clock
    # DONE 30 s after 100 %: two reads more (3,615 and 3,630 s; one on the fixed clock).
    assert done_read(3_600, 30) == (3_630, 35)


@given(status=st.sampled_from(sorted(CHANGE_DUE)), seen=seconds)
def test_the_short_statuses_around_processing_are_read_every_half_interval(
    status: str, seen: float
) -> None:
    seen_at = T0 + timedelta(seconds=seen)
    assert read_at(status, seen_at, 0.0, None) == seen_at + INTERVAL / 2
    # ...but not on the fixed clock, nor at rest.
    assert read_at(status, seen_at, 0.0, None, freshness=INTERVAL) == seen_at + INTERVAL
    assert read_at(status, seen_at, 0.0, None, resting=True) == seen_at + REST


def test_the_rate_is_read_again_at_every_read_and_the_end_near_is_read_every_interval() -> None:
    first = Progress(T0, 0.0)
    seen = T0 + timedelta(minutes=10)
    # 50 % in 10 minutes: the end is 10 minutes off.
    assert read_at(PROCESSING, seen, 50.0, first) == seen + FRESHNESS
    # It slowed down: 90 % at 25 minutes, so 2 min 47 s to go at the rate so far.
    later = T0 + timedelta(minutes=25)
    assert read_at(PROCESSING, later, 90.0, first) == later + FRESHNESS
    # 98.5 %: the end, 23 s off, is nearer than an interval: read at it.
    end = later + timedelta(seconds=1.5 * 25 * 60 / 98.5)
    assert abs(read_at(PROCESSING, later, 98.5, first) - end) < timedelta(milliseconds=1)
    # 99.9 %: the end is a second off; half an interval is the soonest read.
    assert read_at(PROCESSING, later, 99.9, first) == later + INTERVAL / 2
    # 62 % at 10 minutes: 6 min 8 s to go, more than a freshness.
    assert read_at(PROCESSING, seen, 62.0, first) == seen + FRESHNESS
    # 85 %: 15 points to go at 8.5 a minute, 106 s: arrive an interval before that.
    expected = seen + timedelta(seconds=15 * 600 / 85) - INTERVAL
    assert abs(read_at(PROCESSING, seen, 85.0, first) - expected) < timedelta(milliseconds=1)
