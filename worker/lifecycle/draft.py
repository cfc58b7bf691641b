"""One step in the making, and the changes every phase makes to it the same way.

The phases of ``machine.step`` hand one ``Draft`` to each other, so its mechanics (and the
end, a duplicate's stop, a retry's earliest time) are kept here, below all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from worker.lifecycle.actions import Action, Policy, StopDuplicate
from worker.lifecycle.state import JobError, JobState, Phase

SendKind = Literal["analyse", "start", "stop"]


# The shortest wait before a call the API refused unprocessed goes again.
RETRY_AT_LEAST = timedelta(seconds=1)


@dataclass
class Draft:
    """One step in the making: the state as it changes, and what the step will ask for."""

    before: JobState
    state: JobState
    now: datetime
    policy: Policy
    actions: list[Action] = field(default_factory=list)
    wake_hint: datetime | None = None  # wake earlier than the phase's usual interval
    status_read: bool = False  # a fresh (not stale) task status was read in this step
    hold_status: bool = False  # don't publish the upstream status yet (waiting for tiles)
    # A create refused before it was processed: the next try waits for this, not the
    # usual create_retry (the API's Retry-After).
    create_at: datetime | None = None

    def set(self, **changes: Any) -> None:
        self.state = self.state.model_copy(update=changes)

    def wake_by(self, when: datetime) -> None:
        self.wake_hint = when if self.wake_hint is None else min(self.wake_hint, when)

    @property
    def tracking(self) -> bool:
        return self.state.phase is Phase.TRACKING


def required(batch_request_id: str | None) -> str:
    assert batch_request_id is not None  # tracking (or adopting) implies a known request
    return batch_request_id


def end(
    d: Draft,
    status: str,
    *,
    stopped_reason: str | None = None,
    error: JobError | None = None,
) -> None:
    d.set(
        phase=Phase.ENDED,
        status=status,
        stopped_reason=stopped_reason,
        error=error,
        ended_at=d.now,
        pause=None,  # an end (a 404 while paused, say) is no pause
    )


def duplicate(d: Draft, batch_request_id: str) -> None:
    if batch_request_id in (d.state.batch_request_id, d.state.adopt_id):
        return
    # Asked again on every report: the state recording the first stop is saved before the
    # stop is sent, so a crash in between would otherwise leave the duplicate running.
    d.actions.append(StopDuplicate(batch_request_id))
    if batch_request_id not in d.state.duplicates_stopped:
        d.set(duplicates_stopped=(*d.state.duplicates_stopped, batch_request_id))


def not_before(d: Draft, retry_at: datetime) -> datetime:
    # A Retry-After of 0 (or a clock gone by) still waits a moment: never a busy loop.
    return max(retry_at, d.now + RETRY_AT_LEAST)
