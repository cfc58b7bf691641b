"""Hostile job-request messages: hypothesis strategies over bodies, AMQP properties and
headers, and a check of what a running worker made of each (shared by the CI suite,
tests/e2e/test_hostile.py, and the longer campaign, bench/bench_hostile.py).

Every message carries a fresh ``message_id``: the worker echoes it as ``causationid`` on
the event that answers it, and keeps it on the dead-lettered copy, so each outcome is found
whatever else the message held.

Properties and headers hold control characters, NUL included (``INVALID_PROPERTY``);
messages carry ``user_id`` (the publishing connection's own user, the only one the broker
lets through), ``reply_to`` (queue names, malformed and well-shaped direct reply-to names),
``CC``/``BCC`` (queue names, as the broker takes them) and ``expiration``; bodies nest past
the documented depth and pass the size limit. What the broker itself refuses to take from
a producer (a ``user_id`` not its own, a ``CC`` that is not an array, an ``expiration``
that is not a number) is left out: such a message never reaches the worker.
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

# Text producers write, and text they should not: scripts, emoji, control characters and
# NUL, in properties and headers as in the body.
_prop_text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=40)
_queue_names = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=30)
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


def _nested(depth: int, kind: str) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if kind == "list" else {"n": value}
    return value


# Past the documented limits (docs/contract.md): nesting around 32 levels, bodies around
# 256 KiB (REQUEST_TOO_DEEP, REQUEST_TOO_LARGE), near-valid otherwise.
_deep = st.builds(
    lambda depth, kind, where: json.dumps(
        {"job_id": f"deep-{depth}", where: _nested(depth, kind)}
    ).encode(),
    st.integers(25, 400),
    st.sampled_from(["list", "dict"]),
    st.sampled_from(["request", "extra"]),
)
_large = st.integers(256 * 1024 - 300, 256 * 1024 + 300).map(
    lambda size: json.dumps(
        {"job_id": f"large-{size}", "request": {"description": "x" * (size - 60)}}
    ).encode()
)

bodies = st.one_of(
    _deep,
    _large,
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
    st.builds(
        lambda table, routes: {**table, **routes},
        st.dictionaries(
            _prop_text.filter(lambda k: k.upper() not in ("CC", "BCC")),
            _header_values,
            max_size=4,
        ),
        st.dictionaries(
            st.sampled_from(["CC", "BCC"]), st.lists(_queue_names, max_size=2), max_size=2
        ),
    ),
)
# A direct reply-to name a broker could have given (base64 Erlang term, 16-byte key), and
# ones it never would. (The bare "amq.rabbitmq.reply-to" the broker refuses from a
# publisher not consuming from it: such a message never arrives.)
_REPLY_TO_SHAPED = "amq.rabbitmq.reply-to.g2gCZAAsc2FzZEBsb2NhbGhvc3Q=.AAAAAAAAAAAAAAAAAAAAAA=="
reply_tos = st.one_of(
    st.none(),
    _queue_names,
    _prop_text.filter(lambda text: text != "amq.rabbitmq.reply-to"),
    st.just(_REPLY_TO_SHAPED),
    _prop_text.map(lambda tail: "amq.rabbitmq.reply-to." + tail),
)
expirations = st.one_of(st.none(), st.integers(600_000, 2**31 - 1).map(str))
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
    reply_to: str | None = None
    expiration: str | None = None
    own_user_id: bool = False  # user_id: the publishing connection's user
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def properties(self, user: str | None = None) -> pika.BasicProperties:
        return pika.BasicProperties(
            reply_to=self.reply_to,
            expiration=self.expiration,
            user_id=user if self.own_user_id else None,
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
    reply_to=reply_tos,
    expiration=expirations,
    own_user_id=st.booleans(),
)


# Refusals of the properties themselves: the event echoes none of them (they are the
# problem), message id included, so such a message is known by its dead letter's reason,
# and the events are counted.
PROPERTY_CODES = ("INVALID_PROPERTY", "INVALID_REPLY_TO")


@dataclass
class Outcomes:
    """What became of each message: accepted, rejected (with its code), or nothing yet."""

    accepted: set[str] = field(default_factory=set)
    rejected: dict[str, str] = field(default_factory=dict)  # message id -> code
    dead: dict[str, bytes] = field(default_factory=dict)  # message id -> body
    dead_reason: dict[str, str | None] = field(default_factory=dict)
    uncaused: dict[str, int] = field(default_factory=dict)  # property refusals' events

    def take_event(self, event: dict[str, Any]) -> None:
        cause = event.get("causationid")
        if cause is None:
            code = (event.get("data") or {}).get("code")
            if event["type"] == "batchworker.command.rejected" and code in PROPERTY_CODES:
                self.uncaused[code] = self.uncaused.get(code, 0) + 1
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

    def _property_refused(self, mid: str) -> bool:
        return mid not in self.rejected and self.dead_reason.get(mid) in PROPERTY_CODES

    def property_refusals(self) -> dict[str, int]:
        """Dead letters of property refusals, by code."""
        counts: dict[str, int] = {}
        for mid, code in self.dead_reason.items():
            if code is not None and self._property_refused(mid):
                counts[code] = counts.get(code, 0) + 1
        return counts

    def settled(self, sent: list[Hostile]) -> bool:
        refused = self.property_refusals()
        return all(
            m.message_id in self.accepted
            or (m.message_id in self.rejected and m.message_id in self.dead)
            or self._property_refused(m.message_id)
            for m in sent
        ) and all(self.uncaused.get(code, 0) >= count for code, count in refused.items())

    def problems(self, sent: list[Hostile]) -> list[str]:
        """Every message whose outcome breaks the contract, with what it was."""
        found = []
        for m in sent:
            mid = m.message_id
            what = (
                f"{m.body[:120]!r} content_type={m.content_type!r} headers={m.headers!r}"
                f" reply_to={m.reply_to!r} expiration={m.expiration!r} user_id={m.own_user_id}"
            )
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
            elif self._property_refused(mid):
                if self.dead.get(mid) != m.body:
                    found.append(f"refused without its byte-for-byte dead letter: {what}")
            elif mid not in self.accepted:
                dead = "dead-lettered" if mid in self.dead else "not dead-lettered"
                found.append(f"no outcome ({dead}): {what}")
        for code, count in self.property_refusals().items():
            if self.uncaused.get(code, 0) < count:
                found.append(f"{count} dead letters {code}, {self.uncaused.get(code, 0)} events")
        return found
