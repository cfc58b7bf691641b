"""A terminal status is known: the event waits for the final tile counts, and, on DONE with
FATAL features, for the follow-up's input (docs/lifecycle.md).
"""

from __future__ import annotations

from worker.lifecycle import followups
from worker.lifecycle.actions import ReadTiles, WriteRetryInput
from worker.lifecycle.creating import create
from worker.lifecycle.draft import Draft, duplicate, end, required
from worker.lifecycle.guards import wanted_stop
from worker.lifecycle.observations import (
    CancelRequested,
    DuplicateFound,
    Observation,
    RetryInputFailed,
    RetryInputWritten,
    TilesSeen,
    TilesUnavailable,
    Wake,
)
from worker.lifecycle.reads import merge
from worker.lifecycle.state import JobError


def hold_for_final_tiles(d: Draft) -> None:
    since = d.state.ending_since
    assert since is not None
    d.actions.append(ReadTiles(required(d.state.batch_request_id), execution_db=True))
    d.hold_status = True
    d.wake_by(since + d.policy.tiles_wait)


def ending(d: Draft, obs: Observation) -> None:
    """A terminal status is known; its event waits for the final tile counts."""
    s = d.state
    assert s.ending_since is not None and s.upstream_status is not None
    if isinstance(obs, DuplicateFound):
        duplicate(d, obs.batch_request_id)
    if s.retry.writing_since is not None:
        _writing_retry_input(d, obs)
        return
    if isinstance(obs, TilesSeen):
        d.set(tiles=merge(s, obs.tiles))
    final = isinstance(obs, TilesSeen | TilesUnavailable)
    if final or d.now >= s.ending_since + d.policy.tiles_wait:
        if followups.follow_up_due(d.state):
            skipped = followups.why_not(d.state)
            if skipped is None:
                d.set(retry=d.state.retry.model_copy(update={"writing_since": d.now}))
                _ask_retry_input(d)
                return
            d.set(retry=d.state.retry.model_copy(update={"skipped": skipped}))
        end(d, s.upstream_status, stopped_reason=s.stopped_reason, error=s.error)
    else:
        # The read was lost (a crash, a hand-over): ask again, still within the wait.
        hold_for_final_tiles(d)


def _ask_retry_input(d: Draft) -> None:
    s = d.state
    d.actions.append(WriteRetryInput(required(s.batch_request_id), s.retry.attempt + 1))
    d.hold_status = True
    # Answered within the step that asks; should the answer be lost (a crash), ask again.
    d.wake_by(d.now + d.policy.tiles_wait)


def _writing_retry_input(d: Draft, obs: Observation) -> None:
    """DONE with FATAL features: the follow-up's input is being written (docs/lifecycle.md)."""
    s = d.state
    match obs:
        case RetryInputWritten(url=url, features=features):
            d.state = followups.begin(s, url=url, features=features, now=d.now)
            # The follow-up's own progress forecasts the job's cost afresh (with the sum).
            d.set(cost_forecast=None)
            reason = wanted_stop(d.state, d.now, d.policy)
            if reason is not None:
                # A cancel or a deadline that came while the input was written: nothing
                # was created, the job ends as its last request did.
                d.state = followups.end_after_failed_create(
                    d.state, JobError(source="worker", code=reason.value, message="not re-run")
                )
                end(d, required(d.state.upstream_status))
                return
            create(d)
        case RetryInputFailed(error=error):
            d.set(retry=s.retry.model_copy(update={"writing_since": None, "skipped": error}))
            end(d, required(s.upstream_status), stopped_reason=s.stopped_reason, error=s.error)
        case Wake():
            _ask_retry_input(d)  # the answer was lost (a crash, a hand-over): ask again
        case _:
            d.hold_status = True  # anything else (a cancel is folded in) waits for the answer
            if isinstance(obs, CancelRequested):
                d.set(cancel_wanted=True)
