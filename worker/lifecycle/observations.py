"""Observations: what the engine tells the machine (an API answer, a command, time passing)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from worker.lifecycle.state import JobError, TaskSnapshot, Tiles


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
class CallNotDone:
    """The API refused a create or an action before processing it (429, §10), or it surely
    never reached the API: it had no effect, so it is sent again from ``retry_at`` (the
    ``Retry-After`` it gave), with no scan for a create and no wait for a lagging status."""

    action: Literal["create", "analyse", "start", "stop"]
    retry_at: datetime


@dataclass(frozen=True)
class NotFoundYet:
    """A tag scan found nothing, and the list may still be lagging: wait and scan again."""


@dataclass(frozen=True)
class TaskSeen:
    task: TaskSnapshot


@dataclass(frozen=True)
class TaskMissing:
    """GET answered 404 (after the client's own short retries), or an action did
    (``action``: which one; inside the 404 window after create it was not taken)."""

    action: Literal["analyse", "start", "stop"] | None = None


@dataclass(frozen=True)
class ActionRefused:
    """analyse/start/stop answered 4xx. Often harmless: the status already moved."""

    action: Literal["analyse", "start", "stop"]
    error: JobError


@dataclass(frozen=True)
class TilesSeen:
    tiles: Tiles
    # The least the feature manifest's sizes can cost by the documented PU rules
    # (lifecycle/cost.py ``manifest_lower_bound``), when the manifest says.
    cost_bound_pu: float | None = None


@dataclass(frozen=True)
class TilesUnavailable:
    """The delivery location could not be read (no access, not written yet)."""

    detail: str = ""


@dataclass(frozen=True)
class DuplicateFound:
    """Another batch request carries this job's tag."""

    batch_request_id: str


@dataclass(frozen=True)
class RetryInputWritten:
    """The follow-up's GeoPackage (the FATAL features' manifest rows) is in the bucket."""

    url: str
    features: int


@dataclass(frozen=True)
class RetryInputFailed:
    """The follow-up's input could not be made (no write access, an unreadable file)."""

    error: JobError


Observation = (
    Wake
    | StartRequested
    | CancelRequested
    | CreateSucceeded
    | CreateRefused
    | CreateUncertain
    | CallNotDone
    | NotFoundYet
    | TaskSeen
    | TaskMissing
    | ActionRefused
    | TilesSeen
    | TilesUnavailable
    | DuplicateFound
    | RetryInputWritten
    | RetryInputFailed
)
