"""Following jobs through their events, as any event consumer should.

Used by ``submit --wait`` and the demo. De-duplicates exactly as the contract asks event
consumers to: drop an ``id`` already seen, and a ``sequence`` at or below the last one seen
for that job. Rendering is rich's live progress bars.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import amqp.exceptions
import kombu.exceptions
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.message import Message
from kombu.messaging import Consumer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from worker.broker import connection
from worker.lifecycle import TERMINAL
from worker.settings import Settings

# What a command-line client of the broker may meet: refused or lost connections (OSError,
# kombu's OperationalError after retries) and the broker's own refusals (no such exchange).
BROKER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    amqp.exceptions.AMQPError,
    kombu.exceptions.KombuError,
)


@dataclass
class JobView:
    """What a reader of the events knows of one job."""

    job_id: str
    status: str = "SUBMITTED"
    completion: float = 0.0
    tiles: dict[str, Any] | None = None
    cost_pu: float | None = None
    batch_request_id: str | None = None
    stopped_reason: str | None = None
    error: dict[str, Any] | None = None
    rejected: dict[str, Any] | None = None
    events: int = 0
    last_sequence: int = 0
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None

    @property
    def finished(self) -> bool:
        return self.ended is not None

    @property
    def resting(self) -> bool:
        return self.status == "ANALYSIS_DONE"


class JobTracker:
    """Folds events into JobViews; returns whether an event was new."""

    def __init__(self, job_ids: list[str]) -> None:
        self.views = {job_id: JobView(job_id) for job_id in job_ids}
        self._seen: set[str] = set()

    def apply(self, event: dict[str, Any]) -> bool:
        data = event.get("data") or {}
        view = self.views.get(str(event.get("subject") or data.get("job_id")))
        event_id = str(event.get("id"))
        if view is None or event_id in self._seen:
            return False
        self._seen.add(event_id)
        kind = str(event.get("type", ""))
        if kind == "batchworker.command.rejected":
            view.events += 1
            view.rejected = data
            view.status = "REJECTED"
            view.ended = view.ended or time.monotonic()
            return True
        if not kind.startswith("batchworker.job."):
            view.events += 1
            return True
        sequence = int(data.get("sequence") or 0)
        if sequence <= view.last_sequence:
            return False
        view.events += 1
        view.last_sequence = sequence
        view.status = data.get("status") or view.status
        view.completion = float(data.get("completion_percentage") or 0.0)
        view.tiles = data.get("tiles")
        view.cost_pu = data.get("cost_pu")
        view.batch_request_id = data.get("batch_request_id")
        view.stopped_reason = data.get("stopped_reason")
        view.error = data.get("error")
        if view.status in TERMINAL:
            view.ended = view.ended or time.monotonic()
        return True


class EventFollower:
    """A private queue bound to the events exchange (kombu); lives as long as the process."""

    def __init__(self, settings: Settings, tracker: JobTracker) -> None:
        self.tracker = tracker
        self._connection: Connection = connection(settings, purpose="follow")
        try:
            self._subscribe(settings)
        except BaseException:
            self._connection.release()
            raise

    def _subscribe(self, settings: Settings) -> None:
        self._channel = self._connection.channel()
        exchange = Exchange(settings.events_exchange, type="topic", durable=True, passive=True)
        self._queue = Queue(
            f"batch-worker.commands.follow.{uuid.uuid4().hex[:12]}",
            exchange=exchange,
            routing_key="#",
            exclusive=True,
            auto_delete=True,
            durable=False,
        )
        self._consumer = Consumer(
            self._channel, queues=[self._queue], callbacks=[self._on_message], no_ack=True
        )
        self._consumer.consume()

    def _on_message(self, body: Any, message: Message) -> None:
        try:
            event = json.loads(message.body)
        except ValueError:
            return
        if isinstance(event, dict):
            self.tracker.apply(event)

    def drain(self, seconds: float) -> None:
        """Take in what arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self._connection.drain_events(timeout=left)
            except TimeoutError:
                return

    def close(self) -> None:
        self._connection.release()


def describe(view: JobView) -> str:
    tiles = view.tiles or {}
    total = tiles.get("total")
    tile_text = f"tiles {tiles.get('processed', 0)}/{total}" if total is not None else "tiles -"
    if tiles.get("failed"):
        tile_text += f" ({tiles['failed']} failed)"
    status = view.status + (f" {view.stopped_reason}" if view.stopped_reason else "")
    return f"[bold]{view.job_id:<28}[/] {status:<22} {tile_text}"


def progress_bars(console: Any) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>5.1f}%"),
        TimeElapsedColumn(),
        console=console,
    )


def show(progress: Progress, bars: dict[str, TaskID], tracker: JobTracker) -> None:
    for job_id, view in tracker.views.items():
        done = 100.0 if view.status == "DONE" else view.completion
        progress.update(bars[job_id], completed=done, description=describe(view))


def summary(tracker: JobTracker, title: str) -> Table:
    table = Table(title=title)
    for column in ("job", "batch request", "status", "tiles done/failed/total", "cost PU", "time"):
        table.add_column(column)
    for view in tracker.views.values():
        tiles = view.tiles or {}
        elapsed = (view.ended or time.monotonic()) - view.started
        status = view.status + (f" ({view.stopped_reason})" if view.stopped_reason else "")
        problem = view.error or view.rejected
        if problem:
            status += f" {problem.get('code', '')}"
        table.add_row(
            view.job_id,
            view.batch_request_id or "-",
            status,
            f"{tiles.get('processed', '-')}/{tiles.get('failed', '-')}/{tiles.get('total', '-')}",
            f"{view.cost_pu:.1f}" if view.cost_pu is not None else "-",
            f"{elapsed:.0f} s",
        )
    return table
