"""A known request's observations, and a task read folded into the state."""

from __future__ import annotations

from worker.lifecycle import resume
from worker.lifecycle.actions import Poll
from worker.lifecycle.cost import linear_forecast
from worker.lifecycle.draft import Draft, duplicate, end, not_before, required
from worker.lifecycle.drive import drive
from worker.lifecycle.ending import ending, hold_for_final_tiles
from worker.lifecycle.guards import bound_before_start, stop_to_decide
from worker.lifecycle.observations import (
    ActionRefused,
    CallNotDone,
    CancelRequested,
    CreateSucceeded,
    DuplicateFound,
    Observation,
    StartRequested,
    TaskMissing,
    TaskSeen,
    TilesSeen,
    TilesUnavailable,
    Wake,
)
from worker.lifecycle.paused import drive_paused, paused
from worker.lifecycle.reads import merge, missing
from worker.lifecycle.state import STATUS_RANK, TERMINAL, JobError, TaskSnapshot

BATCH_FAILED = "BATCH_FAILED"


def tracking(d: Draft, obs: Observation) -> None:
    rid = required(d.state.batch_request_id)
    if d.state.ending_since is not None:
        ending(d, obs)
        return
    if d.state.pause is not None and paused(d, obs):
        return
    match obs:
        case Wake() if stop_to_decide(d.state, d.now, d.policy):
            d.actions.append(Poll(rid))  # a deadline: stop now (the read rides on the poller)
        case Wake():
            # A resend, a 404 retry, a hold: the status held may be a poll old, so read it
            # first and decide on what it says (one GET instead of a refused resend).
            d.actions.append(Poll(rid, asap=True))
            d.wake_by(d.now + d.policy.poll_interval)  # should that read fail
            return
        case StartRequested():
            d.set(start_wanted=True)
        case CancelRequested():
            d.set(cancel_wanted=True)
        case TaskSeen(task=task) | CreateSucceeded(task=task) if task.id == rid:
            fold_task(d, task)
        case CreateSucceeded(task=task):
            duplicate(d, task.id)  # a second request carrying this job's tag
        case TaskMissing(action=action):
            missing(d, action)
        case ActionRefused():
            # Usually the status moved already (§3.3): read it now rather than fail.
            d.actions.append(Poll(rid, asap=True))
        case CallNotDone(action="analyse" | "start" | "stop" as kind, retry_at=retry_at):
            # Refused unprocessed (a 429): it had no effect, so no status lag to wait out;
            # it goes again once the API allows (the Wake reads the status, then sends).
            d.set(**{f"{kind}_sent_at": None})
            d.wake_by(not_before(d, retry_at))
            return
        case TilesSeen(tiles=tiles, cost_bound_pu=bound):
            d.set(tiles=merge(d.state, tiles))
            bound_before_start(d, bound)
        case TilesUnavailable():
            bound_before_start(d, None)
        case DuplicateFound(batch_request_id=other):
            duplicate(d, other)
        case _:
            pass  # create answers are late news once the request is known
    if d.tracking and d.state.pause is None:
        drive(d)


def fold_task(d: Draft, task: TaskSnapshot) -> None:
    s = d.state
    d.set(
        last_seen_at=d.now,
        not_found_since=None,
        not_found_count=0,
        resend_not_before=None,  # the request is known now: an action 404'd goes at once
        upstream_created=s.upstream_created or task.created,
    )
    rank = STATUS_RANK.get(task.status)
    if rank is not None and rank < s.furthest_rank:
        return  # a stale copy: an older read arriving after a newer one
    d.status_read = True
    if task.status == "ANALYSIS_DONE" and s.analysis_done_at is None:
        d.set(analysis_done_at=d.now)
    completion = max(s.completion, task.completion_percentage)
    cost_pu = max(s.cost_pu or 0.0, task.cost_pu)
    past = sum(p.cost_pu for p in s.retry.past)  # the cap covers every request of the job
    forecast = linear_forecast(
        completion, cost_pu, d.policy.cost_min_completion, past, s.rerun_base_pu
    )
    d.set(
        upstream_status=task.status,
        furthest_rank=max(s.furthest_rank, rank or 0),
        # Neither goes down for one request; a lower figure is an older read.
        completion=completion,
        cost_pu=cost_pu,
        # Until progress makes one, a bound known before START stands.
        cost_forecast=forecast or s.cost_forecast,
    )
    if task.status not in TERMINAL:
        return
    error: JobError | None = None
    reason: str | None = None
    if task.status == "FAILED":
        message = task.error or "the batch request failed"
        error = JobError(source="api", code=BATCH_FAILED, message=message)
    elif task.status == "STOPPED":
        # The worker's own reason when it asked for the stop, else the API's.
        reason = s.stop_reason.value if s.stop_reason is not None else task.stopped_reason
        pause = resume.pause_for(
            d.state,
            task.stopped_reason,
            d.now,
            restart_block=d.policy.restart_block,
            restart_jitter=d.policy.restart_jitter,
        )
        if pause is not None:
            # A stop the job did not ask for, and its resume_on says go on: a pause.
            d.set(pause=pause, stopped_reason=task.stopped_reason)
            drive_paused(d)
            return
    if task.status == "DONE" or s.furthest_rank >= STATUS_RANK["PROCESSING"]:
        # The execution database is re-read only with a status read, so the counts held
        # are one poll old: read them once more and hold the terminal event for that read.
        d.set(ending_since=d.now, stopped_reason=reason, error=error)
        hold_for_final_tiles(d)
    else:
        end(d, task.status, stopped_reason=reason, error=error)
