"""The JSON Schemas in worker/wire/schemas/: in step with the models, and true of what is sent."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from worker.lifecycle import KNOWN_STATUSES, Echo, JobError, JobState, Tiles
from worker.settings import Settings
from worker.wire.event_models import EVENT_TYPES
from worker.wire.events import ROUTING_KEYS, command_event, job_event
from worker.wire.job_requests import RejectCode, Rejection, parse_job_request
from worker.wire.outgoing import OutboxMessage
from worker.wire.schemas import SCHEMA_DIR, schema_documents, stale_schemas, write_schemas
from worker.wire.topology import topology

CONTRACT = Path(__file__).resolve().parents[2] / "docs" / "contract.md"
NOW = datetime(2026, 11, 25, 21, 30, 0, 123_000, tzinfo=UTC)


def validator(name: str) -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


REQUEST = validator("job-request.schema.json")
JOB_EVENT = validator("job-event.schema.json")
COMMAND_EVENT = validator("command-event.schema.json")


def contract_examples() -> list[dict[str, Any]]:
    blocks = re.findall(r"```json\n(.*?)\n```", CONTRACT.read_text(encoding="utf-8"), re.S)
    return [json.loads(block) for block in blocks]


def event_of(message: OutboxMessage) -> dict[str, Any]:
    parsed = json.loads(message.body)
    assert isinstance(parsed, dict)
    return parsed


# --- the files --------------------------------------------------------------------------------


def test_the_schema_files_are_what_the_models_generate() -> None:
    assert stale_schemas() == [], "run: batch-worker schemas --write"


def test_a_drifted_file_is_noticed_and_rewritten(tmp_path: Path) -> None:
    write_schemas(tmp_path)
    (tmp_path / "job-event.schema.json").write_text("{}", encoding="utf-8")
    assert stale_schemas(tmp_path) == ["job-event.schema.json"]
    write_schemas(tmp_path)
    assert stale_schemas(tmp_path) == []


@pytest.mark.parametrize("name", sorted(schema_documents()))
def test_each_schema_is_a_valid_2020_12_schema(name: str) -> None:
    Draft202012Validator.check_schema(json.loads(schema_documents()[name]))


# --- the contract's examples --------------------------------------------------------------------


def test_the_contracts_request_and_event_examples_validate() -> None:
    request, event = contract_examples()
    REQUEST.validate(request)
    JOB_EVENT.validate(event)


# --- requests: the schema and the parser agree ------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"job_id": "j", "request": {}},
        {
            "job_id": "j",
            "batch_request_id": "6aa8765a-e9eb-4dd0-a567-b86cfdb840e0",
            "request": None,
        },
        {"job_id": "j", "batch_request_id": "b", "request": None},
        {"job_id": "j", "batch_request_id": ".."},
        {"job_id": "j", "action": "cancel"},
        {"job_id": "j", "action": "start"},
        {"job_id": "j", "request": {}, "deadline": "2026-12-01T00:00:00+02:00", "future": 1},
        {"job_id": "j"},
        {"job_id": "j", "request": {}, "batch_request_id": "b"},
        {"job_id": "j", "request": "x"},
        {"job_id": "j", "action": "destroy"},
        {"job_id": "", "request": {}},
        {"request": {}},
        {"job_id": "j", "request": {}, "schema_version": 2},
        {"job_id": "j", "request": {}, "max_cost_pu": 0},
        {"job_id": "j", "request": {}, "auto_start": "yes"},
    ],
)
def test_the_request_schema_accepts_what_the_parser_accepts(fields: dict[str, Any]) -> None:
    parsed = parse_job_request(json.dumps(fields).encode(), "application/json")
    assert REQUEST.is_valid(fields) == (not isinstance(parsed, Rejection))


# --- events: everything the builders produce validates -------------------------------------------

states = st.builds(
    JobState,
    job_id=st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True),
    fleet_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True),
    request_hash=st.just("0" * 64),
    accepted_at=st.just(NOW),
    batch_request_id=st.none() | st.uuids().map(str),
    status=st.sampled_from([*KNOWN_STATUSES, "SOMETHING_NEW"]),
    sequence=st.integers(1, 10**6),
    completion=st.floats(0, 100),
    cost_pu=st.none() | st.floats(0, 1e6),
    tiles=st.none() | st.builds(Tiles, total=st.none() | st.integers(0, 10**5)),
    stopped_reason=st.none() | st.sampled_from(["USER_ACTION", "DEADLINE", "COST_LIMIT"]),
    error=st.none()
    | st.builds(
        JobError,
        source=st.sampled_from(["worker", "api"]),
        http_status=st.none() | st.integers(400, 599),
        code=st.text(min_size=1, max_size=20),
        message=st.text(max_size=80),
    ),
    duplicates_stopped=st.lists(st.uuids().map(str), max_size=2).map(tuple),
    echo=st.builds(
        Echo,
        message_id=st.none() | st.text(min_size=1, max_size=20),
        correlation_id=st.none() | st.text(min_size=1, max_size=20),
        reply_to=st.none() | st.just("replies"),
    ),
)


@settings(max_examples=40, deadline=None)
@given(states, st.sampled_from(["status", "progress"]))
def test_every_job_event_validates(state: JobState, kind: Any) -> None:
    for message in job_event(state, kind, exchange="e", worker="w", now=NOW):
        JOB_EVENT.validate(event_of(message))


@pytest.mark.parametrize("job_id", [None, "j"])
@pytest.mark.parametrize("action", [None, "submit", "start", "cancel"])
def test_every_command_event_validates(job_id: str | None, action: str | None) -> None:
    echo = Echo(message_id="m", correlation_id="c", reply_to="r")
    common: dict[str, Any] = {
        "fleet_id": "default", "exchange": "e", "worker": "w", "now": NOW,
        "job_id": job_id, "action": action, "echo": echo,
    }  # fmt: skip
    rejection = Rejection(RejectCode.JOB_CONFLICT, "a different request", job_id, action)
    for message in [
        *command_event("accepted", **common),
        *command_event("rejected", rejection=rejection, **common),
    ]:
        COMMAND_EVENT.validate(event_of(message))


def test_the_event_schemas_refuse_what_the_worker_never_sends() -> None:
    [status] = job_event(
        JobState(
            job_id="j", fleet_id="f", request_hash="", accepted_at=NOW, status="DONE", sequence=1
        ),
        "status",
        exchange="e",
        worker="w",
        now=NOW,
    )
    good = event_of(status)
    assert JOB_EVENT.is_valid(good)
    assert not JOB_EVENT.is_valid(good | {"type": "batchworker.command.accepted"})
    assert not JOB_EVENT.is_valid(good | {"time": "2026-11-25T21:30:00Z"})
    assert not JOB_EVENT.is_valid(good | {"data": good["data"] | {"sequence": 0}})
    without_tiles = {k: v for k, v in good["data"].items() if k != "tiles"}
    assert not JOB_EVENT.is_valid(good | {"data": without_tiles})

    [accepted] = command_event(
        "accepted", fleet_id="f", exchange="e", worker="w", now=NOW,
        job_id="j", action="submit", echo=Echo(),
    )  # fmt: skip
    rejected_without_code = event_of(accepted) | {"type": "batchworker.command.rejected"}
    assert COMMAND_EVENT.is_valid(event_of(accepted))
    assert not COMMAND_EVENT.is_valid(rejected_without_code)


# --- the AsyncAPI document ---------------------------------------------------------------------

ASYNCAPI_PATH = CONTRACT.parent / "asyncapi.yaml"


def asyncapi() -> dict[str, Any]:
    document = yaml.safe_load(ASYNCAPI_PATH.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in refs(item)]
    return []


def resolve(document: dict[str, Any], pointer: str) -> Any:
    node: Any = document
    for part in pointer.removeprefix("#/").split("/"):
        node = node[part]
    return node


def test_asyncapi_names_every_routing_key_the_worker_publishes() -> None:
    addresses: set[str] = set()
    for channel in asyncapi()["channels"].values():
        address = channel["address"]
        params = re.findall(r"\{(\w+)\}", address)
        if len(params) == 1 and "enum" in channel["parameters"][params[0]]:
            for value in channel["parameters"][params[0]]["enum"]:
                addresses.add(address.replace("{" + params[0] + "}", value))
        else:
            addresses.add(address)
    assert set(ROUTING_KEYS) <= addresses
    assert {"batch.jobs", "batch.jobs.dlq", "batch.events.unrouted", "{replyTo}"} <= addresses


def test_asyncapi_names_every_event_type_as_a_message() -> None:
    messages = asyncapi()["components"]["messages"].values()
    types = {m["bindings"]["amqp"]["messageType"] for m in messages if "bindings" in m}
    assert types >= set(EVENT_TYPES)
    assert {message["name"] for message in messages} >= set(EVENT_TYPES)


def test_asyncapi_references_resolve_and_payloads_are_the_schema_files() -> None:
    document = asyncapi()
    files = set()
    for ref in refs(document):
        if ref.startswith("#/"):
            resolve(document, ref)
        else:
            path = (ASYNCAPI_PATH.parent / ref).resolve()
            assert path.is_file(), ref
            files.add(path.name)
    assert files == set(schema_documents())


def test_asyncapi_bindings_match_the_declared_topology() -> None:
    topo = topology(Settings())
    channels = asyncapi()["channels"]
    declared = {queue.name: queue.arguments for queue in topo.queues}
    for channel in ("jobs", "deadLetters", "unroutedEvents"):
        queue = channels[channel]["bindings"]["amqp"]["queue"]
        assert queue["x-arguments"] == declared[queue["name"]], channel
    events = asyncapi()["components"]["channelBindings"]["eventsExchange"]["amqp"]["exchange"]
    exchange = next(e for e in topo.exchanges if e.name == events["name"])
    assert (events["type"], events["x-arguments"]) == (exchange.type, exchange.arguments)


def test_asyncapi_message_examples_are_valid_payloads() -> None:
    # The AsyncAPI parser checks examples against payloads for 2.x documents only.
    checked = 0
    for message in asyncapi()["components"]["messages"].values():
        ref = message["payload"].get("$ref")
        for example in message.get("examples", []):
            assert ref is not None, message["name"]
            validator(Path(ref).name).validate(example["payload"])
            checked += 1
    assert checked >= 2
