"""Event builders: CloudEvents envelopes, AMQP properties, reply_to copies, dead letters."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from worker.lifecycle import (
    KNOWN_STATUSES,
    CostForecast,
    Echo,
    JobError,
    JobState,
    PastRequest,
    Pause,
    Phase,
    Retry,
    Tiles,
)
from worker.wire.event_models import CommandEventData
from worker.wire.events import (
    APP_ID,
    DETAIL_HEADER,
    REASON_HEADER,
    REJECTED_AT_HEADER,
    ROUTING_KEYS,
    command_event,
    dead_letter,
    event_id,
    job_event,
    rfc3339_ms,
    status_routing_key,
)
from worker.wire.job_requests import RejectCode, Rejection
from worker.wire.outgoing import OutboxMessage

NOW = datetime(2026, 11, 25, 21, 30, 0, 123_456, tzinfo=UTC)
EVENTS = "batch.events"


def state(**changes: Any) -> JobState:
    fields: dict[str, Any] = {
        "job_id": "corsica-ndvi-2019-q2",
        "fleet_id": "default",
        "request_hash": "0" * 64,
        "accepted_at": NOW,
        "batch_request_id": "6aa8765a-1111",
        "status": "PROCESSING",
        "sequence": 4,
        "completion": 42.0,
        "tiles": Tiles(total=120, processed=50, failed=2),
        "cost_pu": 310.5,
    }
    fields.update(changes)
    return JobState(**fields)


def envelope(message: OutboxMessage) -> dict[str, Any]:
    parsed = json.loads(message.body)
    assert isinstance(parsed, dict)
    return parsed


# --- ids and keys ------------------------------------------------------------------------------


def test_event_ids_are_stable_uuid5_and_distinct_per_fleet_job_and_sequence() -> None:
    first = event_id("default", "job", 1)
    assert first == event_id("default", "job", 1)
    assert uuid.UUID(first).version == 5
    others = {
        event_id("other", "job", 1),
        event_id("default", "job2", 1),
        event_id("default", "job", 2),
    }
    assert first not in others and len(others) == 3


def test_status_routing_keys_are_one_lower_case_word() -> None:
    assert status_routing_key("ANALYSIS_DONE") == "job.analysis_done"
    assert status_routing_key("NEW.STATUS-X") == "job.new_status_x"
    assert set(ROUTING_KEYS) >= {"command.accepted", "command.rejected", "job.progress"}
    assert {f"job.{s.lower()}" for s in KNOWN_STATUSES} <= set(ROUTING_KEYS)


def test_time_is_utc_with_milliseconds() -> None:
    assert rfc3339_ms(NOW) == "2026-11-25T21:30:00.123Z"
    assert rfc3339_ms(NOW.astimezone(timezone(timedelta(hours=-7)))) == "2026-11-25T21:30:00.123Z"
    with pytest.raises(ValueError, match="naive"):
        rfc3339_ms(datetime(2026, 1, 1))


# --- job events -------------------------------------------------------------------------------


def test_a_status_event_matches_the_contract() -> None:
    [message] = job_event(state(), "status", exchange=EVENTS, worker="w-1", now=NOW)
    assert (message.exchange, message.routing_key, message.mandatory) == (
        EVENTS,
        "job.processing",
        False,
    )
    event = envelope(message)
    assert event == {
        "specversion": "1.0",
        "id": event_id("default", "corsica-ndvi-2019-q2", 4),
        "source": "/batch-worker/default",
        "type": "batchworker.job.status",
        "subject": "corsica-ndvi-2019-q2",
        "time": "2026-11-25T21:30:00.123Z",
        "datacontenttype": "application/json",
        "data": {
            "job_id": "corsica-ndvi-2019-q2",
            "batch_request_id": "6aa8765a-1111",
            "status": "PROCESSING",
            "sequence": 4,
            "completion_percentage": 42.0,
            "tiles": {"total": 120, "processed": 50, "failed": 2},
            "cost_pu": 310.5,
            "stopped_reason": None,
            "error": None,
            "worker": "w-1",
            "final": False,
            "resume_at": None,
            "resumes": 0,
            "duplicates_stopped": [],
            "attempt": 0,
            "batch_requests": [
                {
                    "batch_request_id": "6aa8765a-1111",
                    "attempt": 0,
                    "status": "PROCESSING",
                    "cost_pu": 310.5,
                    "features": None,
                    "processed": 50,
                    "failed": 2,
                }
            ],
            "cost_forecast_pu": None,
            "cost_forecast": None,
        },
    }
    assert message.properties == {
        "content_type": "application/cloudevents+json",
        "message_id": event["id"],
        "type": "batchworker.job.status",
        "app_id": APP_ID,
        "timestamp": int(NOW.timestamp()),
        "delivery_mode": 2,
    }


def test_a_follow_up_names_every_request_sums_the_cost_and_tells_a_skip() -> None:
    first = state()
    past = PastRequest(
        batch_request_id="6aa8765a-1111",
        attempt=0,
        status="DONE",
        cost_pu=300.0,
        processed=110,
        failed=10,
    )
    later = first.model_copy(
        update={
            "batch_request_id": "follow-1",
            "upstream_status": "DONE",
            "status": "DONE",
            "cost_pu": 20.0,
            "tiles": Tiles(total=120, processed=118, failed=2),
            "retry": Retry(
                attempts=1,
                attempt=1,
                past=(past,),
                covering=10,
                base_processed=110,
                skipped=JobError(source="worker", code="RETRY_COST_LIMIT", message="spent"),
            ),
        }
    )
    [message] = job_event(later, "status", exchange=EVENTS, worker="w", now=NOW)
    data = envelope(message)["data"]
    assert data["cost_pu"] == 320.0 and data["attempt"] == 1
    assert [
        (r["batch_request_id"], r["attempt"], r["features"], r["processed"])
        for r in data["batch_requests"]
    ] == [("6aa8765a-1111", 0, None, 110), ("follow-1", 1, 10, 8)]
    assert data["retry_skipped"]["code"] == "RETRY_COST_LIMIT"
    assert (
        "retry_skipped"
        not in envelope(job_event(first, "status", exchange=EVENTS, worker="w", now=NOW)[0])["data"]
    )


def test_a_paused_event_says_it_is_not_final_and_when_the_job_goes_on() -> None:
    since = NOW - timedelta(minutes=1)
    pause = Pause(
        reason="UNHEALTHY",
        since=since,
        earliest=since + timedelta(minutes=30),
        resume_at=since + timedelta(minutes=32, milliseconds=250),
        cost_pu=310.5,
    )
    paused = state(status="PAUSED", stopped_reason="UNHEALTHY", pause=pause)
    [message] = job_event(paused, "status", exchange=EVENTS, worker="w-1", now=NOW)
    assert message.routing_key == "job.paused"
    data = envelope(message)["data"]
    assert (data["status"], data["final"], data["stopped_reason"]) == (
        "PAUSED",
        False,
        "UNHEALTHY",
    )
    assert data["resume_at"] == rfc3339_ms(since + timedelta(minutes=32, milliseconds=250))
    parked = paused.model_copy(update={"pause": pause.model_copy(update={"resume_at": None})})
    [message] = job_event(parked, "status", exchange=EVENTS, worker="w-1", now=NOW)
    assert envelope(message)["data"]["resume_at"] is None


def test_only_the_terminal_status_event_is_final() -> None:
    ended = state(status="DONE", phase=Phase.ENDED, resumed=("UNHEALTHY",))
    [status] = job_event(ended, "status", exchange=EVENTS, worker="w-1", now=NOW)
    [progress] = job_event(ended, "progress", exchange=EVENTS, worker="w-1", now=NOW)
    assert envelope(status)["data"]["final"] is True
    assert envelope(status)["data"]["resumes"] == 1
    assert envelope(progress)["data"]["final"] is False


def test_a_job_event_carries_the_cost_forecast_and_how_it_was_made() -> None:
    forecast = CostForecast(pu=739.286, method="linear", at_completion=42.0)
    [message] = job_event(
        state(cost_forecast=forecast), "progress", exchange=EVENTS, worker="w", now=NOW
    )
    data = envelope(message)["data"]
    assert data["cost_forecast_pu"] == 739.286
    assert data["cost_forecast"] == {"method": "linear", "at_completion": 42.0}


def test_a_progress_event_has_its_own_type_and_routing_key() -> None:
    [message] = job_event(state(), "progress", exchange=EVENTS, worker="w", now=NOW)
    assert message.routing_key == "job.progress"
    assert envelope(message)["type"] == "batchworker.job.progress"
    assert message.properties["type"] == "batchworker.job.progress"


def test_a_republished_event_is_byte_identical() -> None:
    first = job_event(state(), "status", exchange=EVENTS, worker="w", now=NOW)
    again = job_event(state(), "status", exchange=EVENTS, worker="w", now=NOW)
    assert first == again


def test_the_sequence_can_be_given_for_a_step_that_emits_twice() -> None:
    [message] = job_event(state(), "progress", exchange=EVENTS, worker="w", now=NOW, sequence=3)
    assert envelope(message)["data"]["sequence"] == 3
    assert message.properties["message_id"] == event_id("default", "corsica-ndvi-2019-q2", 3)


def test_a_stopped_failed_job_carries_reason_error_and_duplicates() -> None:
    ended = state(
        status="STOPPED",
        stopped_reason="COST_LIMIT",
        error=JobError(source="api", http_status=400, code="BAD", message="no"),
        duplicates_stopped=("dup-1", "dup-2"),
        tiles=None,
    )
    [message] = job_event(ended, "status", exchange=EVENTS, worker="w", now=NOW)
    data = envelope(message)["data"]
    assert message.routing_key == "job.stopped"
    assert data["stopped_reason"] == "COST_LIMIT"
    assert data["error"] == {"source": "api", "http_status": 400, "code": "BAD", "message": "no"}
    assert data["duplicates_stopped"] == ["dup-1", "dup-2"]
    assert data["tiles"] is None


def test_echo_gives_correlation_and_a_mandatory_copy_for_reply_to() -> None:
    echo = Echo(message_id="m-1", correlation_id="c-1", reply_to="my.replies")
    event, copy = job_event(state(echo=echo), "status", exchange=EVENTS, worker="w", now=NOW)
    assert (copy.exchange, copy.routing_key, copy.mandatory) == ("", "my.replies", True)
    assert copy.body == event.body
    assert copy.properties == event.properties
    assert event.properties["correlation_id"] == "c-1"
    parsed = envelope(event)
    assert (parsed["correlationid"], parsed["causationid"]) == ("c-1", "m-1")


def test_secrets_in_an_error_never_reach_the_event() -> None:
    error = JobError(
        source="api", code="BAD", message='refused: {"secretAccessKey": "wJalrXUtnFEMIsecret"}'
    )
    [message] = job_event(state(error=error), "status", exchange=EVENTS, worker="w", now=NOW)
    assert b"wJalrXUtnFEMIsecret" not in message.body


def test_a_job_without_a_status_has_no_status_event() -> None:
    with pytest.raises(ValueError, match="no status"):
        job_event(state(status=None), "status", exchange=EVENTS, worker="w", now=NOW)


# --- command events ------------------------------------------------------------------------------


def accepted(echo: Echo, **kwargs: Any) -> list[OutboxMessage]:
    fields: dict[str, Any] = {"job_id": "j", "action": "submit"}
    fields.update(kwargs)
    return command_event(
        "accepted", fleet_id="default", exchange=EVENTS, worker="w", now=NOW, echo=echo, **fields
    )


def test_an_accepted_event_and_its_stable_id_for_a_message_id() -> None:
    [message] = accepted(Echo(message_id="m-1", correlation_id="c-1"))
    event = envelope(message)
    assert message.routing_key == "command.accepted"
    assert event["type"] == "batchworker.command.accepted"
    assert event["subject"] == "j"
    assert event["data"] == {"job_id": "j", "action": "submit", "worker": "w"}
    assert message.properties["correlation_id"] == "c-1"
    assert accepted(Echo(message_id="m-1"))[0].properties["message_id"] == event["id"]
    assert accepted(Echo(message_id="m-2"))[0].properties["message_id"] != event["id"]


def test_without_a_message_id_every_command_event_has_a_fresh_id() -> None:
    first, second = accepted(Echo())[0], accepted(Echo())[0]
    assert envelope(first)["id"] != envelope(second)["id"]
    assert "correlation_id" not in first.properties


def test_a_rejected_event_without_a_job_id_has_no_subject() -> None:
    rejection = Rejection(RejectCode.MALFORMED_JSON, "the body is not UTF-8 JSON")
    [message, copy] = command_event(
        "rejected",
        fleet_id="default",
        exchange=EVENTS,
        worker="w",
        now=NOW,
        job_id=None,
        action=None,
        echo=Echo(reply_to="replies"),
        rejection=rejection,
    )
    event = envelope(message)
    assert message.routing_key == "command.rejected"
    assert "subject" not in event
    assert event["data"] == {
        "job_id": None,
        "action": None,
        "code": "MALFORMED_JSON",
        "message": "the body is not UTF-8 JSON",
        "worker": "w",
    }
    assert (copy.routing_key, copy.mandatory) == ("replies", True)


@pytest.mark.parametrize("action", ["submit", "cancel", "bogus", None])
@pytest.mark.parametrize("kind", ["accepted", "rejected"])
def test_command_event_data_is_the_models_dump_key_for_key(kind: str, action: str | None) -> None:
    rejection = Rejection(RejectCode.JOB_NOT_FOUND, "no job", "j") if kind == "rejected" else None
    [message] = command_event(
        kind,  # type: ignore[arg-type]
        fleet_id="f", exchange=EVENTS, worker="w", now=NOW, job_id="j", action=action,
        echo=Echo(), rejection=rejection,
    )  # fmt: skip
    model = CommandEventData(
        job_id="j",
        action=action if action in ("submit", "cancel") else None,  # type: ignore[arg-type]
        code=None if rejection is None else "JOB_NOT_FOUND",
        message=None if rejection is None else "no job",
        worker="w",
    ).model_dump(mode="json")
    del model["tenant"]  # absent when the message named none, never null
    if rejection is None:
        del model["code"], model["message"]  # absent from an accepted event, never null
    # Same keys in the same order: the same bytes on the wire as the model gives.
    assert list(envelope(message)["data"].items()) == list(model.items())


def test_a_rejection_goes_with_and_only_with_rejected() -> None:
    with pytest.raises(ValueError, match="rejection"):
        command_event(
            "rejected", fleet_id="f", exchange=EVENTS, worker="w", now=NOW,
            job_id="j", action="submit", echo=Echo(),
        )  # fmt: skip
    with pytest.raises(ValueError, match="rejection"):
        accepted(Echo(), rejection=Rejection("X", "y"))


# --- dead letters -------------------------------------------------------------------------------


def test_a_dead_letter_keeps_the_message_whole_and_says_why() -> None:
    raw = b'\xff{"job_id": "j", "secretAccessKey": "kept as it came"}'
    properties = {
        "content_type": "application/json",
        "message_id": "m-1",
        "correlation_id": "c-1",
        "reply_to": "r",
        "delivery_mode": 2,
        "application_headers": {"x-producer": "p"},
    }
    letter = dead_letter(
        raw,
        properties,
        {"x-trace": "t", "x-delivery-count": 2},
        dlq="batch.jobs.dlq",
        rejection=Rejection(RejectCode.MALFORMED_JSON, "the body is not UTF-8 JSON"),
        now=NOW,
    )
    assert letter.body == raw
    assert (letter.exchange, letter.routing_key, letter.mandatory) == ("", "batch.jobs.dlq", True)
    assert letter.properties == {k: v for k, v in properties.items() if k != "application_headers"}
    assert letter.headers == {
        "x-producer": "p",
        "x-trace": "t",
        "x-delivery-count": 2,
        REASON_HEADER: "MALFORMED_JSON",
        DETAIL_HEADER: "the body is not UTF-8 JSON",
        REJECTED_AT_HEADER: "2026-11-25T21:30:00.123Z",
    }
