"""The seam between the jobs consumer and intake: what one hands the other, and back.

The consumer (worker/daemon/consumer.py) turns deliveries into ``InboundMessage``s and hands
them, a batch at a time, to a ``BatchIntake`` (worker/daemon/intake.py is the one the daemon
runs): ``read`` first, then ``take_in_steps``, whose steps the consumer turns between its own
work. Neither side imports the other.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar


class IntakeUnavailable(Exception):
    """Raised by intake when its store is unreachable: the batch is fine, try later."""


@dataclass(frozen=True)
class InboundMessage:
    """One delivery, with everything needed to dead-letter it byte for byte.

    ``properties`` are the AMQP basic properties without the headers table
    (``timestamp`` as int seconds); ``headers`` is that table.
    """

    body: bytes
    content_type: str | None
    properties: dict[str, Any]
    headers: dict[str, Any]
    delivery_tag: int
    redelivered: bool

    @property
    def message_id(self) -> str | None:
        return self.properties.get("message_id")

    @property
    def correlation_id(self) -> str | None:
        return self.properties.get("correlation_id")

    @property
    def reply_to(self) -> str | None:
        return self.properties.get("reply_to")

    @classmethod
    def from_delivery(cls, message: Any) -> InboundMessage:
        """From a kombu message, undecoded (the body stays the bytes that were sent)."""
        properties = {
            key: value
            for key, value in message.properties.items()
            if key != "application_headers" and value is not None
        }
        body = message.body
        return cls(
            body=body.encode("utf-8") if isinstance(body, str) else bytes(body),
            content_type=message.content_type or None,
            properties=properties,
            headers=dict(message.headers or {}),
            delivery_tag=int(message.delivery_tag),
            redelivered=bool(message.delivery_info.get("redelivered", False)),
        )


# A batch's transaction in steps: between two ``next()``s the database works and the caller
# may too; it ends returning the messages intake deferred (new jobs past MAX_IN_FLIGHT).
TakeSteps = Generator[None, None, list[InboundMessage]]

ReadT = TypeVar("ReadT")


class BatchIntake(Protocol[ReadT]):
    """Intake in two halves. ``read`` is pure work and never raises on input.
    ``take_in_steps`` is the transaction in steps (``TakeSteps``); it ends returning the
    messages it deferred (held by the consumer and offered again later), or raises
    (``IntakeUnavailable``: hold them all; anything else: the batch failed)."""

    def read(self, batch: list[InboundMessage]) -> ReadT: ...

    def take_in_steps(self, batch: ReadT) -> TakeSteps: ...
