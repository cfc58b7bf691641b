"""The job lifecycle: a pure state machine.

``step(state, observation, now, policy) -> Transition(state, actions, emits)``

No I/O and no clock: the engine feeds observations (what the API or S3 answered, a command
that arrived, time passing) and performs the actions; everything here can be tested
exhaustively. The engine saves the new state and the events of ``emits`` in one
transaction *before* it performs ``actions`` (so the intent to create is durable before
the POST, and a ``sequence`` is never reused).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

# ------------------------------------------------------------------------------------------
# Vocabulary
# ------------------------------------------------------------------------------------------

TERMINAL = frozenset({"DONE", "FAILED", "STOPPED"})
# batch-v2-api.md §3.1. Statuses the API may add later are carried through as strings.
KNOWN_STATUSES = (
    "CREATED",
    "ANALYSING",
    "ANALYSIS_DONE",
    "PROCESSING",
    "DONE",
    "FAILED",
    "STOPPED",
)


class Phase(StrEnum):
    PENDING_CREATE = "PENDING_CREATE"  # accepted; no batch request known yet
    TRACKING = "TRACKING"  # batch request known; driving and watching it
    ENDED = "ENDED"  # a terminal status was emitted; nothing more to do


class StoppedReason(StrEnum):
    USER_ACTION = "USER_ACTION"
    OUT_OF_PU = "OUT_OF_PU"
    UNHEALTHY = "UNHEALTHY"
    DEADLINE = "DEADLINE"
    COST_LIMIT = "COST_LIMIT"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JobError(_Frozen):
    """The ``error`` of an event: who refused (``worker`` or ``api``) and what they said."""

    source: Literal["worker", "api"]
    http_status: int | None = None
    code: str
    message: str


class Tiles(_Frozen):
    total: int | None = None
    processed: int = 0
    failed: int = 0


class Echo(_Frozen):
    """What an answering event carries back from the request message."""

    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None


class TaskSnapshot(_Frozen):
    """The few fields of a batch task the lifecycle decides on (never the whole body)."""

    id: str
    status: str
    created: datetime | None = None
    completion_percentage: float = 0.0
    cost_pu: float = 0.0
    stopped_reason: str | None = None
    error: str | None = None
    user_action: str | None = None


class JobState(_Frozen):
    """Compact, durable state of one job. Saved as JSON in the job row."""

    job_id: str
    fleet_id: str
    phase: Phase = Phase.PENDING_CREATE
    request_hash: str
    request: dict[str, Any] | None = None  # the create payload; None when adopting
    adopt_id: str | None = None  # batch_request_id given by the producer
    auto_start: bool = True
    deadline: datetime | None = None
    max_cost_pu: float | None = None
    echo: Echo = Echo()
    accepted_at: datetime

    # creating
    intent_at: datetime | None = None  # saved before every create attempt
    create_attempts: int = 0

    # tracking
    batch_request_id: str | None = None
    upstream_created: datetime | None = None  # the task's `created`
    status: str | None = None  # the last status published in an event
    completion: float = 0.0
    cost_pu: float | None = None
    tiles: Tiles | None = None
    start_wanted: bool = True  # auto_start, or a `start` command arrived
    cancel_wanted: bool = False
    analyse_sent_at: datetime | None = None
    start_sent_at: datetime | None = None
    stop_sent_at: datetime | None = None
    stop_reason: StoppedReason | None = None  # why the worker asked for a stop
    not_found_since: datetime | None = None
    last_seen_at: datetime | None = None  # when the task's status was last read
    duplicates_stopped: tuple[str, ...] = ()

    # outcome
    stopped_reason: str | None = None
    error: JobError | None = None
    ended_at: datetime | None = None

    # events
    sequence: int = 0  # the sequence of the last event emitted


# ------------------------------------------------------------------------------------------
# Observations: what the engine tells the machine
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wake:
    """Time has passed (a scheduled wake-up, or the first step after intake)."""


@dataclass(frozen=True)
class StartRequested:
    """A ``start`` command arrived for a job resting at ANALYSIS_DONE."""


@dataclass(frozen=True)
class CancelRequested:
    """A ``cancel`` command arrived."""


@dataclass(frozen=True)
class CreateSucceeded:
    """The POST answered 201, or a scan found this job's tag (``found=True``)."""

    task: TaskSnapshot
    found: bool = False


@dataclass(frozen=True)
class CreateRefused:
    """The worker's own validation or the API (4xx) refused the payload: the job fails."""

    error: JobError


@dataclass(frozen=True)
class CreateUncertain:
    """The POST may or may not have happened (timeout, 5xx, connection reset)."""

    detail: str


@dataclass(frozen=True)
class NotFoundYet:
    """A tag scan found nothing, and the list may still be lagging: wait and scan again."""


@dataclass(frozen=True)
class TaskSeen:
    task: TaskSnapshot


@dataclass(frozen=True)
class TaskMissing:
    """GET answered 404 (after the client's own short retries)."""


@dataclass(frozen=True)
class ActionRefused:
    """analyse/start/stop answered 4xx. Often harmless: the status already moved."""

    action: Literal["analyse", "start", "stop"]
    error: JobError


@dataclass(frozen=True)
class TilesSeen:
    tiles: Tiles


@dataclass(frozen=True)
class DuplicateFound:
    """Another batch request carries this job's tag."""

    batch_request_id: str


Observation = (
    Wake
    | StartRequested
    | CancelRequested
    | CreateSucceeded
    | CreateRefused
    | CreateUncertain
    | NotFoundYet
    | TaskSeen
    | TaskMissing
    | ActionRefused
    | TilesSeen
    | DuplicateFound
)

# ------------------------------------------------------------------------------------------
# Actions: what the machine asks the engine to do
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Create:
    """POST the payload (``search_since`` None) or, on a later attempt, first scan the list
    for the tag back to ``search_since`` and create only when absent and
    ``now >= create_not_before``; otherwise answer ``NotFoundYet``."""

    search_since: datetime | None = None
    create_not_before: datetime | None = None


@dataclass(frozen=True)
class Adopt:
    """GET the producer's ``batch_request_id``; answers TaskSeen/TaskMissing."""

    batch_request_id: str


@dataclass(frozen=True)
class Analyse:
    batch_request_id: str


@dataclass(frozen=True)
class Start:
    batch_request_id: str


@dataclass(frozen=True)
class Stop:
    batch_request_id: str


@dataclass(frozen=True)
class Poll:
    """Read the task's status: at once (``asap``) or with the next list scan."""

    batch_request_id: str
    asap: bool = False


@dataclass(frozen=True)
class ReadTiles:
    """Read the feature manifest (total) and, while processing, the execution database."""

    batch_request_id: str
    execution_db: bool


@dataclass(frozen=True)
class StopDuplicate:
    batch_request_id: str


Action = Create | Adopt | Analyse | Start | Stop | Poll | ReadTiles | StopDuplicate


@dataclass(frozen=True)
class Emit:
    """An event the step produces; its sequence is already in the new state."""

    kind: Literal["status", "progress"]
    sequence: int


@dataclass(frozen=True)
class Policy:
    """Timings the machine reasons with (from settings; small in tests)."""

    poll_interval: timedelta = timedelta(seconds=30)
    rest_poll_interval: timedelta = timedelta(minutes=10)  # resting at ANALYSIS_DONE
    action_lag: timedelta = timedelta(seconds=90)  # status may lag an action this long
    not_found_window: timedelta = timedelta(minutes=2)  # transient 404 after create
    list_lag_window: timedelta = timedelta(seconds=60)
    clock_skew: timedelta = timedelta(seconds=30)
    create_retry: timedelta = timedelta(seconds=10)
    max_create_attempts: int = 20


@dataclass(frozen=True)
class Transition:
    state: JobState
    actions: tuple[Action, ...] = ()
    emits: tuple[Emit, ...] = ()
    wake_at: datetime | None = None  # when to step again with Wake() if nothing else comes
