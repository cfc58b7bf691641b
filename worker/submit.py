"""``batch-worker submit JOB.json [--wait]``: publish a job request like any producer would,
and optionally follow it live until it ends."""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from kombu import Producer
from rich.console import Console

from worker.broker import connection
from worker.follow import EventFollower, JobTracker, describe, progress_bars, show, summary
from worker.messages import Rejection, parse_job_request
from worker.settings import Settings

EXIT_DONE = 0
EXIT_NOT_DONE = 1  # FAILED, STOPPED or rejected
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

# publish(retry=True) retries forever unless bounded (DESIGN-NOTES).
_RETRY_POLICY = {"max_retries": 5, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 5}


def submit(settings: Settings, path: Path, *, wait: bool, timeout: float | None) -> int:
    console = Console(stderr=True)
    try:
        body = path.read_bytes()
    except OSError as exc:
        console.print(f"[red]submit: cannot read {path}: {exc.strerror}[/]")
        return EXIT_USAGE
    parsed = parse_job_request(body, "application/json")
    if isinstance(parsed, Rejection):
        # The worker would dead-letter it; say why now instead.
        console.print(f"[red]submit: {path} is not a valid job request: {parsed.message}[/]")
        return EXIT_USAGE
    tracker = JobTracker([parsed.job_id])
    # Bind before publishing, so not even the first event can be missed.
    follower = EventFollower(settings, tracker) if wait else None
    try:
        message_id = _publish(settings, body)
        console.print(f"published {parsed.action} of job {parsed.job_id} (message {message_id})")
        if follower is None:
            return EXIT_DONE
        rest_ends_wait = parsed.action == "submit" and not parsed.auto_start
        return _wait(
            console,
            follower,
            tracker,
            parsed.job_id,
            timeout=timeout,
            rest_ends_wait=rest_ends_wait,
        )
    finally:
        if follower is not None:
            follower.close()


def _publish(settings: Settings, body: bytes) -> str:
    message_id = str(uuid.uuid4())
    with connection(settings, purpose="submit") as conn:
        conn.transport_options["confirm_publish"] = True
        producer = Producer(conn.channel())
        producer.publish(
            body,
            exchange="",
            routing_key=settings.jobs_queue,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
            mandatory=True,
            message_id=message_id,
            retry=True,
            retry_policy=_RETRY_POLICY,
        )
    return message_id


def _wait(
    console: Console,
    follower: EventFollower,
    tracker: JobTracker,
    job_id: str,
    *,
    timeout: float | None,
    rest_ends_wait: bool,
) -> int:
    view = tracker.views[job_id]
    deadline = None if timeout is None else time.monotonic() + timeout
    with progress_bars(console) as progress:
        bars = {job_id: progress.add_task(describe(view), total=100)}
        while not view.finished:
            follower.drain(0.5)
            show(progress, bars, tracker)
            if rest_ends_wait and view.resting:
                break
            if deadline is not None and time.monotonic() > deadline:
                console.print(f"[yellow]gave up waiting after {timeout:g} s[/]")
                return EXIT_TIMEOUT
    console.print(summary(tracker, f"job {job_id}"))
    if rest_ends_wait and view.resting:
        console.print("resting after analysis: publish a `start` (or `cancel`) for this job")
        return EXIT_DONE
    if view.rejected:
        print(json.dumps(view.rejected, indent=2), file=sys.stderr)
    return EXIT_DONE if view.status == "DONE" else EXIT_NOT_DONE
