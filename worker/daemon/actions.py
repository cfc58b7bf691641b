"""Performing the lifecycle's actions against the API and S3, and turning each outcome into
the observation the machine steps on next.

Every action here is safe to repeat: a GET, an analyse/start/stop on a status that already
moved (refused harmlessly), and a create that scans for the job's tag first whenever an
earlier attempt may have happened (docs/design.md "Idempotent creates").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from worker import lifecycle
from worker.api.errors import ApiError, ClientError, NotFound, PayloadInvalid
from worker.api.models import Page, Task, TaskStatus, validate_create_payload
from worker.lifecycle import (
    Action,
    ActionRefused,
    Adopt,
    Analyse,
    CallNotDone,
    Create,
    CreateRefused,
    CreateSucceeded,
    CreateUncertain,
    JobError,
    JobState,
    NotFoundYet,
    Observation,
    Poll,
    ReadTiles,
    Start,
    Stop,
    StopDuplicate,
    TaskMissing,
    TaskSeen,
    TaskSnapshot,
    Tiles,
    TilesSeen,
    TilesUnavailable,
    WriteRetryInput,
)
from worker.lifecycle.followups import RETRY_INPUT_NOT_WRITTEN

log = logging.getLogger(__name__)

# When a call surely not processed (no 429 with Retry-After: a connection never made) is
# tried again, in seconds.
NOT_DONE_RETRY = 10.0


def not_done(
    action: Literal["create", "analyse", "start", "stop"], exc: ApiError, now: datetime
) -> CallNotDone:
    """A call the API did not process (``exc.ambiguous`` False: a 429, or never sent)."""
    wait = exc.retry_after if exc.retry_after is not None else NOT_DONE_RETRY
    return CallNotDone(action=action, retry_at=now + timedelta(seconds=wait))


class BatchApi(Protocol):
    """The part of ``worker.api.BatchClient`` the engine calls."""

    def create(self, payload: dict[str, Any], /) -> Task: ...
    def get(self, task_id: str, /, *, created_at: datetime | None = None) -> Task: ...
    def iter_pages(
        self, *, sort: str = "created:desc", search: str | None = None, count: int | None = None
    ) -> Iterator[Page]: ...
    def analyse(self, task_id: str, /) -> None: ...
    def start(self, task_id: str, /) -> None: ...
    def stop(self, task_id: str, /) -> None: ...


class RetryInputs(Protocol):
    """Writes a follow-up's input (worker/daemon/followups.py)."""

    def write(
        self, request: dict[str, Any], source_id: str
    ) -> lifecycle.RetryInputWritten | lifecycle.RetryInputFailed: ...


class TileSource(Protocol):
    def read(
        self, request: dict[str, Any], request_id: str, *, execution_db: bool
    ) -> Tiles | None: ...
    def cost_bound(self, request_id: str) -> float | None: ...


def snapshot(task: TaskStatus) -> TaskSnapshot:
    """The few fields the lifecycle decides on; the task's body is dropped here."""
    return TaskSnapshot(
        id=task.id,
        status=task.status,
        created=task.created,
        completion_percentage=task.completion_percentage,
        cost_pu=task.cost_pu,
        stopped_reason=task.stopped_status_reason,
        error=task.error,
        user_action=task.user_action,
    )


def api_error(exc: ApiError) -> JobError:
    return JobError(source="api", http_status=exc.http_status, code=exc.code, message=exc.message)


class ActionRunner:
    """Performs one action for one job; answers the observation, or None when there is
    nothing new to step on (the lifecycle's ``wake_at`` covers retries)."""

    def __init__(
        self,
        client: BatchApi,
        tiles: TileSource,
        *,
        on_duplicate_stopped: Callable[[], None] = lambda: None,
        retry_inputs: RetryInputs | None = None,
    ) -> None:
        self._client = client
        self._tiles = tiles
        self._retry_inputs = retry_inputs
        self._on_duplicate_stopped = on_duplicate_stopped

    def perform(self, state: JobState, action: Action, now: datetime) -> Observation | None:
        match action:
            case Create():
                return self._create(state, action, now)
            case Adopt(batch_request_id=task_id) | Poll(batch_request_id=task_id, asap=True):
                return self._get(task_id)
            case Poll():
                return None  # the poller reads it with the next list scan or GET round
            case Analyse(batch_request_id=task_id):
                return self._command("analyse", self._client.analyse, task_id, now)
            case Start(batch_request_id=task_id):
                return self._command("start", self._client.start, task_id, now)
            case Stop(batch_request_id=task_id):
                return self._command("stop", self._client.stop, task_id, now)
            case StopDuplicate(batch_request_id=task_id):
                self._stop_duplicate(task_id)
                return None
            case ReadTiles(batch_request_id=task_id, execution_db=execution_db):
                return self._read_tiles(state, task_id, execution_db)
            case WriteRetryInput(source_batch_request_id=task_id):
                return self._write_retry_input(state, task_id)
        raise AssertionError(f"unknown action {action!r}")  # pragma: no cover

    # -- create -------------------------------------------------------------------------

    def _create(self, state: JobState, action: Create, now: datetime) -> Observation:
        tag = lifecycle.request_tag(state)  # a follow-up's is its attempt's own
        if action.search_since is not None:
            try:
                found = self.find_tagged(tag, since=action.search_since)
            except ApiError as exc:
                log.warning("job %s: tag scan failed: %s", state.job_id, exc)
                return NotFoundYet()
            if found is not None:
                log.info("job %s: found its batch request %s by tag", state.job_id, found.id)
                return CreateSucceeded(task=snapshot(found), found=True)
            if action.create_not_before is not None and now < action.create_not_before:
                return NotFoundYet()
        request = dict(state.request or {})
        description = request.get("description")
        request["description"] = lifecycle.describe(
            description if isinstance(description, str) else None, tag
        )
        try:
            payload = validate_create_payload(request)
        except PayloadInvalid as exc:
            return CreateRefused(JobError(source="worker", code=exc.code, message=exc.message))
        try:
            task = self._client.create(payload)
        except (NotFound, ClientError) as exc:
            # The API read the payload and refused it: creating again would not help.
            return CreateRefused(api_error(exc))
        except ApiError as exc:
            if not exc.ambiguous:
                # A 429 (after the client's own retries) was refused before it was
                # processed: nothing was created, so no scan and no list-lag wait.
                log.warning("job %s: create not done: %s", state.job_id, exc)
                return not_done("create", exc, now)
            log.warning("job %s: create uncertain: %s", state.job_id, exc)
            return CreateUncertain(detail=str(exc))
        return CreateSucceeded(task=snapshot(task))

    def find_tagged(self, tag: str, *, since: datetime) -> TaskStatus | None:
        """Scan the list newest first back to ``since`` for a task whose description holds
        ``tag``. ``search`` narrows the list where the API honours it (batch-v2-api.md §2.1:
        documented on CDSE only); the description check below decides either way."""
        for page in self._client.iter_pages(sort="created:desc", search=tag):
            for task in page.tasks:
                if task.created is not None and task.created < since:
                    return None
                if tag in (task.description or ""):
                    return task
            if not page.next_token:
                return None
        return None

    # -- the rest ------------------------------------------------------------------------

    def _get(self, task_id: str) -> Observation | None:
        # A 404 answers at once (no created_at): the lifecycle reads a new request again on
        # its NOT_FOUND_RETRIES schedule, without holding this step's thread meanwhile.
        try:
            return TaskSeen(snapshot(self._client.get(task_id)))
        except NotFound:
            return TaskMissing()
        except ApiError as exc:
            log.warning("GET %s failed: %s", task_id, exc)
            return None

    def _command(
        self,
        name: Literal["analyse", "start", "stop"],
        call: Callable[[str], None],
        task_id: str,
        now: datetime,
    ) -> Observation | None:
        try:
            call(task_id)
        except ClientError as exc:
            return ActionRefused(action=name, error=api_error(exc))
        except NotFound:
            return TaskMissing(action=name)
        except ApiError as exc:
            log.warning("%s %s failed: %s", name, task_id, exc)
            if not exc.ambiguous:
                return not_done(name, exc, now)
        return None

    def _stop_duplicate(self, task_id: str) -> None:
        try:
            self._client.stop(task_id)
        except ApiError as exc:
            log.warning("could not stop duplicate batch request %s: %s", task_id, exc)
            return
        log.warning("stopped duplicate batch request %s", task_id)
        self._on_duplicate_stopped()

    def _write_retry_input(self, state: JobState, task_id: str) -> Observation:
        if self._retry_inputs is None or state.request is None:
            message = "this worker writes no follow-up inputs"
            error = JobError(source="worker", code=RETRY_INPUT_NOT_WRITTEN, message=message)
            return lifecycle.RetryInputFailed(error)
        return self._retry_inputs.write(state.request, task_id)

    def _read_tiles(self, state: JobState, task_id: str, execution_db: bool) -> Observation | None:
        request = state.request
        if request is None:
            # Adopted: the producer gave no payload; the task carries its delivery location.
            try:
                request = self._client.get(task_id).request
            except ApiError as exc:
                log.warning("GET %s for its delivery location failed: %s", task_id, exc)
                return TilesUnavailable("the request's delivery location could not be read")
        # The reader answers None when the delivery bucket cannot be read (it logs why);
        # the machine must hear it, or an event held for the tiles waits out its bound.
        tiles = self._tiles.read(request, task_id, execution_db=execution_db)
        if tiles is None:
            return TilesUnavailable("the delivery bucket could not be read")
        return TilesSeen(tiles, cost_bound_pu=self._tiles.cost_bound(task_id))
