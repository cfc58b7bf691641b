"""What the status poller schedules and compares a job by, derived from its state.

The store writes these next to the state at every insert and save (worker/store/jobs.py),
as columns of their own, so no query reads fields out of the state's JSON: a field renamed
or a rule changed here reaches the poller with the next save, instead of leaving a query
that reads a missing JSON key as false.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from worker.lifecycle.state import JobState


class PollView(NamedTuple):
    """The derived columns of a job's row; the field names are the column names."""

    # The status a read is compared with: the last one read from the API (an event may be
    # held back for tiles, and a held status is no change), else the one published.
    read_status: str | None
    completion: float
    cost_pu: float | None
    # At ANALYSIS_DONE waiting for a `start`: read at the rest interval.
    resting: bool
    # An earlier create may have made a request the job does not know: duplicate sweeps
    # look for it soon, and for a while after the job ended.
    create_doubtful: bool
    intent_at: datetime | None  # the job's last create attempt
    # Which of the job's requests is current (0: the first, n: the follow-up of attempt n):
    # duplicate sweeps look for every tag the job has used (lifecycle/followups.py).
    attempt: int


def read_status(state: JobState) -> str | None:
    return state.upstream_status if state.upstream_status is not None else state.status


def resting(state: JobState) -> bool:
    """Analysed, with no ``start`` (and no cancel) to act on, or paused: nothing will happen
    until a producer decides (or the pause's time comes), so its status is read less often
    (docs/lifecycle.md)."""
    if state.pause is not None and state.pause.restart_sent_at is None:
        return True  # paused: its own wake-up STARTs it; a read only watches
    return (
        read_status(state) == "ANALYSIS_DONE" and not state.start_wanted and not state.cancel_wanted
    )


def poll_view(state: JobState) -> PollView:
    return PollView(
        read_status=read_status(state),
        completion=state.completion,
        cost_pu=state.cost_pu,
        resting=resting(state),
        create_doubtful=state.create_doubtful,
        intent_at=state.intent_at,
        attempt=state.retry.attempt,
    )
