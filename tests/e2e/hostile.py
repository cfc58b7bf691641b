"""Hostile job-request messages: hypothesis strategies over bodies, AMQP properties and
headers, and a check of what a running worker made of each (shared by the CI suite,
tests/e2e/test_hostile.py, and the longer campaign, bench/bench_hostile.py).

Every message carries a fresh ``message_id``: the worker echoes it as ``causationid`` on
the event that answers it, and keeps it on the dead-lettered copy, so each outcome is found
whatever else the message held.

Left out for now, each the subject of a fix under way elsewhere (issue 16): NUL and other
control characters in properties and headers, ``user_id``, ``reply_to``, ``CC``/``BCC``
and ``expiration``, and nesting past what the documented limits will take. They are
``HELD_BACK`` below, named, to be turned on as the fixes land.
"""

from __future__ import annotations

import json
import string
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pika
from hypothesis import strategies as st

HELD_BACK = ("control characters in properties/headers", "user_id", "reply_to", "CC/BCC",
             "expiration", "nesting past the limits")  # fmt: skip

# Text producers write, and text they should not: scripts, emoji, the odd escape, but no
# NUL in a header or property (HELD_BACK); the body may hold anything JSON can.
_prop_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=0, max_size=40)
_body_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_job_ids = st.one_of(
    st.text(string.ascii_letters + string.digits + "._:-", min_size=1, max_size=128),
    _body_text,
    st.integers(),
    st.none(),
)
_json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _body_text
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_body_text, inner, max_size=4),
    max_leaves=25,
)
_deadlines = st.one_of(
    st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ).map(lambda d: d.isoformat()),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)).map(
        lambda d: d.isoformat()  # naive: no zone, refused
    ),
    st.timedeltas(min_value=timedelta(hours=-13), max_value=timedelta(hours=13)).map(
        lambda offset: (datetime(2030, 1, 1, tzinfo=UTC) + offset).isoformat()
    ),
    _body_text,
    st.integers(),
)
_fields: dict[str, st.SearchStrategy[Any]] = {
    "schema_version": st.one_of(st.integers(-2, 3), _body_text),
    "action": st.one_of(st.sampled_from(["submit", "start", "cancel"]), _body_text),
    "request": st.one_of(st.dictionaries(_body_text, _json, max_size=5), _json),
    "batch_request_id": st.one_of(st.uuids().map(str), _body_text, st.integers()),
    "auto_start": st.one_of(st.booleans(), _json_leaf),
    "deadline": _deadlines,
    "max_cost_pu": st.one_of(st.floats(allow_nan=False), st.integers(), _body_text),
    "tenant": st.one_of(st.sampled_from(["team-a", "team-b"]), _body_text),
    "extra": _json,
}


@st.composite
def request_objects(draw: st.DrawFn) -> dict[str, Any]:
    """A job request, most fields present, any of them wrong."""
    body: dict[str, Any] = {"job_id": draw(_job_ids)}
    for name, values in _fields.items():
        if draw(st.booleans()):
            body[name] = draw(values)
    return body


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A request a producer meant well: valid but for at most one field, extras added."""
    body: dict[str, Any] = {
        "job_id": draw(st.text(string.ascii_letters + string.digits + "._:-", min_size=1,
                               max_size=40)),
        "tenant": draw(st.sampled_from(["team-a", "team-b"])),
        "request": {"description": draw(_body_text), "extra": draw(_json)},
    }  # fmt: skip
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(_fields)))
        body[name] = draw(_fields[name])
    return body


def _mutated(data: bytes, cut: int, flip: int) -> bytes:
    if not data:
        return data
    cut %= len(data) + 1
    flipped = bytearray(data[:cut] or data)
    flipped[flip % len(flipped)] ^= 0x20
    return bytes(flipped)


bodies = st.one_of(
    near_valid().map(lambda body: json.dumps(body).encode()),
    near_valid().map(lambda body: json.dumps(body).encode()),
    request_objects().map(lambda body: json.dumps(body).encode()),
    request_objects().map(lambda body: json.dumps(body, ensure_ascii=False).encode()),
    st.builds(
        _mutated,
        request_objects().map(lambda body: json.dumps(body).encode()),
        st.integers(0, 10_000),
        st.integers(0, 10_000),
    ),
    st.binary(max_size=200),
    _json.map(lambda value: json.dumps(value).encode()),
)
_header_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), _prop_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_prop_text, inner, max_size=3),
    max_leaves=8,
)
headers = st.one_of(
    st.none(),
    st.dictionaries(
        _prop_text.filter(lambda k: k.upper() not in ("CC", "BCC")), _header_values, max_size=4
    ),
)
content_types = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "text/plain",
            "application/json; charset=latin-1",
            "APPLICATION/JSON",
            "",
        ]
    ),
    _prop_text,
)


@dataclass(frozen=True)
class Hostile:
    """One message to publish, and the id that finds its outcome."""

    body: bytes
    content_type: str | None
    headers: dict[str, Any] | None
    correlation_id: str | None
    priority: int | None
    app_id: str | None = None
    type: str | None = None
    timestamp: int | None = None
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def properties(self) -> pika.BasicProperties:
        return pika.BasicProperties(
            content_type=self.content_type,
            delivery_mode=2,
            message_id=self.message_id,
            correlation_id=self.correlation_id,
            headers=self.headers,
            priority=self.priority,
            app_id=self.app_id,
            type=self.type,
            timestamp=self.timestamp,
        )


messages = st.builds(
    Hostile,
    body=bodies,
    content_type=content_types,
    headers=headers,
    correlation_id=st.one_of(st.none(), _prop_text),
    priority=st.one_of(st.none(), st.integers(0, 9)),
    app_id=st.one_of(st.none(), _prop_text),
    type=st.one_of(st.none(), _prop_text),
    timestamp=st.one_of(st.none(), st.integers(0, 2**63 - 1)),
)


@dataclass
class Outcomes:
    """What became of each message: accepted, rejected (with its code), or nothing yet."""

    accepted: set[str] = field(default_factory=set)
    rejected: dict[str, str] = field(default_factory=dict)  # message id -> code
    dead: dict[str, bytes] = field(default_factory=dict)  # message id -> body
    dead_reason: dict[str, str | None] = field(default_factory=dict)

    def take_event(self, event: dict[str, Any]) -> None:
        cause = event.get("causationid")
        if cause is None:
            return
        if event["type"] == "batchworker.command.accepted":
            self.accepted.add(cause)
        elif event["type"] == "batchworker.command.rejected":
            self.rejected[cause] = event["data"]["code"]

    def take_dead_letter(self, properties: Any, body: bytes) -> None:
        if properties.message_id is not None:
            self.dead[properties.message_id] = body
            self.dead_reason[properties.message_id] = (properties.headers or {}).get(
                "x-batch-worker-reason"
            )

    def settled(self, sent: list[Hostile]) -> bool:
        return all(
            m.message_id in self.accepted
            or (m.message_id in self.rejected and m.message_id in self.dead)
            for m in sent
        )

    def problems(self, sent: list[Hostile]) -> list[str]:
        """Every message whose outcome breaks the contract, with what it was."""
        found = []
        for m in sent:
            mid = m.message_id
            what = f"{m.body[:120]!r} content_type={m.content_type!r} headers={m.headers!r}"
            if mid in self.accepted and mid in self.rejected:
                found.append(f"both accepted and rejected: {what}")
            elif mid in self.rejected:
                code = self.rejected[mid]
                if code == "INTERNAL_ERROR":
                    found.append(f"INTERNAL_ERROR: {what}")
                if self.dead.get(mid) != m.body:
                    found.append(f"rejected ({code}) without its byte-for-byte dead letter: {what}")
                elif self.dead_reason.get(mid) != code:
                    found.append(f"dead letter's reason {self.dead_reason.get(mid)!r}: {what}")
            elif mid not in self.accepted:
                found.append(f"no outcome: {what}")
        return found
