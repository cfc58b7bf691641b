"""The publishes of one relay round and the broker's confirms of them, and how an outbox
row becomes an AMQP message (worker.daemon.relay)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import amqp

from worker.wire.outgoing import OutboxMessage


@dataclass
class Flight:
    """Publishes of one round, keyed by the channel's confirm sequence number."""

    rows: dict[int, tuple[int, OutboxMessage]] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    nacked: set[int] = field(default_factory=set)
    returned: set[int] = field(default_factory=set)
    deleted: set[int] = field(default_factory=set)

    # Published and not yet acked or nacked, in publish order (dicts keep it): a multiple
    # ack settles a prefix without a scan of the whole round.
    unsettled: dict[int, None] = field(default_factory=dict)

    def add(self, seq: int, row: tuple[int, OutboxMessage]) -> None:
        self.rows[seq] = row
        self.unsettled[seq] = None

    def settle(self, tag: int, multiple: bool, into: set[int]) -> None:
        if multiple:
            done = []
            for seq in self.unsettled:
                if seq > tag:
                    break
                done.append(seq)
        else:
            done = [tag] if tag in self.unsettled else []
        for seq in done:
            del self.unsettled[seq]
        into.update(done)

    @property
    def settled(self) -> int:
        return len(self.rows) - len(self.unsettled)

    @property
    def outstanding(self) -> int:
        return len(self.unsettled)

    @property
    def in_window(self) -> int:
        """Published and not deleted: what a kill now would republish (nacked rows aside)."""
        return len(self.rows) - len(self.deleted) - len(self.nacked)

    @property
    def acked_in_window(self) -> int:
        return len(self.acked) - len(self.deleted)


def amqp_message(message: OutboxMessage) -> amqp.Message:
    """The py-amqp message for an outbox row (the timestamp property is int seconds)."""
    properties = dict(message.properties)
    timestamp = properties.get("timestamp")
    if isinstance(timestamp, datetime):
        properties["timestamp"] = int(timestamp.timestamp())
    if message.headers:
        properties["application_headers"] = message.headers
    return amqp.Message(message.body, **properties)
