"""The job lifecycle: a pure state machine.

``step(state, observation, now, policy) -> Transition(state, actions, emits, wake_at)``

No I/O and no clock: the engine feeds observations (what the API or S3 answered, a command
that arrived, time passing) and performs the actions; everything here can be tested
exhaustively. The engine saves the new state and the events of ``emits`` in one
transaction *before* it performs ``actions`` (so the intent to create is durable before
the POST, and a ``sequence`` is never reused), then feeds the actions' outcomes back.

The rules, with the reasons behind them, are written up in ``docs/lifecycle.md``.
"""

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
from worker.lifecycle.cost import (
    COST_GUARDS,
    MIN_CHARGE_PU,
    CostForecast,
    CostGuard,
    linear_forecast,
    lower_bound,
    manifest_lower_bound,
)
from worker.lifecycle.creating import CREATE_ATTEMPTS_EXHAUSTED
from worker.lifecycle.followups import attempt_tag, job_tags, request_tag, total_cost
from worker.lifecycle.jobs import TAG_PREFIX, describe, is_active, new_job, tag_for
from worker.lifecycle.machine import fold_requests, step
from worker.lifecycle.observations import (
    ActionRefused,
    CallNotDone,
    CancelRequested,
    CreateRefused,
    CreateSucceeded,
    CreateUncertain,
    DuplicateFound,
    NotFoundYet,
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
from worker.lifecycle.polling import PollView, poll_view
from worker.lifecycle.reads import UPSTREAM_NOT_FOUND
from worker.lifecycle.resume_rules import PAUSED, OutOfPuRule, Pause, ResumeOn, UnhealthyRule
from worker.lifecycle.state import (
    KNOWN_STATUSES,
    STATUS_RANK,
    TERMINAL,
    Echo,
    JobError,
    JobState,
    PastRequest,
    Phase,
    Retry,
    StoppedReason,
    TaskSnapshot,
    Tiles,
)
from worker.lifecycle.tracking import BATCH_FAILED

__all__ = [
    "BATCH_FAILED",
    "COST_GUARDS",
    "CREATE_ATTEMPTS_EXHAUSTED",
    "KNOWN_STATUSES",
    "MIN_CHARGE_PU",
    "PAUSED",
    "STATUS_RANK",
    "TAG_PREFIX",
    "TERMINAL",
    "UPSTREAM_NOT_FOUND",
    "Action",
    "ActionRefused",
    "Adopt",
    "Analyse",
    "CallNotDone",
    "CancelRequested",
    "CostForecast",
    "CostGuard",
    "Create",
    "CreateRefused",
    "CreateSucceeded",
    "CreateUncertain",
    "DuplicateFound",
    "Echo",
    "Emit",
    "JobError",
    "JobState",
    "NotFoundYet",
    "Observation",
    "OutOfPuRule",
    "PastRequest",
    "Pause",
    "Phase",
    "Policy",
    "Poll",
    "PollView",
    "ReadTiles",
    "ResumeOn",
    "Retry",
    "RetryInputFailed",
    "RetryInputWritten",
    "Start",
    "StartRequested",
    "Stop",
    "StopDuplicate",
    "StoppedReason",
    "TaskMissing",
    "TaskSeen",
    "TaskSnapshot",
    "Tiles",
    "TilesSeen",
    "TilesUnavailable",
    "Transition",
    "UnhealthyRule",
    "Wake",
    "WriteRetryInput",
    "attempt_tag",
    "describe",
    "fold_requests",
    "is_active",
    "job_tags",
    "linear_forecast",
    "lower_bound",
    "manifest_lower_bound",
    "new_job",
    "poll_view",
    "request_tag",
    "step",
    "tag_for",
    "total_cost",
]
