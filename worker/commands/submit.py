"""``batch-worker submit JOB.json [--wait]``: publish a job request like any producer would,
and optionally follow it live until it ends.

Progress and notes go to standard error; the final summary (the result) to standard output.
Exit codes: 0 DONE (or resting after analysis when ``auto_start`` is false), 1 FAILED,
STOPPED, rejected or not published, 2 an unusable job file, 3 gave up waiting.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from kombu.messaging import Producer
from rich.console import Console

from worker.broker import broker_problem, connection
from worker.commands.follow import BROKER_ERRORS, EventFollower, JobTracker, JobView
from worker.commands.render import describe, print_summary, progress_bars, show, show_changes
from worker.redact import redact_text
from worker.settings import Settings
from worker.wire.job_requests import SCHEMA_VERSION, Rejection, parse_job_request

EXIT_DONE = 0
EXIT_NOT_DONE = 1  # FAILED, STOPPED, rejected, or never published
EXIT_USAGE = 2
EXIT_TIMEOUT = 3

# publish(retry=True) retries forever unless bounded (DESIGN-NOTES).
_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.5, "interval_step": 1.0, "interval_max": 3}


def submit(
    settings: Settings, path: Path, *, wait: bool, timeout: float | None, json_out: bool = False
) -> int:
    try:
        body = path.read_bytes()
    except OSError as exc:
        Console(stderr=True).print(f"submit: cannot read {path}: {exc.strerror}", markup=False)
        return EXIT_USAGE
    return publish_request(
        settings, body, source=str(path), wait=wait, timeout=timeout, json_out=json_out
    )


def act(
    settings: Settings,
    job_id: str,
    action: str,
    *,
    wait: bool,
    timeout: float | None,
    json_out: bool = False,
) -> int:
    """``batch-worker cancel|start|resume JOB_ID``: the request a producer would publish."""
    body = json.dumps({"schema_version": SCHEMA_VERSION, "job_id": job_id, "action": action})
    return publish_request(
        settings,
        body.encode(),
        source=f"{action} {job_id}",
        wait=wait,
        timeout=timeout,
        json_out=json_out,
    )


def publish_request(
    settings: Settings,
    body: bytes,
    *,
    source: str,
    wait: bool,
    timeout: float | None,
    json_out: bool = False,
) -> int:
    """Publish one job request (``source`` names it in messages); with ``wait``, follow it
    (and with ``json_out``, end with the job's state as one JSON object)."""
    notes = Console(stderr=True)
    parsed = parse_job_request(body, "application/json")
    if isinstance(parsed, Rejection):
        # The worker would dead-letter it; say why now instead.
        notes.print(
            f"submit: {source} is not a valid job request ({parsed.code}): {parsed.message}",
            markup=False,
        )
        return EXIT_USAGE
    message_id = str(uuid.uuid4())
    tracker = JobTracker([parsed.job_id], action=parsed.action, command_id=message_id)
    follower: EventFollower | None = None
    try:
        # Bind (and read the job's state) before publishing, so not even the first event
        # can be missed.
        follower = (
            EventFollower(settings, tracker, on_note=lambda text: notes.print(text, markup=False))
            if wait
            else None
        )
        _publish(settings, body, message_id)
    except BROKER_ERRORS as exc:
        notes.print(f"submit: not published: {_broker_problem(settings, exc)}", markup=False)
        if follower is not None:
            follower.close()
        return EXIT_NOT_DONE
    notes.print(
        f"published {parsed.action} of job {parsed.job_id} to {settings.jobs_queue}"
        f" (message {message_id})",
        markup=False,
    )
    if follower is None:
        return EXIT_DONE
    try:
        rest_ends_wait = parsed.action == "submit" and not parsed.auto_start
        view = tracker.views[parsed.job_id]
        return _wait(notes, follower, view, timeout, rest_ends_wait, json_out=json_out)
    finally:
        follower.close()


def _broker_problem(settings: Settings, exc: BaseException) -> str:
    text = redact_text(str(exc)) or type(exc).__name__
    if "NO_ROUTE" in text:
        return f"no queue {settings.jobs_queue!r} (has a worker declared the topology?)"
    if "NOT_FOUND" in text:
        return f"{text} (has a worker declared the topology?)"
    return broker_problem(settings.broker_url.get_secret_value(), exc)


def _publish(settings: Settings, body: bytes, message_id: str) -> None:
    with connection(settings, purpose="submit") as conn:
        # Read when the connection opens: its channels are in confirm mode, so publish()
        # returns once the broker has the message (and raises if it could not route it).
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


def _wait(
    notes: Console,
    follower: EventFollower,
    view: JobView,
    timeout: float | None,
    rest_ends_wait: bool,
    *,
    json_out: bool,
) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    tracker = follower.tracker
    timed_out = False
    with progress_bars(notes) as progress:
        bars = {view.job_id: progress.add_task(describe(view), total=100)}
        while not view.finished and not (rest_ends_wait and view.resting):
            follower.drain(0.5)
            show(progress, bars, tracker)
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                break
    show_changes(notes, tracker)
    print_summary(Console(), tracker, f"job {view.job_id}", json_lines=json_out)
    if view.ended_before and view.finished and not view.rejected:
        notes.print(f"job {view.job_id} had already ended: the request changes nothing")
    if timed_out:
        notes.print(f"gave up waiting after {timeout:g} s; the job goes on", markup=False)
        return EXIT_TIMEOUT
    if view.rejected:
        notes.print(json.dumps(view.rejected, indent=2), markup=False)
        return EXIT_NOT_DONE
    if view.resting:
        notes.print("resting after analysis: publish a `start` (or `cancel`) for this job")
        return EXIT_DONE
    return EXIT_DONE if view.status == "DONE" else EXIT_NOT_DONE
