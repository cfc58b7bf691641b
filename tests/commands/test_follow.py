"""JobTracker folds events as the contract tells consumers to: drop an id already seen and a
sequence at or below the last one seen (CONTRACT.md "Events")."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from worker.commands.follow import JobTracker, describe, summary


def _status(job_id: str, sequence: int, status: str, **data: Any) -> dict[str, Any]:
    return {
        "id": f"{job_id}-{sequence}",
        "type": "batchworker.job.status",
        "subject": job_id,
        "data": {"job_id": job_id, "sequence": sequence, "status": status, **data},
    }


def test_duplicates_and_stale_sequences_are_dropped() -> None:
    tracker = JobTracker(["a"])
    assert tracker.apply(_status("a", 1, "CREATED"))
    assert tracker.apply(_status("a", 3, "PROCESSING", completion_percentage=40.0))
    assert not tracker.apply(_status("a", 3, "PROCESSING"))  # same id again
    stale = _status("a", 2, "ANALYSIS_DONE")
    assert not tracker.apply(stale)
    view = tracker.views["a"]
    assert (view.status, view.completion, view.events, view.last_sequence) == (
        "PROCESSING",
        40.0,
        2,
        3,
    )
    assert not view.finished


def test_events_of_other_jobs_are_ignored() -> None:
    tracker = JobTracker(["a"])
    assert not tracker.apply(_status("b", 1, "DONE"))
    assert tracker.views["a"].status == "SUBMITTED"


def test_a_terminal_status_ends_the_view_with_its_details() -> None:
    tracker = JobTracker(["a"])
    tiles = {"total": 4, "processed": 3, "failed": 1}
    tracker.apply(
        _status("a", 1, "STOPPED", stopped_reason="COST_LIMIT", tiles=tiles, cost_pu=12.5)
    )
    view = tracker.views["a"]
    assert view.finished and view.stopped_reason == "COST_LIMIT"
    assert "STOPPED COST_LIMIT" in describe(view)
    assert "tiles 3/4 (1 failed)" in describe(view)


def test_resting_after_analysis_is_not_finished() -> None:
    tracker = JobTracker(["a"])
    tracker.apply(_status("a", 1, "ANALYSIS_DONE"))
    assert tracker.views["a"].resting and not tracker.views["a"].finished


def test_a_rejection_ends_the_view_and_shows_its_code() -> None:
    tracker = JobTracker(["a"])
    rejected = {
        "id": "r-1",
        "type": "batchworker.command.rejected",
        "subject": "a",
        "data": {"job_id": "a", "code": "JOB_CONFLICT", "message": "a different request"},
    }
    assert tracker.apply(rejected)
    view = tracker.views["a"]
    assert view.finished and view.status == "REJECTED"
    console = Console(width=200, record=True)
    console.print(summary(tracker, "t"))
    assert "REJECTED JOB_CONFLICT" in console.export_text()


def test_accepted_counts_as_an_event_without_changing_status() -> None:
    tracker = JobTracker(["a"])
    accepted = {"id": "c-1", "type": "batchworker.command.accepted", "subject": "a", "data": {}}
    assert tracker.apply(accepted)
    assert tracker.views["a"].events == 1 and tracker.views["a"].status == "SUBMITTED"
