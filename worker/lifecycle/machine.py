"""The step: one observation in, the new state, the actions and at most one event out.

The rules, and why, are in ``docs/lifecycle.md``; the sections of batch-v2-api.md cited
here are where the API behaviour they rely on is documented.

Past the ~450-line guide on purpose: this is one transition function. Its phases (pending,
creating, tracking, ending) hand one draft to each other and to the guards (deadline, cost,
cancel) that every phase applies; split across modules, a rule would be read in three files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from worker.lifecycle import followups, resume
from worker.lifecycle.actions import (
    Action,
    Adopt,
    Analyse,
    Create,
    Emit,
    Policy,
    Poll,
    ReadTiles,
    Start,
    Stop,
    StopDuplicate,
    Transition,
    WriteRetryInput,
)
from worker.lifecycle.cost import bound_exceeds_cap, linear_forecast, lower_bound, over_forecast
from worker.lifecycle.jobs import forget_credentials
from worker.lifecycle.observations import (
    ActionRefused,
    CallNotDone,
    CancelRequested,
    CreateRefused,
    CreateSucceeded,
    CreateUncertain,
    DuplicateFound,
    Observation,
    RetryInputFailed,
    RetryInputWritten,
    StartRequested,
    TaskMissing,
    TaskSeen,
    TilesSeen,
    TilesUnavailable,
    Wake,
)
from worker.lifecycle.resume_rules import PAUSED
from worker.lifecycle.state import (
    STATUS_RANK,
    TERMINAL,
    JobError,
    JobState,
    Phase,
    StoppedReason,
    TaskSnapshot,
    Tiles,
)

UPSTREAM_NOT_FOUND = "UPSTREAM_NOT_FOUND"
BATCH_FAILED = "BATCH_FAILED"
CREATE_ATTEMPTS_EXHAUSTED = "CREATE_ATTEMPTS_EXHAUSTED"

_SendKind = Literal["analyse", "start", "stop"]
# The shortest wait before a call the API refused unprocessed goes again.
RETRY_AT_LEAST = timedelta(seconds=1)


@dataclass
class _Draft:
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


DEFAULT_POLICY = Policy()


def step(
    state: JobState, observation: Observation, now: datetime, policy: Policy = DEFAULT_POLICY
) -> Transition:
    """Fold one observation into the job's state; say what to do next and what to publish."""
    draft = _Draft(before=state, state=state, now=now, policy=policy)
    if state.phase is Phase.ENDED:
        _after_end(draft, observation)
    elif state.phase is Phase.PENDING_CREATE:
        _pending(draft, observation)
    else:
        _tracking(draft, observation)
    return _finish(draft)


def fold_requests(state: JobState, *, cancel: bool, start: bool) -> JobState:
    """The state with a ``cancel`` / ``start`` that arrived while a step was being decided.

    The engine steps the same observation again on it (the first decision is discarded
    unsaved, its actions never run): the request is known *before* that observation, as if
    it had come just ahead of it, without a step of its own in between (which, before a
    request is known, would end the job and make the request the create just returned look
    like a duplicate). An ended job is left as it is.
    """
    if state.phase is Phase.ENDED:
        return state
    changes: dict[str, object] = {}
    if cancel and not state.cancel_wanted:
        changes["cancel_wanted"] = True
    if start and not state.start_wanted:
        changes["start_wanted"] = True
    if start and state.pause is not None and not state.pause.resume_requested:
        changes["pause"] = state.pause.model_copy(update={"resume_requested": True})
    return state.model_copy(update=changes) if changes else state


# -- ENDED -------------------------------------------------------------------------------


def _after_end(d: _Draft, obs: Observation) -> None:
    # A request that turns up after the end (a create found by a late scan, say after a
    # cancel while a create was uncertain) must still be stopped; nothing else matters.
    if isinstance(obs, DuplicateFound):
        _duplicate(d, obs.batch_request_id)
    elif isinstance(obs, CreateSucceeded):
        _duplicate(d, obs.task.id)


def _duplicate(d: _Draft, batch_request_id: str) -> None:
    if batch_request_id in (d.state.batch_request_id, d.state.adopt_id):
        return
    # Asked again on every report: the state recording the first stop is saved before the
    # stop is sent, so a crash in between would otherwise leave the duplicate running.
    d.actions.append(StopDuplicate(batch_request_id))
    if batch_request_id not in d.state.duplicates_stopped:
        d.set(duplicates_stopped=(*d.state.duplicates_stopped, batch_request_id))


def _end(
    d: _Draft,
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


# -- PENDING_CREATE ------------------------------------------------------------------------


def _pending(d: _Draft, obs: Observation) -> None:
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
            _create_failed(d, error)
        case CreateUncertain() if not adopting:
            d.set(create_doubtful=True)
        case CallNotDone(action="create", retry_at=retry_at) if not adopting:
            _create_not_done(d, retry_at)
        case TaskSeen(task=task) if adopting and task.id == d.state.adopt_id:
            _begin_tracking(d, task)
        case TaskMissing() if adopting:
            _end(d, "FAILED", error=_not_found(d.state.adopt_id))
        case _:
            pass  # Wake; NotFoundYet waits for the next Wake
    if d.tracking:
        if d.state.pause is None:
            _drive(d)
    elif d.state.phase is not Phase.PENDING_CREATE:
        return
    elif adopting:
        # Cancel and deadline wait for the adopted request's status: it may be running.
        if isinstance(obs, Wake):
            d.actions.append(Adopt(_required(d.state.adopt_id)))
    else:
        reason = _wanted_stop(d.state, d.now, d.policy)
        if reason is not None:
            # Nothing upstream to stop. Should an uncertain create have made a request after
            # all, the poller keeps sweeping for the ended job a while (create_doubtful),
            # and a running one is reported as a duplicate and stopped then.
            _end(d, "STOPPED", stopped_reason=reason.value)
            d.set(stop_reason=reason)
        elif isinstance(obs, Wake):
            _create(d)


def _create(d: _Draft) -> None:
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
        _create_failed(d, error)
        return
    # This action may POST, so the intent moves now, in the state saved before the POST:
    # the next attempt's lag window is measured from this POST, its scan reaches back past it.
    d.set(intent_at=now, create_attempts=s.create_attempts + 1)
    d.actions.append(Create(search_since=since, create_not_before=now))


def _create_failed(d: _Draft, error: JobError) -> None:
    if d.state.retry.attempt == 0:
        _end(d, "FAILED", error=error)
        return
    # A follow-up that cannot be made ends the job as its last request ended.
    d.state = followups.end_after_failed_create(d.state, error)
    _end(d, _required(d.state.upstream_status))


def _create_not_done(d: _Draft, retry_at: datetime) -> None:
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
    d.create_at = _not_before(d, retry_at)


def _not_before(d: _Draft, retry_at: datetime) -> datetime:
    # A Retry-After of 0 (or a clock gone by) still waits a moment: never a busy loop.
    return max(retry_at, d.now + RETRY_AT_LEAST)


def _begin_tracking(d: _Draft, task: TaskSnapshot) -> None:
    d.set(phase=Phase.TRACKING, batch_request_id=task.id)
    _fold_task(d, task)


# -- TRACKING -------------------------------------------------------------------------------


def _required(batch_request_id: str | None) -> str:
    assert batch_request_id is not None  # tracking (or adopting) implies a known request
    return batch_request_id


def _tracking(d: _Draft, obs: Observation) -> None:
    rid = _required(d.state.batch_request_id)
    if d.state.ending_since is not None:
        _ending(d, obs)
        return
    if d.state.pause is not None and _paused(d, obs):
        return
    match obs:
        case Wake() if _stop_to_decide(d.state, d.now, d.policy):
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
            _fold_task(d, task)
        case CreateSucceeded(task=task):
            _duplicate(d, task.id)  # a second request carrying this job's tag
        case TaskMissing(action=action):
            _missing(d, action)
        case ActionRefused():
            # Usually the status moved already (§3.3): read it now rather than fail.
            d.actions.append(Poll(rid, asap=True))
        case CallNotDone(action="analyse" | "start" | "stop" as kind, retry_at=retry_at):
            # Refused unprocessed (a 429): it had no effect, so no status lag to wait out;
            # it goes again once the API allows (the Wake reads the status, then sends).
            d.set(**{f"{kind}_sent_at": None})
            d.wake_by(_not_before(d, retry_at))
            return
        case TilesSeen(tiles=tiles, cost_bound_pu=bound):
            d.set(tiles=_merge(d.state, tiles))
            _bound_before_start(d, bound)
        case TilesUnavailable():
            _bound_before_start(d, None)
        case DuplicateFound(batch_request_id=other):
            _duplicate(d, other)
        case _:
            pass  # create answers are late news once the request is known
    if d.tracking and d.state.pause is None:
        _drive(d)


def _fold_task(d: _Draft, task: TaskSnapshot) -> None:
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
            _drive_paused(d)
            return
    if task.status == "DONE" or s.furthest_rank >= STATUS_RANK["PROCESSING"]:
        # The execution database is re-read only with a status read, so the counts held
        # are one poll old: read them once more and hold the terminal event for that read.
        d.set(ending_since=d.now, stopped_reason=reason, error=error)
        _hold_for_final_tiles(d)
    else:
        _end(d, task.status, stopped_reason=reason, error=error)


def _hold_for_final_tiles(d: _Draft) -> None:
    since = d.state.ending_since
    assert since is not None
    d.actions.append(ReadTiles(_required(d.state.batch_request_id), execution_db=True))
    d.hold_status = True
    d.wake_by(since + d.policy.tiles_wait)


def _ending(d: _Draft, obs: Observation) -> None:
    """A terminal status is known; its event waits for the final tile counts."""
    s = d.state
    assert s.ending_since is not None and s.upstream_status is not None
    if isinstance(obs, DuplicateFound):
        _duplicate(d, obs.batch_request_id)
    if s.retry.writing_since is not None:
        _writing_retry_input(d, obs)
        return
    if isinstance(obs, TilesSeen):
        d.set(tiles=_merge(s, obs.tiles))
    final = isinstance(obs, TilesSeen | TilesUnavailable)
    if final or d.now >= s.ending_since + d.policy.tiles_wait:
        if followups.follow_up_due(d.state):
            skipped = followups.why_not(d.state)
            if skipped is None:
                d.set(retry=d.state.retry.model_copy(update={"writing_since": d.now}))
                _ask_retry_input(d)
                return
            d.set(retry=d.state.retry.model_copy(update={"skipped": skipped}))
        _end(d, s.upstream_status, stopped_reason=s.stopped_reason, error=s.error)
    else:
        # The read was lost (a crash, a hand-over): ask again, still within the wait.
        _hold_for_final_tiles(d)


def _ask_retry_input(d: _Draft) -> None:
    s = d.state
    d.actions.append(WriteRetryInput(_required(s.batch_request_id), s.retry.attempt + 1))
    d.hold_status = True
    # Answered within the step that asks; should the answer be lost (a crash), ask again.
    d.wake_by(d.now + d.policy.tiles_wait)


def _writing_retry_input(d: _Draft, obs: Observation) -> None:
    """DONE with FATAL features: the follow-up's input is being written (docs/lifecycle.md)."""
    s = d.state
    match obs:
        case RetryInputWritten(url=url, features=features):
            d.state = followups.begin(s, url=url, features=features, now=d.now)
            # The follow-up's own progress forecasts the job's cost afresh (with the sum).
            d.set(cost_forecast=None)
            reason = _wanted_stop(d.state, d.now, d.policy)
            if reason is not None:
                # A cancel or a deadline that came while the input was written: nothing
                # was created, the job ends as its last request did.
                d.state = followups.end_after_failed_create(
                    d.state, JobError(source="worker", code=reason.value, message="not re-run")
                )
                _end(d, _required(d.state.upstream_status))
                return
            _create(d)
        case RetryInputFailed(error=error):
            d.set(retry=s.retry.model_copy(update={"writing_since": None, "skipped": error}))
            _end(d, _required(s.upstream_status), stopped_reason=s.stopped_reason, error=s.error)
        case Wake():
            _ask_retry_input(d)  # the answer was lost (a crash, a hand-over): ask again
        case _:
            d.hold_status = True  # anything else (a cancel is folded in) waits for the answer
            if isinstance(obs, CancelRequested):
                d.set(cancel_wanted=True)


def _merge(s: JobState, seen: Tiles) -> Tiles:
    return _merge_tiles(s.tiles, seen) if s.retry.attempt == 0 else followups.merge_tiles(s, seen)


def _missing(d: _Draft, action: _SendKind | None) -> None:
    s = d.state
    count = s.not_found_count + 1
    d.set(not_found_since=s.not_found_since or d.now, not_found_count=count)
    # A request just created may answer 404 for a while (§3.3, eo-grow's retries).
    created = s.upstream_created or s.intent_at
    if created is None or d.now >= created + d.policy.not_found_window:
        _end(d, "FAILED", error=_not_found(s.batch_request_id))
        return
    retries = d.policy.not_found_retries
    again = d.now + (retries[min(count, len(retries)) - 1] if retries else timedelta(0))
    if action is not None:
        # The API did not take the action (it did not know the request yet): it is not
        # "sent", so no ACTION_LAG wait; _send sends it again from ``again`` on.
        d.set(**{f"{action}_sent_at": None}, resend_not_before=again)
    elif s.resend_not_before is not None:
        d.set(resend_not_before=max(s.resend_not_before, again))
    if again > d.now:
        d.wake_by(again)
    elif action is None:
        d.actions.append(Poll(_required(s.batch_request_id), asap=True))


def _not_found(batch_request_id: str | None) -> JobError:
    return JobError(
        source="api",
        http_status=404,
        code=UPSTREAM_NOT_FOUND,
        message=f"batch request {batch_request_id} not found",
    )


def _merge_tiles(known: Tiles | None, seen: Tiles) -> Tiles:
    if known is None:
        return seen
    # The execution database is re-uploaded periodically and features only ever leave
    # PENDING, so an older copy must not move the counts (or the tile metrics) back.
    return Tiles(
        total=seen.total if seen.total is not None else known.total,
        processed=max(known.processed, seen.processed),
        failed=max(known.failed, seen.failed),
    )


def _stop_to_decide(s: JobState, now: datetime, policy: Policy) -> bool:
    """A stop is wanted that was never asked for."""
    return s.stop_sent_at is None and _wanted_stop(s, now, policy) is not None


def _wanted_stop(s: JobState, now: datetime, policy: Policy) -> StoppedReason | None:
    if s.stop_reason is not None:
        return s.stop_reason  # decided once; a later reason does not rename a stop in flight
    if s.cancel_wanted:
        return StoppedReason.USER_ACTION
    if s.deadline is not None and now >= s.deadline:
        return StoppedReason.DEADLINE
    cost = followups.total_cost(s)  # every request of the job: the cap covers the sum
    if s.max_cost_pu is not None and cost is not None and cost > s.max_cost_pu:
        return StoppedReason.COST_LIMIT
    if over_forecast(s.cost_guard, s.max_cost_pu, s.cost_forecast, policy.cost_guard_margin):
        return StoppedReason.COST_FORECAST
    return None


def _drive(d: _Draft) -> None:
    """Decide what the request needs from its last known status (§3.2)."""
    s, now, lag = d.state, d.now, d.policy.action_lag
    status = s.upstream_status
    reason = _wanted_stop(s, now, d.policy)
    if status == "CREATED":
        if reason is not None:
            # The API cannot stop a CREATED request, and nothing will run unless the worker
            # asked; but an analyse/start sent less than action_lag ago may still take
            # effect behind a lagging status, so stop it too and wait that long.
            launched = max((t for t in (s.analyse_sent_at, s.start_sent_at) if t), default=None)
            if launched is None or now >= launched + lag:
                _end(d, "STOPPED", stopped_reason=reason.value)
                d.set(stop_reason=reason)
                return
            _stop(d, reason)
            d.wake_by(launched + lag)
        else:
            # start on CREATED runs analysis and then processing by itself (§3.2); a
            # start decided on the cost bound waits for the analysis.
            _send(d, "start" if s.start_wanted and not _analyse_first(s) else "analyse")
    elif reason is not None:
        _stop(d, reason)
    elif status == "ANALYSIS_DONE" and s.start_wanted and not _start_held_for_cost(d):
        _send(d, "start")
    if d.status_read:
        _read_tiles(d)


def _read_tiles(d: _Draft) -> None:
    s, rid = d.state, _required(d.state.batch_request_id)
    if s.upstream_status == "PROCESSING":
        d.actions.append(ReadTiles(rid, execution_db=True))
    elif s.upstream_status == "ANALYSIS_DONE" and (s.tiles is None or s.tiles.total is None):
        d.actions.append(ReadTiles(rid, execution_db=False))
        if d.before.upstream_status != "ANALYSIS_DONE" and d.before.pause is None:
            # (Out of a pause the status is news at once: PAUSED must not outlive it.)
            # The engine reads the manifest straight away; hold the status event that
            # long so it carries the tile count a producer decides `start` on. Whatever
            # comes next (the tiles, a failure, a Wake) publishes it.
            d.hold_status = True
            d.wake_by(d.now + d.policy.tiles_wait)


def _analyse_first(s: JobState) -> bool:
    """A start to be decided at ANALYSIS_DONE on what the job will cost at least: an auto
    start under the forecast guard with a cap (a `start` after a hold is the producer's).
    The first request's first START only: a follow-up over FATAL features is started as
    the job's own, and a resume's START (the same request again) as the job's that ran
    (the forecast guard covers the sum from its progress on). Once a START is sent, a bound
    read later no longer withholds it."""
    return (
        s.start_wanted
        and s.retry.attempt == 0
        and s.start_sent_at is None
        and not s.resumed
        and not s.cost_held
        and s.cost_guard == "forecast"
        and s.max_cost_pu is not None
    )


def _bound_before_start(d: _Draft, manifest_bound: float | None) -> None:
    """The manifest was read (or could not be) at ANALYSIS_DONE: the bound known before
    START becomes the job's estimate until its progress makes a forecast."""
    s = d.state
    if s.upstream_status != "ANALYSIS_DONE" or s.furthest_rank > STATUS_RANK["ANALYSIS_DONE"]:
        return
    if s.retry.attempt > 0 or s.resumed:
        # A follow-up's own bound is not the job's, nor a restart's (its earlier runs
        # billed already): their progress forecasts the sum.
        return
    if s.cost_forecast is None or s.cost_forecast.method != "linear":
        d.set(cost_forecast=lower_bound(manifest_bound))


def _start_held_for_cost(d: _Draft) -> bool:
    """Whether an analysed job's auto start waits: for the manifest's bound (at most
    ``tiles_wait``), or for good when the bound already exceeds the cap."""
    s = d.state
    if not _analyse_first(s):
        return False
    if s.cost_forecast is None:
        since = s.analysis_done_at or d.now
        if d.now < since + d.policy.tiles_wait:
            d.wake_by(since + d.policy.tiles_wait)
            return True
        d.set(cost_forecast=lower_bound(None))  # the manifest never came: the minimum
    if bound_exceeds_cap(s.cost_guard, s.max_cost_pu, d.state.cost_forecast):
        d.set(start_wanted=False, cost_held=True)  # resting, as with auto_start false
        return True
    return False


def _stop(d: _Draft, reason: StoppedReason) -> None:
    if d.state.stop_reason is None:
        d.set(stop_reason=reason)
    _send(d, "stop")


def _send(d: _Draft, kind: _SendKind) -> None:
    """Ask for an action unless it was asked less than ``action_lag`` ago (§3.3).

    Either way, wake when the lag is over: should the status still not show the action's
    effect then (the poller saw no change to step on), the action is sent again.
    """
    s, rid = d.state, _required(d.state.batch_request_id)
    sent = {"analyse": s.analyse_sent_at, "start": s.start_sent_at, "stop": s.stop_sent_at}[kind]
    if kind == "start" and sent is not None and s.analysis_done_at is not None:
        # A start sent before the analysis ended rolls into processing by itself (§3.2),
        # after the status lag: ANALYSIS_DONE shows for a while first. Count the lag from
        # when it showed, or nearly every auto-started job gets a refused second start.
        sent = max(sent, s.analysis_done_at)
    if sent is not None and d.now < sent + d.policy.action_lag:
        d.wake_by(sent + d.policy.action_lag)
        return
    held = s.resend_not_before
    if held is not None and d.now < held:
        d.wake_by(held)  # an action answered 404 in the window: its retry's turn comes then
        return
    if held is not None:
        d.set(resend_not_before=None)
    d.wake_by(d.now + d.policy.action_lag)
    if kind == "analyse":
        d.actions.append(Analyse(rid))
        d.set(analyse_sent_at=d.now)
    elif kind == "start":
        d.actions.append(Start(rid))
        d.set(start_sent_at=d.now)
    else:
        d.actions.append(Stop(rid))
        d.set(stop_sent_at=d.now)


# -- PAUSED (resume by policy, lifecycle/resume.py) ------------------------------------------


def _paused(d: _Draft, obs: Observation) -> bool:
    """A paused job's step; False: a read shows the request went on, and the step carries
    on as for any tracked job (the read folded from a clean slate: a restart goes back to
    ANALYSIS_DONE, and may start again from 0 %)."""
    s, rid = d.state, _required(d.state.batch_request_id)
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
            pause.restart_sent_at is not None and _wanted_stop(s, d.now, d.policy) is None
        ):
            d.actions.append(Poll(rid, asap=True))  # has the START shown yet? Read first.
            d.wake_by(d.now + d.policy.poll_interval)  # should that read fail
            return True
        case CancelRequested():
            d.set(cancel_wanted=True)
        case StartRequested():
            d.set(pause=pause.model_copy(update={"resume_requested": True}))
        case TaskMissing(action=action):
            _missing(d, action)
        case TilesSeen(tiles=tiles):
            d.set(tiles=_merge_tiles(s.tiles, tiles))
        case DuplicateFound(batch_request_id=other):
            _duplicate(d, other)
        case ActionRefused():
            # A START inside a restart block longer than ours: read, and send it again
            # after the lag.
            d.actions.append(Poll(rid, asap=True))
        case _:
            pass
    if d.state.phase is not Phase.ENDED:
        _drive_paused(d)
    return True


def _drive_paused(d: _Draft) -> None:
    s, now, lag = d.state, d.now, d.policy.action_lag
    pause, rid = s.pause, _required(s.batch_request_id)
    assert pause is not None
    reason = _wanted_stop(s, now, d.policy)
    sent = pause.restart_sent_at
    if reason is not None:
        # Cancel, deadline: the request is stopped already, unless the START of a resume
        # was sent less than action_lag ago (it may take effect behind a lagging status).
        if sent is None or now >= sent + lag:
            d.set(pause=None)
            _end(d, "STOPPED", stopped_reason=reason.value)
            d.set(stop_reason=reason)
            return
        _stop(d, reason)
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


# -- events and schedule -----------------------------------------------------------------


def _finish(d: _Draft) -> Transition:
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


def _wake_at(d: _Draft, after: JobState) -> datetime | None:
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
