"""The summary a reader copies ids from: whole on a terminal, off one, and as JSON."""

from __future__ import annotations

import io
import json
from typing import Any

from rich.console import Console

from worker.commands.follow import JobTracker
from worker.commands.render import print_summary, show_changes

LONG_ID = "corsica-max-ndvi-2026-season-" + "x" * 60
REQUEST_ID = "6f1c2e7a-9b3d-4c5e-8f10-112233445566"


def _ended(status: str, **data: Any) -> JobTracker:
    tracker = JobTracker([LONG_ID])
    tracker.apply(
        {
            "id": "e-1",
            "type": "batchworker.job.status",
            "subject": LONG_ID,
            "data": {
                "job_id": LONG_ID,
                "sequence": 1,
                "status": status,
                "batch_request_id": REQUEST_ID,
                "tiles": {"processed": 5, "failed": 1, "total": 6},
                "cost_pu": 12.5,
                **data,
            },
        }
    )
    return tracker


FAILED = {
    "error": {
        "source": "api",
        "code": "RENDERER_EXCEPTION",
        "message": "evalscript: x is undefined",
    }
}


def _console(*, terminal: bool, width: int = 60) -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=terminal, width=width, color_system=None), out


def test_off_a_terminal_ids_stay_whole_on_one_line_with_the_error_text_below() -> None:
    console, out = _console(terminal=False)
    print_summary(console, _ended("FAILED", **FAILED), "t", json_lines=False)
    lines = out.getvalue().splitlines()
    assert lines[0].split("\t")[:2] == ["job", "batch request"]
    row = lines[1].split("\t")
    assert row[:3] == [LONG_ID, REQUEST_ID, "FAILED RENDERER_EXCEPTION"]
    assert row[3:5] == ["5/1/6", "12.5"]
    assert lines[2] == "  error: [api] RENDERER_EXCEPTION: evalscript: x is undefined"


def test_on_a_terminal_the_table_folds_ids_rather_than_cutting_them() -> None:
    console, out = _console(terminal=True, width=80)
    print_summary(console, _ended("FAILED", **FAILED), "t", json_lines=False)
    text = out.getvalue()
    assert "…" not in text
    # Folded over lines of its cell: the characters are all there, in order.
    cells = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.count("│") > 2)
    assert LONG_ID in cells
    assert f"{LONG_ID}: [api] RENDERER_EXCEPTION: evalscript: x is undefined" in text.replace(
        "\n", ""
    )


def test_json_lines_give_the_whole_state_of_each_job() -> None:
    console, out = _console(terminal=False)
    print_summary(console, _ended("FAILED", **FAILED), "t", json_lines=True)
    (line,) = out.getvalue().splitlines()
    state = json.loads(line)
    assert state["job_id"] == LONG_ID and state["batch_request_id"] == REQUEST_ID
    assert state["status"] == "FAILED" and state["finished"] is True
    assert state["error"]["message"] == "evalscript: x is undefined"
    assert state["tiles"] == {"processed": 5, "failed": 1, "total": 6}


def test_a_rejection_shows_its_message_too() -> None:
    tracker = JobTracker(["a"])
    tracker.apply(
        {
            "id": "r-1",
            "type": "batchworker.command.rejected",
            "subject": "a",
            "data": {"job_id": "a", "code": "JOB_CONFLICT", "message": "a different request"},
        }
    )
    console, out = _console(terminal=False)
    print_summary(console, tracker, "t", json_lines=False)
    assert "  error: JOB_CONFLICT: a different request" in out.getvalue().splitlines()


def test_status_change_lines_keep_a_long_id_on_one_line() -> None:
    tracker = _ended("DONE")
    console, out = _console(terminal=False, width=40)
    show_changes(console, tracker)
    (line,) = out.getvalue().splitlines()
    assert line.endswith(f"{LONG_ID} DONE")
