"""How followed jobs are shown: live bars and a line per change while they run, a summary at
the end.

On a terminal the summary is a table. Off one (a pipe, a CI log, a file) it is plain
tab-separated lines, because a table fitted to an unknown width cuts or folds the ids that
a reader copies into the next command; ``--json`` gives one JSON object per job instead. A
job that failed or was rejected gets its error's text under its row, not only its code.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.commands.follow import JobTracker, JobView

COLUMNS = ("job", "batch request", "status", "tiles done/failed/total", "cost PU", "time")


def show_changes(console: Console, tracker: JobTracker) -> None:
    """A line per status change since the last call: a log that outlives the bars."""
    for job_id, status, before in tracker.changes:
        when = datetime.now().strftime("%H:%M:%S")
        suffix = " (before this request)" if before else ""
        # soft_wrap: a long id stays on one line whatever the console's width.
        console.print(
            f"{when} {job_id} {status}{suffix}", markup=False, highlight=False, soft_wrap=True
        )
    tracker.changes.clear()


def describe(view: JobView) -> str:
    tiles = view.tiles or {}
    total = tiles.get("total")
    tile_text = f"tiles {tiles.get('processed', 0)}/{total}" if total is not None else "tiles -"
    if tiles.get("failed"):
        tile_text += f" ({tiles['failed']} failed)"
    status = view.status + (f" {view.stopped_reason}" if view.stopped_reason else "")
    return f"[bold]{escape(view.job_id):<28}[/] {status:<22} {tile_text}"


def progress_bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        console=console,
    )


def show(progress: Progress, bars: dict[str, TaskID], tracker: JobTracker) -> None:
    show_changes(progress.console, tracker)
    for job_id, view in tracker.views.items():
        done = 100.0 if view.status == "DONE" else view.completion
        progress.update(bars[job_id], completed=done, description=describe(view))


def problem_text(view: JobView) -> str | None:
    """The error or rejection as a reader needs it: where from, code and the message."""
    problem = view.error or view.rejected
    if not problem:
        return None
    source = f"[{problem['source']}] " if problem.get("source") else ""
    code = problem.get("code") or "ERROR"
    message = problem.get("message")
    return f"{source}{code}: {message}" if message else f"{source}{code}"


def _cells(view: JobView) -> tuple[str, ...]:
    tiles = view.tiles or {}
    elapsed = (view.ended or time.monotonic()) - view.started
    status = view.status + (f" ({view.stopped_reason})" if view.stopped_reason else "")
    problem = view.error or view.rejected
    if problem:
        status += f" {problem.get('code', '')}"
    return (
        view.job_id,
        view.batch_request_id or "-",
        status,
        f"{tiles.get('processed', '-')}/{tiles.get('failed', '-')}/{tiles.get('total', '-')}",
        f"{view.cost_pu:.1f}" if view.cost_pu is not None else "-",
        f"{elapsed:.0f} s",
    )


def summary(tracker: JobTracker, title: str) -> Table:
    """The summary as a table, for a terminal."""
    table = Table(title=title)
    for column in COLUMNS:
        # Ids fold rather than end in an ellipsis: a cut id cannot be copied.
        table.add_column(column, overflow="fold")
    for view in tracker.views.values():
        table.add_row(*_cells(view))
    return table


def as_json(view: JobView) -> dict[str, Any]:
    elapsed = (view.ended or time.monotonic()) - view.started
    return {
        "job_id": view.job_id,
        "batch_request_id": view.batch_request_id,
        "status": view.status,
        "stopped_reason": view.stopped_reason,
        "completion_percentage": view.completion,
        "tiles": view.tiles,
        "cost_pu": view.cost_pu,
        "error": view.error,
        "rejected": view.rejected,
        "finished": view.finished,
        "elapsed_s": round(elapsed, 1),
    }


def print_summary(console: Console, tracker: JobTracker, title: str, *, json_lines: bool) -> None:
    """The result, on ``console`` (standard output): a table on a terminal, plain lines
    off one, or a JSON object per job."""
    if console.is_terminal and not json_lines:
        console.print(summary(tracker, title))
        for view in tracker.views.values():
            text = problem_text(view)
            if text:
                console.print(f"{view.job_id}: {text}", markup=False, highlight=False)
        return
    # Straight to the file: rich would expand the tabs and wrap at its width.
    lines = [] if json_lines else ["\t".join(COLUMNS)]
    for view in tracker.views.values():
        if json_lines:
            lines.append(json.dumps(as_json(view)))
            continue
        lines.append("\t".join(_cells(view)))
        text = problem_text(view)
        if text:
            lines.append(f"  error: {text}")
    console.file.write("".join(f"{line}\n" for line in lines))
    console.file.flush()
