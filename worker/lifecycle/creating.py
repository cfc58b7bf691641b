"""Creating the batch request: at most one POST that may have landed, scanned for first.

Apart from the pending phase because a follow-up (``ending``) creates too.
"""

from __future__ import annotations

from datetime import datetime

from worker.lifecycle import followups
from worker.lifecycle.actions import Create
from worker.lifecycle.draft import Draft, end, not_before, required
from worker.lifecycle.state import JobError

CREATE_ATTEMPTS_EXHAUSTED = "CREATE_ATTEMPTS_EXHAUSTED"


def create(d: Draft) -> None:
    s, now, policy = d.state, d.now, d.policy
    if s.intent_at is None:
        # Nothing can exist yet: POST at once (the saved intent makes any retry scan first).
        d.set(intent_at=now, create_attempts=1)
        d.actions.append(Create())
        return
    if not s.create_doubtful:
        d.set(create_doubtful=True)  # a retry after a crash: the last POST may have landed
    lag_ends = s.intent_at + policy.list_lag_window
    since = s.intent_at - policy.clock_skew
    if now < lag_ends:
        # The last POST may not be listed yet: scan only (the engine answers NotFoundYet).
        d.actions.append(Create(search_since=since, create_not_before=lag_ends))
        return
    if s.create_attempts >= policy.max_create_attempts:
        message = f"no batch request could be created in {s.create_attempts} attempts"
        error = JobError(source="worker", code=CREATE_ATTEMPTS_EXHAUSTED, message=message)
        create_failed(d, error)
        return
    # This action may POST, so the intent moves now, in the state saved before the POST:
    # the next attempt's lag window is measured from this POST, its scan reaches back past it.
    d.set(intent_at=now, create_attempts=s.create_attempts + 1)
    d.actions.append(Create(search_since=since, create_not_before=now))


def create_failed(d: Draft, error: JobError) -> None:
    if d.state.retry.attempt == 0:
        end(d, "FAILED", error=error)
        return
    # A follow-up that cannot be made ends the job as its last request ended.
    d.state = followups.end_after_failed_create(d.state, error)
    end(d, required(d.state.upstream_status))


def create_not_done(d: Draft, retry_at: datetime) -> None:
    """Undo the attempt the API refused unprocessed (a 429): nothing was created by it."""
    s = d.state
    if not s.create_doubtful:
        # No earlier attempt may have landed either: the next is a plain POST again.
        d.set(intent_at=None, create_attempts=max(0, s.create_attempts - 1))
    elif s.intent_at is not None:
        # An earlier attempt may have landed, and its lag window is over (this POST came
        # after it): backdating the intent by one window makes the next attempt scan
        # (reaching further back, which is harmless) and POST at once.
        d.set(
            intent_at=s.intent_at - d.policy.list_lag_window,
            create_attempts=max(0, s.create_attempts - 1),
        )
    d.create_at = not_before(d, retry_at)
