"""What the worker publishes, as it waits in the outbox: one AMQP message and its JSON form.

Every publish (events, copies to ``reply_to``, dead letters) is an ``OutboxMessage``. Its
AMQP tables (properties, headers) may hold bytes, datetimes, decimals and infinities, which
JSON has not: they are written as tagged JSON, the one form both the outbox table and a job
row's last status event keep.
"""

from __future__ import annotations

import base64
import json
import math
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import orjson


@dataclass(frozen=True)
class OutboxMessage:
    """One AMQP publish, stored in the outbox until the broker confirms it.

    ``properties`` are kombu/AMQP basic properties (``content_type``, ``message_id``,
    ``correlation_id``, ``type``, ``app_id``, ``timestamp`` as int seconds,
    ``delivery_mode``); ``headers`` are the AMQP headers table.
    """

    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, Any] = field(default_factory=dict)
    mandatory: bool = False


_TAG = "$amqp"


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no infinities (PostgreSQL refuses json.dumps' "Infinity"); AMQP has.
        return {_TAG: "float", "v": repr(value)}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return {_TAG: "bytes", "v": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, datetime):
        return {_TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, Decimal):
        return {_TAG: "decimal", "v": str(value)}
    if isinstance(value, dict):
        return {str(key): _encode(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    raise TypeError(f"not an AMQP field value: {type(value).__name__}")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    tag = value.get(_TAG)
    if tag == "bytes":
        return base64.b64decode(value["v"])
    if tag == "datetime":
        return datetime.fromisoformat(value["v"])
    if tag == "decimal":
        return Decimal(value["v"])
    if tag == "float":
        return float(value["v"])
    return {key: _decode(item) for key, item in value.items()}


def encode_table(table: dict[str, Any]) -> str:
    """An AMQP table (properties or headers) as JSON text."""
    if not table:
        return "{}"  # most events carry no headers
    if all(type(value) in _PLAIN for value in table.values()):
        # An event's properties, on intake's hot path: orjson is several times faster.
        with suppress(orjson.JSONEncodeError):  # an integer beyond 64 bits
            return orjson.dumps(table).decode()
    return json.dumps(_encode(table), separators=(",", ":"))


_PLAIN = frozenset({str, int, bool, type(None)})


def decode_table(data: Any) -> dict[str, Any]:
    """The inverse of :func:`encode_table`; takes JSON text or an already parsed value."""
    parsed = json.loads(data) if isinstance(data, str | bytes) else data
    decoded = _decode(parsed)
    if not isinstance(decoded, dict):
        raise TypeError("an AMQP table must be an object")
    return decoded


def message_to_json(message: OutboxMessage) -> dict[str, Any]:
    """The message as a JSON value (a job row keeps its last status event this way)."""
    return {
        "exchange": message.exchange,
        "routing_key": message.routing_key,
        "body": message.body.decode("utf-8"),
        # AMQP tables may hold bytes or datetimes: the outbox's tagged JSON keeps them.
        "properties": json.loads(encode_table(message.properties)),
        "headers": json.loads(encode_table(message.headers)),
        "mandatory": message.mandatory,
    }


def message_from_json(data: dict[str, Any]) -> OutboxMessage:
    return OutboxMessage(
        exchange=data["exchange"],
        routing_key=data["routing_key"],
        body=data["body"].encode("utf-8"),
        properties=decode_table(data.get("properties") or {}),
        headers=decode_table(data.get("headers") or {}),
        mandatory=bool(data.get("mandatory", False)),
    )
