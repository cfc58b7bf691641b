"""When to read a job's status next: a pure function of what the last reads showed.

A processing job's status changes at its end (or by an action of ours, which the engine
reads by a timed wake of its own): ``completionPercentage`` moves at a fairly steady
rate, and the API shows ``DONE`` a little after 100 % (docs/batch-v2-api.md §3.3). So
while processing, a job is read every ``freshness`` (the bound on a progress event's age)
and, from the rate of its completion, again once its predicted end is near.

The statuses around processing are short, and their next change is due within minutes:
``CREATED`` and ``ANALYSIS_DONE`` show the effect of the analyse or start the worker sent
after the API's status lag, an analysis ends in minutes, and ``DONE`` follows 100 % by a
lag too. Those are read every half ``interval`` ("soon"): at scale the reads are the
newest jobs' list page, shared by every job on it, and they halve the wait from a change
to its event. A job resting at ``ANALYSIS_DONE`` is read every ``rest``. With
``freshness`` at ``interval`` or less, every status is read every ``interval`` (the fixed
clock of contract v1.0).

The rate comes from two reads of the same processing run (``Progress``): the first read
of the status, and the latest. A prediction that is late costs at most ``freshness`` of
latency at the end; one that is early costs reads every half ``interval`` until the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

PROCESSING = "PROCESSING"
# Statuses whose next change comes within minutes (an action's lag, an analysis).
CHANGE_DUE = frozenset({"CREATED", "ANALYSING", "ANALYSIS_DONE"})


@dataclass(frozen=True)
class Progress:
    """The first read of a processing run: when, and the completion it showed (0-100)."""

    at: datetime
    completion: float


def predicted_end(first: Progress, *, seen_at: datetime, completion: float) -> datetime | None:
    """When completion reaches 100 % at the rate between ``first`` and the latest read;
    None while it has not moved (no rate to go by)."""
    elapsed = (seen_at - first.at).total_seconds()
    moved = completion - first.completion
    if elapsed <= 0 or moved <= 0:
        return None
    left = max(0.0, 100.0 - completion)
    return seen_at + timedelta(seconds=left * elapsed / moved)


def next_read_at(
    *,
    status: str | None,
    seen_at: datetime,
    completion: float,
    first: Progress | None,
    interval: timedelta,
    freshness: timedelta,
    rest: timedelta,
    resting: bool = False,
) -> datetime:
    """When the status read at ``seen_at`` is next due. Never sooner than half
    ``interval`` after ``seen_at`` (``rest`` while resting), and no later than
    ``interval`` but while processing, then never later than ``freshness`` (taken as
    ``interval`` when smaller)."""
    if resting:
        return seen_at + rest
    soonest = seen_at + interval
    if freshness <= interval:
        return soonest
    soon = seen_at + interval / 2
    if status in CHANGE_DUE:
        return soon
    if status != PROCESSING:
        return soonest
    if completion >= 100.0:
        return soon  # every tile is done: DONE (or FAILED) follows by the API's lag
    if first is None:
        return soonest
    latest = seen_at + freshness
    end = predicted_end(first, seen_at=seen_at, completion=completion)
    if end is None:
        return soonest
    # Arrive an interval before the predicted end, then at the end, then soon through it.
    if end - seen_at <= interval:
        return max(soon, end)
    return max(soonest, min(latest, end - interval))
