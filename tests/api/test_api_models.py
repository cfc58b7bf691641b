"""Response models (batch-v2-api.md §4, §7, §9): the API's names, unknown keys kept."""

from __future__ import annotations

from datetime import UTC, datetime

from worker.api.models import (
    ErrorEnvelope,
    Links,
    Task,
    TaskList,
    TilingGrid,
    parse_error_body,
)

# Abridged from the captured real task of batch-v2-api.md §4.1.
CAPTURED = {
    "id": "6aa8765a-e9eb-4dd0-a567-b86cfdb840e0",
    "request": {
        "instanceType": "normal",
        "input": {"type": "tiling-grid", "id": 2, "bufferY": 10, "bufferX": 5, "resolution": 360.0},
        "description": "card4l-test card4lId: x",
    },
    "domainAccountId": "e024f6e1",
    "projectId": "ffe4e816",
    "status": "DONE",
    "userAction": "START",
    "userActionUpdated": "2025-08-14T14:02:47.848281Z",
    "created": "2021-08-17T12:02:12.306339Z",
    "completionPercentage": 100,
    "lastUpdated": "2025-08-14T14:30:46.716642Z",
    "costPU": 9006.923884650554,
}


def test_a_captured_task_reads_with_its_extras_kept() -> None:
    task = Task.model_validate(CAPTURED)

    assert task.status == "DONE"
    assert task.user_action == "START"
    assert task.completion_percentage == 100
    assert task.cost_pu == 9006.923884650554
    assert task.created == datetime(2021, 8, 17, 12, 2, 12, 306339, tzinfo=UTC)
    assert task.description == "card4l-test card4lId: x"
    assert task.error is None and task.stopped_status_reason is None
    assert task.model_extra == {"domainAccountId": "e024f6e1", "projectId": "ffe4e816"}
    assert task.model_dump(by_alias=True, exclude_none=True, mode="json")["costPU"] == task.cost_pu


def test_a_fresh_task_has_zero_progress_and_an_unknown_status_survives() -> None:
    task = Task.model_validate({"id": "x", "status": "QUEUED_SOMEWHERE_NEW"})

    assert (task.status, task.completion_percentage, task.cost_pu) == ("QUEUED_SOMEWHERE_NEW", 0, 0)
    assert task.request == {} and task.description is None


def test_list_envelope_and_links() -> None:
    answer = TaskList.model_validate(
        {"data": [CAPTURED], "links": {"nextToken": "n", "@id": "http://x/process"}}
    )

    assert answer.links.next_token == "n"
    assert answer.links.self_url == "http://x/process"
    assert Links().next_token is None


def test_tiling_grid_from_the_live_sample() -> None:
    grid = TilingGrid.model_validate(
        {"id": 6, "name": "LAEA 100km grid", "properties": {"tileWidth": 100000.0, "unit": "METRE"}}
    )

    assert (grid.id, grid.name, grid.properties["unit"]) == (6, "LAEA 100km grid", "METRE")


def test_error_bodies_in_both_shapes() -> None:
    wrapped = {"error": {"status": 400, "reason": "Bad Request", "message": "m", "code": "C"}}
    bare = {
        "status": 429,
        "reason": "Too Many Requests",
        "message": "r",
        "code": "RATE_LIMIT_EXCEEDED",
    }

    first, second = parse_error_body(wrapped), parse_error_body(bare)

    assert first is not None and (first.status, first.code, first.message) == (400, "C", "m")
    assert second is not None and (second.status, second.code) == (429, "RATE_LIMIT_EXCEEDED")
    assert parse_error_body({"data": []}) is None
    assert parse_error_body("<html>") is None
    assert ErrorEnvelope.model_validate(wrapped).error.reason == "Bad Request"
