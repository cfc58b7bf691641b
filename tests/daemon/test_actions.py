"""ActionRunner: each action's outcome as the observation the lifecycle steps on (unit tests
with a small in-memory API; the engine tests drive the real client)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from worker import lifecycle
from worker.api.errors import ClientError, NotFound, RateLimited, ServerError
from worker.api.models import Page, Task
from worker.daemon.actions import NOT_DONE_RETRY, ActionRunner
from worker.lifecycle import (
    ActionRefused,
    CallNotDone,
    Create,
    CreateSucceeded,
    CreateUncertain,
    NotFoundYet,
    ReadTiles,
    Start,
    TaskMissing,
    Tiles,
    TilesSeen,
    TilesUnavailable,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
PAYLOAD: dict[str, Any] = {
    "processRequest": {
        "input": {"bounds": {"bbox": [8.4, 41.3, 9.6, 43.1]}, "data": [{"type": "sentinel-2-l2a"}]},
        "output": {"responses": [{"identifier": "default", "format": {"type": "image/tiff"}}]},
        "evalscript": "//VERSION=3",
    },
    "input": {"type": "tiling-grid", "id": 0, "resolution": 60.0},
    "output": {
        "type": "raster",
        "delivery": {"s3": {"url": "s3://b/out", "iamRoleARN": "arn:aws:iam::1:role/r"}},
    },
}


class Api:
    def __init__(self, listed: list[Task] | None = None) -> None:
        self.listed = listed or []
        self.created: list[dict[str, Any]] = []
        self.create_error: Exception | None = None
        self.start_error: Exception | None = None

    def create(self, payload: dict[str, Any], /) -> Task:
        if self.create_error is not None:
            raise self.create_error
        self.created.append(payload)
        return Task(id="new", status="CREATED", created=T0, request=payload)

    def get(self, task_id: str, /, *, created_at: datetime | None = None) -> Task:
        raise NotFound("no", http_status=404)

    def iter_pages(
        self, *, sort: str = "created:desc", search: str | None = None, count: int | None = None
    ) -> Iterator[Page]:
        yield Page(tasks=self.listed)

    def analyse(self, task_id: str, /) -> None: ...

    def start(self, task_id: str, /) -> None:
        if self.start_error is not None:
            raise self.start_error

    def stop(self, task_id: str, /) -> None: ...


class Tiler:
    def __init__(self, answer: Tiles | None) -> None:
        self.answer = answer

    def cost_bound(self, request_id: str) -> float | None:
        return None

    def read(self, request: dict[str, Any], request_id: str, *, execution_db: bool) -> Tiles | None:
        return self.answer


def job() -> lifecycle.JobState:
    return lifecycle.new_job(
        job_id="j1",
        fleet_id="f",
        request=PAYLOAD,
        adopt_id=None,
        request_hash="h",
        auto_start=True,
        deadline=None,
        max_cost_pu=None,
        echo=lifecycle.Echo(),
        now=T0,
    )


def test_a_scan_only_create_compares_with_the_steps_now_not_a_later_clock() -> None:
    api = Api()
    runner = ActionRunner(api, Tiler(None))
    action = Create(search_since=T0, create_not_before=T0 + timedelta(seconds=60))
    # The step decided at T0 + 59 s: whatever the clock says after the scan, no POST.
    assert runner.perform(job(), action, T0 + timedelta(seconds=59)) == NotFoundYet()
    assert api.created == []
    outcome = runner.perform(job(), action, T0 + timedelta(seconds=60))
    assert isinstance(outcome, CreateSucceeded) and not outcome.found
    assert len(api.created) == 1


def test_a_tagged_request_in_the_list_is_taken_up_not_created_again() -> None:
    tag = lifecycle.tag_for("f", "j1")
    mine = Task(id="mine", status="ANALYSING", created=T0, request={"description": f"x {tag}"})
    api = Api([mine])
    outcome = ActionRunner(api, Tiler(None)).perform(
        job(), Create(search_since=T0 - timedelta(seconds=30), create_not_before=T0), T0
    )
    assert isinstance(outcome, CreateSucceeded) and outcome.found and outcome.task.id == "mine"
    assert api.created == []


def test_an_ambiguous_create_failure_is_uncertain() -> None:
    api = Api()
    api.create_error = ServerError("bad gateway", http_status=502, ambiguous=True)
    assert isinstance(ActionRunner(api, Tiler(None)).perform(job(), Create(), T0), CreateUncertain)


def test_a_create_or_action_answered_429_is_not_done_with_its_retry_after() -> None:
    api = Api()
    api.create_error = RateLimited("slow down", http_status=429, retry_after=2.5)
    runner = ActionRunner(api, Tiler(None))
    assert runner.perform(job(), Create(), T0) == CallNotDone(
        "create", retry_at=T0 + timedelta(seconds=2.5)
    )
    api.start_error = RateLimited("slow down", http_status=429, retry_after=None)
    assert runner.perform(job(), Start("r1"), T0) == CallNotDone(
        "start", retry_at=T0 + timedelta(seconds=NOT_DONE_RETRY)
    )
    # A 429 after a try that may have landed (a timeout) is still in doubt.
    api.create_error = RateLimited("slow down", http_status=429, ambiguous=True)
    assert isinstance(runner.perform(job(), Create(), T0), CreateUncertain)


def test_tile_reads_answer_seen_or_unavailable_never_nothing() -> None:
    tiles = Tiles(total=4, processed=2)
    read = ReadTiles("r1", execution_db=True)
    assert ActionRunner(Api(), Tiler(tiles)).perform(job(), read, T0) == TilesSeen(tiles)
    outcome = ActionRunner(Api(), Tiler(None)).perform(job(), read, T0)
    assert isinstance(outcome, TilesUnavailable)


def test_refused_and_missing_actions_become_observations() -> None:
    api = Api()
    api.start_error = ClientError("cannot start", http_status=400, code="BAD")
    outcome = ActionRunner(api, Tiler(None)).perform(job(), Start("r1"), T0)
    assert isinstance(outcome, ActionRefused) and outcome.action == "start"
    api.start_error = NotFound("gone", http_status=404)
    outcome = ActionRunner(api, Tiler(None)).perform(job(), Start("r1"), T0)
    assert outcome == TaskMissing(action="start")  # which action was not taken


def test_a_follow_up_is_found_by_its_attempts_tag_not_by_the_first_one() -> None:
    state = job().model_copy(update={"retry": lifecycle.Retry(attempts=1, attempt=1)})
    first = Task(
        id="first",
        status="DONE",
        created=T0,
        request={"description": f"x {lifecycle.tag_for('f', 'j1')}"},
    )
    follow = Task(
        id="follow",
        status="CREATED",
        created=T0,
        request={"description": f"x {lifecycle.attempt_tag('f', 'j1', 1)}"},
    )
    scan = Create(search_since=T0 - timedelta(seconds=30), create_not_before=T0)
    api = Api([first])
    outcome = ActionRunner(api, Tiler(None)).perform(state, scan, T0)
    # The first request is not the follow-up: this attempt's request is created.
    assert isinstance(outcome, CreateSucceeded) and not outcome.found and len(api.created) == 1
    api = Api([follow, first])
    outcome = ActionRunner(api, Tiler(None)).perform(state, scan, T0)
    assert isinstance(outcome, CreateSucceeded) and outcome.task.id == "follow"
    assert api.created == []


def test_without_a_writer_no_follow_up_input_is_made() -> None:
    outcome = ActionRunner(Api(), Tiler(None)).perform(
        job(), lifecycle.WriteRetryInput("r1", 1), T0
    )
    assert isinstance(outcome, lifecycle.RetryInputFailed)
    assert outcome.error.code == "RETRY_INPUT_NOT_WRITTEN"
