"""Before the job knows its request: create it (or wait for the one it adopts)."""

from __future__ import annotations

from worker.lifecycle.actions import Adopt
from worker.lifecycle.creating import create, create_failed, create_not_done
from worker.lifecycle.draft import Draft, end, required
from worker.lifecycle.drive import drive
from worker.lifecycle.guards import wanted_stop
from worker.lifecycle.observations import (
    CallNotDone,
    CancelRequested,
    CreateRefused,
    CreateSucceeded,
    CreateUncertain,
    Observation,
    StartRequested,
    TaskMissing,
    TaskSeen,
    Wake,
)
from worker.lifecycle.reads import not_found
from worker.lifecycle.state import Phase, TaskSnapshot
from worker.lifecycle.tracking import fold_task


def pending(d: Draft, obs: Observation) -> None:
    adopting = d.state.adopt_id is not None
    match obs:
        case CancelRequested():
            d.set(cancel_wanted=True)
        case StartRequested():
            d.set(start_wanted=True)
        # No DuplicateFound here: before the job knows its request, a tagged request IS
        # its request, and the next create's scan takes it up (CreateSucceeded found=True).
        case CreateSucceeded(task=task) if not adopting:
            _begin_tracking(d, task)
        case CreateRefused(error=error) if not adopting:
            create_failed(d, error)
        case CreateUncertain() if not adopting:
            d.set(create_doubtful=True)
        case CallNotDone(action="create", retry_at=retry_at) if not adopting:
            create_not_done(d, retry_at)
        case TaskSeen(task=task) if adopting and task.id == d.state.adopt_id:
            _begin_tracking(d, task)
        case TaskMissing() if adopting:
            end(d, "FAILED", error=not_found(d.state.adopt_id))
        case _:
            pass  # Wake; NotFoundYet waits for the next Wake
    if d.tracking:
        if d.state.pause is None:
            drive(d)
    elif d.state.phase is not Phase.PENDING_CREATE:
        return
    elif adopting:
        # Cancel and deadline wait for the adopted request's status: it may be running.
        if isinstance(obs, Wake):
            d.actions.append(Adopt(required(d.state.adopt_id)))
    else:
        reason = wanted_stop(d.state, d.now, d.policy)
        if reason is not None:
            # Nothing upstream to stop. Should an uncertain create have made a request after
            # all, the poller keeps sweeping for the ended job a while (create_doubtful),
            # and a running one is reported as a duplicate and stopped then.
            end(d, "STOPPED", stopped_reason=reason.value)
            d.set(stop_reason=reason)
        elif isinstance(obs, Wake):
            create(d)


def _begin_tracking(d: Draft, task: TaskSnapshot) -> None:
    d.set(phase=Phase.TRACKING, batch_request_id=task.id)
    fold_task(d, task)
