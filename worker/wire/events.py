"""CloudEvents 1.0 (structured JSON) for everything the worker publishes, and the
messages the relay sends: events, copies to ``reply_to``, dead letters.

Pure: the builders return ``OutboxMessage`` values; the relay publishes them with confirms.
The wire shapes are the models of ``worker.wire.event_models`` (and the JSON Schemas made
from them).
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from worker import APP_ID
from worker.lifecycle import KNOWN_STATUSES, PAUSED, Echo, JobState, Phase, followups, total_cost
from worker.redact import redact
from worker.wire.event_models import (
    COMMAND_ACCEPTED,
    COMMAND_REJECTED,
    JOB_PROGRESS,
    JOB_STATUS,
    BatchRequestData,
    CostForecastData,
    ErrorData,
    JobEventData,
    TilesData,
)
from worker.wire.job_requests import ACTIONS, Rejection
from worker.wire.outgoing import OutboxMessage
from worker.wire.properties import dead_letter_tables

CONTENT_TYPE = "application/cloudevents+json"
PERSISTENT = 2

# Headers a dead letter carries on top of the original message's own.
REASON_HEADER = "x-batch-worker-reason"
DETAIL_HEADER = "x-batch-worker-detail"
REJECTED_AT_HEADER = "x-batch-worker-rejected-at"

# Fixed forever: changing it would change the id of every re-published event.
_EVENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:batch-worker:events")
_NOT_A_ROUTING_WORD = re.compile(r"[^a-z0-9_]")


# ------------------------------------------------------------------------------------------
# Ids, routing keys, time
# ------------------------------------------------------------------------------------------


def event_id(fleet_id: str, job_id: str, sequence: int) -> str:
    """The id of a job's event number ``sequence``: the same every time it is published."""
    # Neither a fleet id nor a job id can hold "/", so the name is unambiguous.
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"job/{fleet_id}/{job_id}/{sequence}"))


def command_event_id(fleet_id: str, kind: str, message_id: str | None) -> str:
    """Stable for a redelivered request that carries a ``message_id``; fresh otherwise."""
    if message_id is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"command/{fleet_id}/{kind}/{message_id}"))


def status_routing_key(status: str) -> str:
    """``job.<status in lower case>``; a status the API adds later stays one routing word."""
    return "job." + _NOT_A_ROUTING_WORD.sub("_", status.lower())


PROGRESS_ROUTING_KEY = "job.progress"
COMMAND_ROUTING_KEYS = {"accepted": "command.accepted", "rejected": "command.rejected"}
# Every routing key the worker publishes events with, for the statuses known today.
ROUTING_KEYS = (
    *COMMAND_ROUTING_KEYS.values(),
    *(status_routing_key(status) for status in KNOWN_STATUSES),
    status_routing_key(PAUSED),
    PROGRESS_ROUTING_KEY,
)


@functools.lru_cache(maxsize=16)  # intake stamps a whole batch with one moment
def rfc3339_ms(moment: datetime) -> str:
    """``2026-11-25T21:30:00.123Z``: UTC, milliseconds."""
    if moment.tzinfo is None:
        raise ValueError("a naive datetime has no place in an event")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


# ------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------


def job_event(
    state: JobState,
    kind: Literal["status", "progress"],
    *,
    exchange: str,
    worker: str,
    now: datetime,
    sequence: int | None = None,
) -> list[OutboxMessage]:
    """The job's event for ``state`` (and its copy for ``reply_to``).

    ``sequence`` defaults to ``state.sequence``; a step that emits two events passes each
    its own (``Emit.sequence``).
    """
    if state.status is None:
        raise ValueError(f"job {state.job_id}: no status to publish yet")
    seq = state.sequence if sequence is None else sequence
    tiles = state.tiles
    error = state.error
    skipped = state.retry.skipped
    forecast = state.cost_forecast
    data = JobEventData(
        job_id=state.job_id,
        batch_request_id=state.batch_request_id,
        status=state.status,
        sequence=seq,
        completion_percentage=state.completion,
        tiles=None
        if tiles is None
        else TilesData(total=tiles.total, processed=tiles.processed, failed=tiles.failed),
        cost_pu=total_cost(state),  # every request of the job (follow-ups included)
        stopped_reason=state.stopped_reason,
        error=None if error is None else ErrorData(**error.model_dump()),
        worker=worker,
        final=kind == "status" and state.phase is Phase.ENDED,
        resume_at=_resume_at(state),
        resumes=len(state.resumed),
        duplicates_stopped=list(state.duplicates_stopped),
        attempt=state.retry.attempt,
        batch_requests=[BatchRequestData(**row) for row in followups.batch_requests(state)],
        retry_skipped=None if skipped is None else ErrorData(**skipped.model_dump()),
        tenant=state.tenant,
        cost_forecast_pu=None if forecast is None else forecast.pu,
        cost_forecast=None
        if forecast is None
        else CostForecastData(method=forecast.method, at_completion=forecast.at_completion),
    )
    if kind == "status":
        event_type, routing_key = JOB_STATUS, status_routing_key(state.status)
    else:
        event_type, routing_key = JOB_PROGRESS, PROGRESS_ROUTING_KEY
    return _publishes(
        event_id=event_id(state.fleet_id, state.job_id, seq),
        event_type=event_type,
        fleet_id=state.fleet_id,
        subject=state.job_id,
        data=_job_data(data),
        exchange=exchange,
        routing_key=routing_key,
        echo=state.echo,
        now=now,
    )


def _job_data(data: JobEventData) -> dict[str, Any]:
    out = data.model_dump(mode="json")
    for name in ("retry_skipped", "tenant"):
        if out.get(name) is None:
            out.pop(name, None)  # left out when there is none, never null
    return out


def _resume_at(state: JobState) -> str | None:
    pause = state.pause
    at = None if pause is None else pause.next_start_at
    return None if at is None else rfc3339_ms(at)


def command_event(
    kind: Literal["accepted", "rejected"],
    *,
    fleet_id: str,
    exchange: str,
    worker: str,
    now: datetime,
    job_id: str | None,
    action: str | None,
    echo: Echo,
    rejection: Rejection | None = None,
    tenant: str | None = None,
) -> list[OutboxMessage]:
    """``command.accepted`` / ``command.rejected`` for one request message."""
    if (kind == "rejected") != (rejection is not None):
        raise ValueError("a rejection goes with, and only with, kind='rejected'")
    # The fields of messages.CommandEventData, in its order, built directly: intake makes
    # one per message, and the model's validation and dump cost more than the rest here.
    data: dict[str, Any] = {
        "job_id": job_id,
        "action": action if action in ACTIONS else None,
    }
    if rejection is not None:
        data["code"] = str(rejection.code)
        data["message"] = rejection.message
    data["worker"] = worker
    if tenant is not None:
        data["tenant"] = tenant
    return _publishes(
        event_id=command_event_id(fleet_id, kind, echo.message_id),
        event_type=COMMAND_ACCEPTED if kind == "accepted" else COMMAND_REJECTED,
        fleet_id=fleet_id,
        subject=job_id,
        data=data,
        exchange=exchange,
        routing_key=COMMAND_ROUTING_KEYS[kind],
        echo=echo,
        now=now,
    )


def dead_letter(
    message_body: bytes,
    properties: Mapping[str, Any],
    headers: Mapping[str, Any],
    *,
    dlq: str,
    rejection: Rejection,
    now: datetime,
) -> OutboxMessage:
    """The rejected message whole, for the DLQ, with why and when in three headers.

    The body is kept byte for byte (secrets included: the DLQ is the producer's own data,
    guarded like the jobs queue); only the added headers are the worker's words.
    """
    flat = dict(properties)
    # A headers table inside the properties (kombu's ``application_headers``) joins the rest.
    table: dict[str, Any] = dict(flat.pop("application_headers", None) or {})
    table.update(flat.pop("headers", None) or {})
    table.update(headers)
    # Never what the broker acts on (user_id, expiration, CC/BCC): worker/wire/properties.py.
    kept, merged = dead_letter_tables(flat, table)
    merged[REASON_HEADER] = str(rejection.code)
    merged[DETAIL_HEADER] = rejection.message
    merged[REJECTED_AT_HEADER] = rfc3339_ms(now)
    return OutboxMessage(
        exchange="",
        routing_key=dlq,
        body=message_body,
        properties=kept,
        headers=merged,
        mandatory=True,  # a missing DLQ must not swallow the message silently
    )


def _publishes(
    *,
    event_id: str,
    event_type: str,
    fleet_id: str,
    subject: str | None,
    data: dict[str, Any],
    exchange: str,
    routing_key: str,
    echo: Echo,
    now: datetime,
) -> list[OutboxMessage]:
    envelope: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": f"/batch-worker/{fleet_id}",
        "type": event_type,
    }
    if subject is not None:
        envelope["subject"] = subject
    envelope["time"] = rfc3339_ms(now)
    envelope["datacontenttype"] = "application/json"
    if echo.correlation_id is not None:
        envelope["correlationid"] = echo.correlation_id
    if echo.message_id is not None:
        envelope["causationid"] = echo.message_id
    envelope["data"] = redact(data)
    body = _json(envelope)

    properties: dict[str, Any] = {
        "content_type": CONTENT_TYPE,
        "message_id": event_id,
        "type": event_type,
        "app_id": APP_ID,
        "timestamp": int(now.timestamp()),
        "delivery_mode": PERSISTENT,
    }
    if echo.correlation_id is not None:
        properties["correlation_id"] = echo.correlation_id
    published = [OutboxMessage(exchange, routing_key, body, properties)]
    if echo.reply_to:
        published.append(reply_copy(published[0], echo.reply_to))
    return published


def reply_copy(message: OutboxMessage, reply_to: str) -> OutboxMessage:
    """The same event (same id, body and properties) for a ``reply_to`` queue.

    Through the default exchange, which routes by queue name; mandatory, so a vanished reply
    queue comes back as a return instead of vanishing.
    """
    return OutboxMessage(
        exchange="",
        routing_key=reply_to,
        body=message.body,
        properties=dict(message.properties),
        headers=dict(message.headers),
        mandatory=True,
    )


def _json(envelope: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON; orjson is several times faster than json, which stays for what
    orjson refuses (integers beyond 64 bits)."""
    try:
        return orjson.dumps(envelope)
    except orjson.JSONEncodeError:
        return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
