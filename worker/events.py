"""CloudEvents 1.0 (structured JSON) for everything the worker publishes, and the
messages the relay sends: events, copies to ``reply_to``, dead letters.

SKELETON: the types and signatures below are the agreed interface; bodies are filled in
by the broker/events work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
