"""The end of a step: the status published, at most one event, and when to wake next."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from worker.lifecycle import followups
from worker.lifecycle.actions import Action, Emit, StopDuplicate, Transition
from worker.lifecycle.draft import Draft
from worker.lifecycle.jobs import forget_credentials
from worker.lifecycle.resume_rules import PAUSED
from worker.lifecycle.state import JobState, Phase


def finish(d: Draft) -> Transition:
    before = d.before
    published = PAUSED if d.state.pause is not None else followups.published_status(d.state)
    if d.tracking and published != d.state.status and not d.hold_status:
        d.set(status=published)
    after = forget_credentials(d.state)
    actions: tuple[Action, ...] = tuple(d.actions)
    if after.phase is Phase.ENDED:
        actions = tuple(a for a in actions if isinstance(a, StopDuplicate))

    kind: Literal["status", "progress"] | None = None
    if before.phase is Phase.ENDED:
        # The one terminal event is out; only a duplicate stopped since (one a sweep found
        # after a cancel while a create was uncertain) is news, told in a progress event.
        if after.duplicates_stopped != before.duplicates_stopped:
            kind = "progress"
    elif after.status != before.status:
        kind = "status"
    elif after.ending_since is None and _progressed(before, after):
        kind = "progress"  # (while the end is held, the terminal event carries it all)
    emits: tuple[Emit, ...] = ()
    if kind is not None:
        after = after.model_copy(update={"sequence": before.sequence + 1})
        emits = (Emit(kind=kind, sequence=after.sequence),)

    return Transition(state=after, actions=actions, emits=emits, wake_at=_wake_at(d, after))


def _progressed(before: JobState, after: JobState) -> bool:
    if after.status is None:
        return False  # nothing published yet: the first status event will carry it all
    if after.duplicates_stopped != before.duplicates_stopped:
        return True
    if after.batch_request_id is not None and after.batch_request_id != before.batch_request_id:
        return True  # a follow-up's request is known: the event names it
    if after.status == "PROCESSING" and after.completion != before.completion:
        return True
    return after.status in ("ANALYSIS_DONE", "PROCESSING") and after.tiles != before.tiles


def _wake_at(d: Draft, after: JobState) -> datetime | None:
    """When to step again with ``Wake`` whatever the API says; None: no timed need.

    A tracked job has no wake of its own: the status poller reads it (every
    ``poll_interval``, ``rest_poll_interval`` while resting) and steps it only when
    something changed. It wakes for what time alone decides: its deadline, an action to
    re-send after the lag, a 404 retry, a held event.
    """
    candidates: list[datetime] = []
    if after.phase is Phase.ENDED:
        return None
    if after.phase is Phase.PENDING_CREATE:
        candidates.append(d.create_at or d.now + d.policy.create_retry)
    if after.deadline is not None and after.deadline > d.now and after.stop_reason is None:
        candidates.append(after.deadline)  # stop on time, not at the next poll
    if d.wake_hint is not None:
        candidates.append(d.wake_hint)
    return min(candidates, default=None)
