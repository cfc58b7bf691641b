"""A stop the job did not ask for that its ``resume_on`` goes on from (lifecycle/resume.py)."""

from __future__ import annotations

from worker.lifecycle import resume
from worker.lifecycle.actions import Poll, Start
from worker.lifecycle.draft import Draft, duplicate, end, required
from worker.lifecycle.drive import stop
from worker.lifecycle.guards import wanted_stop
from worker.lifecycle.observations import (
    ActionRefused,
    CancelRequested,
    DuplicateFound,
    Observation,
    StartRequested,
    TaskMissing,
    TaskSeen,
    TilesSeen,
    Wake,
)
from worker.lifecycle.reads import merge_tiles, missing
from worker.lifecycle.state import Phase


def paused(d: Draft, obs: Observation) -> bool:
    """A paused job's step; False: a read shows the request went on, and the step carries
    on as for any tracked job (the read folded from a clean slate: a restart goes back to
    ANALYSIS_DONE, and may start again from 0 %)."""
    s, rid = d.state, required(d.state.batch_request_id)
    pause = s.pause
    assert pause is not None
    match obs:
        case TaskSeen(task=task) if task.id == rid:
            if resume.restarted(pause, task.status, task.cost_pu):
                # The restart's ANALYSIS_DONE counts from this read, so a START is sent
                # again only if it still shows after the lag (not to a request that ran
                # and stopped again meanwhile, which the API may let restart). A restart
                # from below where it stopped processes (and bills) again: the cost of the
                # earlier runs is the base the forecast adds this run's spend to.
                rerun = task.completion_percentage < s.completion
                d.set(
                    pause=None,
                    stopped_reason=None,
                    furthest_rank=0,
                    completion=0.0,
                    analysis_done_at=None,
                    rerun_base_pu=pause.cost_pu if rerun else s.rerun_base_pu,
                )
                return False
            d.set(last_seen_at=d.now, not_found_since=None)
        case Wake() if (
            pause.restart_sent_at is not None and wanted_stop(s, d.now, d.policy) is None
        ):
            d.actions.append(Poll(rid, asap=True))  # has the START shown yet? Read first.
            d.wake_by(d.now + d.policy.poll_interval)  # should that read fail
            return True
        case CancelRequested():
            d.set(cancel_wanted=True)
        case StartRequested():
            d.set(pause=pause.model_copy(update={"resume_requested": True}))
        case TaskMissing(action=action):
            missing(d, action)
        case TilesSeen(tiles=tiles):
            d.set(tiles=merge_tiles(s.tiles, tiles))
        case DuplicateFound(batch_request_id=other):
            duplicate(d, other)
        case ActionRefused():
            # A START inside a restart block longer than ours: read, and send it again
            # after the lag.
            d.actions.append(Poll(rid, asap=True))
        case _:
            pass
    if d.state.phase is not Phase.ENDED:
        drive_paused(d)
    return True


def drive_paused(d: Draft) -> None:
    s, now, lag = d.state, d.now, d.policy.action_lag
    pause, rid = s.pause, required(s.batch_request_id)
    assert pause is not None
    reason = wanted_stop(s, now, d.policy)
    sent = pause.restart_sent_at
    if reason is not None:
        # Cancel, deadline: the request is stopped already, unless the START of a resume
        # was sent less than action_lag ago (it may take effect behind a lagging status).
        if sent is None or now >= sent + lag:
            d.set(pause=None)
            end(d, "STOPPED", stopped_reason=reason.value)
            d.set(stop_reason=reason)
            return
        stop(d, reason)
        d.wake_by(sent + lag)
        return
    if resume.restart_due(pause, now) or (sent is not None and now >= sent + lag):
        # The START (again, when the first shows no effect after the lag).
        d.actions.append(Start(rid))
        resumed = s.resumed if sent is not None else (*s.resumed, pause.reason)
        d.set(
            start_sent_at=now,
            resumed=resumed,
            pause=pause.model_copy(update={"restart_sent_at": now}),
        )
        d.wake_by(now + lag)
    elif sent is not None:
        d.wake_by(sent + lag)
    elif pause.next_start_at is not None:
        d.wake_by(pause.next_start_at)
