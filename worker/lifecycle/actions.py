"""Actions: what the machine asks the engine to do; and the step's result."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from worker.lifecycle.state import JobState


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


@dataclass(frozen=True)
class WriteRetryInput:
    """Write the GeoPackage of the FATAL features of ``source_batch_request_id`` (rows of
    its feature manifest) beside that manifest; answers RetryInputWritten / RetryInputFailed.
    Safe to repeat: the same file at the same key, and nothing is created until it is saved."""

    source_batch_request_id: str
    attempt: int  # the follow-up's attempt


Action = (
    Create | Adopt | Analyse | Start | Stop | Poll | ReadTiles | StopDuplicate | WriteRetryInput
)


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
    progress_freshness: timedelta = timedelta(minutes=2)  # processing, end not near
    action_lag: timedelta = timedelta(seconds=90)  # status may lag an action this long
    not_found_window: timedelta = timedelta(minutes=2)  # transient 404 after create
    list_lag_window: timedelta = timedelta(seconds=60)
    clock_skew: timedelta = timedelta(seconds=30)
    create_retry: timedelta = timedelta(seconds=10)
    max_create_attempts: int = 20
    # After the n-th 404 in a row inside the window, re-read (or re-send the action that
    # answered it) this much later; the last delay repeats until the window is over.
    not_found_retries: tuple[timedelta, ...] = tuple(
        timedelta(seconds=s) for s in (0, 2, 5, 10, 20)
    )
    tiles_wait: timedelta = timedelta(seconds=10)  # hold ANALYSIS_DONE this long for its tiles
    restart_block: timedelta = timedelta(minutes=30)  # START refused this long after a stop
    restart_jitter: timedelta = timedelta(minutes=5)  # spread of a resume after the block
    # The cost forecast (worker/lifecycle/cost.py): made from this completion (percent) on;
    # the forecast guard stops a job forecast above max_cost_pu x (1 + margin).
    cost_min_completion: float = 5.0
    cost_guard_margin: float = 0.1


@dataclass(frozen=True)
class Transition:
    state: JobState
    actions: tuple[Action, ...] = ()
    emits: tuple[Emit, ...] = ()
    wake_at: datetime | None = None  # when to step again with Wake() if nothing else comes
