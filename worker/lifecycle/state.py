"""The durable state of one job, and the pieces of the API's answers it keeps."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from worker.lifecycle.cost import CostForecast, CostGuard
from worker.lifecycle.resume_rules import Pause, ResumeOn

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
# How far along the API's own diagram (§3.2) a status is. A read that ranks below what was
# already seen is a stale copy (the list endpoint lags a GET) and is ignored. STOPPED can be
# restarted upstream (to ANALYSIS_DONE), but it ends the job for the worker, so no
# legitimate read ever moves backwards.
STATUS_RANK = {
    "CREATED": 1,
    "ANALYSING": 2,
    "ANALYSIS_DONE": 3,
    "PROCESSING": 4,
    "DONE": 5,
    "FAILED": 5,
    "STOPPED": 5,
}


class Phase(StrEnum):
    PENDING_CREATE = "PENDING_CREATE"  # accepted; no batch request known yet
    TRACKING = "TRACKING"  # batch request known; driving and watching it
    ENDED = "ENDED"  # a terminal status was emitted; nothing more to do


class StoppedReason(StrEnum):
    USER_ACTION = "USER_ACTION"
    OUT_OF_PU = "OUT_OF_PU"
    UNHEALTHY = "UNHEALTHY"
    DEADLINE = "DEADLINE"
    COST_LIMIT = "COST_LIMIT"  # spent more than max_cost_pu
    COST_FORECAST = "COST_FORECAST"  # forecast to cost more than max_cost_pu (and margin)


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


class PastRequest(_Frozen):
    """A batch request of the job that has ended (the first, or an earlier follow-up)."""

    batch_request_id: str
    attempt: int  # 0: the first request; n: the n-th follow-up
    status: str
    cost_pu: float = 0.0
    features: int | None = None  # the features it covered (None: the first, all of them)
    processed: int = 0  # its DONE features
    failed: int = 0  # its FATAL features


class Retry(_Frozen):
    """Re-runs of FATAL features (``retry_failed``): one follow-up request per attempt."""

    attempts: int = 0  # follow-ups allowed (the job's retry_failed)
    attempt: int = 0  # the attempt of the current request (0: the first)
    past: tuple[PastRequest, ...] = ()
    covering: int = 0  # FATAL features the current follow-up covers
    base_processed: int = 0  # features DONE before the current follow-up
    # Ending with FATAL features and an attempt left: the follow-up's input is being
    # written; the terminal event is held meanwhile.
    writing_since: datetime | None = None
    skipped: JobError | None = None  # why a follow-up that was due was not made


class JobState(_Frozen):
    """Compact, durable state of one job. Saved as JSON in the job row."""

    job_id: str
    fleet_id: str
    phase: Phase = Phase.PENDING_CREATE
    request_hash: str
    request: dict[str, Any] | None = None  # the create payload; None when adopting
    adopt_id: str | None = None  # batch_request_id given by the producer
    tenant: str | None = None  # who submitted it; owns it (docs/contract.md "Tenancy")
    auto_start: bool = True
    deadline: datetime | None = None
    max_cost_pu: float | None = None
    cost_guard: CostGuard = "spent"  # the request's, or the fleet's COST_GUARD at intake
    echo: Echo = Echo()
    accepted_at: datetime
    resume_on: ResumeOn | None = None  # which API stops pause the job (lifecycle/resume.py)

    # creating
    intent_at: datetime | None = None  # saved before every create attempt
    create_attempts: int = 0
    # An attempt's outcome was unknown (an uncertain POST, or a retry after a crash): a
    # request the job does not know may exist. The poller sweeps for duplicates soon.
    create_doubtful: bool = False

    # tracking
    batch_request_id: str | None = None
    upstream_created: datetime | None = None  # the task's `created`
    status: str | None = None  # the last status published in an event
    upstream_status: str | None = None  # the last status read from the API (may be unpublished)
    furthest_rank: int = 0  # the highest STATUS_RANK read so far; lower reads are stale
    completion: float = 0.0
    cost_pu: float | None = None
    cost_forecast: CostForecast | None = None  # worker/lifecycle/cost.py
    # costPU earlier runs of this request billed, when a resume's restart processes it
    # again from 0 % (the forecast adds this run's own on top); 0 when it went on.
    rerun_base_pu: float = 0.0
    tiles: Tiles | None = None
    start_wanted: bool = True  # auto_start, or a `start` command arrived
    # The auto start was withheld once: a lower bound of the cost exceeded the cap (the
    # forecast guard). The job rests as with auto_start false; a `start` then starts it.
    cost_held: bool = False
    cancel_wanted: bool = False
    analyse_sent_at: datetime | None = None
    start_sent_at: datetime | None = None
    stop_sent_at: datetime | None = None
    analysis_done_at: datetime | None = None  # when ANALYSIS_DONE was first read
    stop_reason: StoppedReason | None = None  # why the worker asked for a stop
    not_found_since: datetime | None = None  # first 404 of the current run of 404s
    not_found_count: int = 0  # 404s in the current run (the retry schedule's position)
    # An action answered 404 inside the window after create: it was not taken, so it is
    # sent again (its *_sent_at cleared), but not before this.
    resend_not_before: datetime | None = None
    last_seen_at: datetime | None = None  # when the task's status was last read
    duplicates_stopped: tuple[str, ...] = ()
    # A terminal status read after processing began, held until one last tile read (or
    # ``tiles_wait``) so the terminal event carries the final counts; outcome fields below
    # are already filled in.
    ending_since: datetime | None = None

    # resume by policy: the pause in hand, and the reasons of the resumes made so far
    pause: Pause | None = None
    resumed: tuple[str, ...] = ()

    # outcome
    stopped_reason: str | None = None
    error: JobError | None = None
    ended_at: datetime | None = None

    retry: Retry = Retry()

    # events
    sequence: int = 0  # the sequence of the last event emitted
