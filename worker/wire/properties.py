"""A job-request message's AMQP properties and headers, read as hostile input.

What a producer sets on its message is never sent on where the broker acts on it: the
dead-letter copy drops ``user_id`` (the broker checks it against the worker's login and
closes the channel), ``expiration`` (the copy would vanish from the DLQ) and the ``CC`` /
``BCC`` headers (sender-selected distribution: the broker would deliver the producer's
bytes, with the worker's rights, to any queue named there); each original is kept in an
``x-batch-worker-original-*`` header. A ``reply_to`` that claims to be a direct reply-to
name must have its shape (the broker drops the connection on one that does not decode). A
NUL character in a text property or header cannot be stored (PostgreSQL) and is refused:
the message gets a ``command.rejected`` like any bad message, and its dead-letter copy keeps
such values as bytes, the same bytes on the wire.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

ORIGINAL_PREFIX = "x-batch-worker-original-"
# Properties the broker acts on, dropped from dead-letter copies (original kept in a header).
STRIPPED_PROPERTIES = ("user_id", "expiration")
# Headers of sender-selected distribution (RabbitMQ routes copies to the queues they name).
STRIPPED_HEADERS = ("CC", "BCC")

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
# What RabbitMQ hands a consumer of direct reply-to: the name, a base64 Erlang term for the
# channel, a base64 16-byte key (amq.rabbitmq.reply-to.g1h2AA1yZXBs....TR8SZjW9T8mJ12n0SclmgA==).
_DIRECT_REPLY_TO_NAME = re.compile(
    r"amq\.rabbitmq\.reply-to\.([A-Za-z0-9+/]{4,}={0,2})\.([A-Za-z0-9+/]{22}==)"
)


def reply_to_problem(reply_to: str | None) -> str | None:
    """Why ``reply_to`` cannot be answered to, or None. Only the shape of a direct reply-to
    name can be checked here; one that has it and names no channel draws a refusal the relay
    counts and parks (docs/operations.md "Parked outbox rows")."""
    if reply_to is None or not reply_to.startswith(DIRECT_REPLY_TO + "."):
        return None
    found = _DIRECT_REPLY_TO_NAME.fullmatch(reply_to)
    if found is None:
        return "property 'reply_to': not a direct reply-to name the broker gave"
    try:
        term = base64.b64decode(found.group(1), validate=True)
        key = base64.b64decode(found.group(2), validate=True)
    except (binascii.Error, ValueError):
        return "property 'reply_to': not a direct reply-to name the broker gave"
    if not term.startswith(b"\x83") or len(key) != 16:  # 131: Erlang's external term format
        return "property 'reply_to': not a direct reply-to name the broker gave"
    return None


def unusable(properties: Mapping[str, Any], headers: Mapping[str, Any]) -> str | None:
    """The first property or header holding text that cannot be stored (a NUL), named."""
    for kind, table in (("property", properties), ("header", headers)):
        for name, value in table.items():
            if _has_nul(name) or _has_nul(value):
                return f"{kind} '{_printable(name)}': holds a NUL character, which cannot be stored"
    return None


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_has_nul(v) for v in value)
    return False


def _printable(name: str) -> str:
    return name.replace("\x00", "\\u0000")[:64]


def dead_letter_tables(
    properties: Mapping[str, Any], headers: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The properties and headers of a dead-letter copy: what the broker would act on moved
    into ``x-batch-worker-original-*`` headers, text with a NUL kept as its bytes."""
    kept = {name: _storable(value) for name, value in properties.items()}
    merged = {_key(name): _storable(value) for name, value in headers.items()}
    for name in STRIPPED_PROPERTIES:
        if kept.get(name) is not None:
            merged[ORIGINAL_PREFIX + name.replace("_", "-")] = kept.pop(name)
        kept.pop(name, None)
    for name in STRIPPED_HEADERS:
        if name in merged:
            merged[ORIGINAL_PREFIX + name] = merged.pop(name)
    return kept, merged


def _key(name: str) -> str:
    # A table key is stored as JSON text: a NUL in one is written as its escape.
    return name.replace("\x00", "\\u0000")


def _storable(value: Any) -> Any:
    if isinstance(value, str) and "\x00" in value:
        return value.encode("utf-8", "surrogateescape")  # the same bytes on the wire
    if isinstance(value, Mapping):
        return {_key(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_storable(v) for v in value]
    return value
