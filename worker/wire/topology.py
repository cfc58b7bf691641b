"""The worker's RabbitMQ topology: one description, declared at start and rendered as a
RabbitMQ definitions file for operators who preload it (docs/topology.md).

Both uses read the same :class:`Topology`, so the declared arguments and the shipped
definitions cannot drift apart; RabbitMQ refuses a re-declare whose arguments differ
(PRECONDITION_FAILED), so "the same" has to be exact, down to the value types.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_EXCHANGE = ""


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueSpec:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BindingSpec:
    exchange: str
    queue: str
    routing_key: str = ""


@dataclass(frozen=True)
class Topology:
    """Everything the worker declares; all of it durable, nothing auto-deleted.

    Listed in declaration order: a target before whatever points at it (a dead-letter or
    alternate exchange that does not exist yet would drop messages silently).
    """

    exchanges: tuple[ExchangeSpec, ...]
    queues: tuple[QueueSpec, ...]
    bindings: tuple[BindingSpec, ...]


def unrouted_name(settings: Settings) -> str:
    """The alternate exchange of the events exchange, and the retention queue behind it."""
    return settings.events_exchange + ".unrouted"


def topology(settings: Settings) -> Topology:
    unrouted = unrouted_name(settings)
    return Topology(
        exchanges=(
            ExchangeSpec(unrouted, "fanout"),
            ExchangeSpec(settings.events_exchange, "topic", {"alternate-exchange": unrouted}),
        ),
        queues=(
            QueueSpec(settings.dlq, {"x-queue-type": "quorum"}),
            QueueSpec(
                settings.jobs_queue,
                {
                    "x-queue-type": "quorum",
                    # 3.10 quorum queues have no default limit: a poison message would
                    # loop forever. Past the limit it is dead-lettered to the DLQ.
                    "x-delivery-limit": settings.jobs_delivery_limit,
                    "x-dead-letter-exchange": DEFAULT_EXCHANGE,
                    "x-dead-letter-routing-key": settings.dlq,
                    # Default dead-lettering is at-most-once: a message dropped on the way
                    # to the DLQ is gone. at-least-once keeps it in batch.jobs until the
                    # DLQ confirms it; RabbitMQ requires reject-publish overflow for it.
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            ),
            QueueSpec(
                unrouted,
                {
                    "x-queue-type": "quorum",
                    "x-max-length": settings.unrouted_max_length,
                    # Retention for late readers: the oldest events make room for new ones.
                    "x-overflow": "drop-head",
                },
            ),
        ),
        bindings=(BindingSpec(unrouted, unrouted),),
    )


def declare_on_channel(channel: Any, topo: Topology) -> None:
    """Declare every exchange, queue and binding on a py-amqp (or kombu) channel;
    idempotent while the arguments match."""
    for exchange in topo.exchanges:
        channel.exchange_declare(
            exchange.name,
            exchange.type,
            durable=True,
            auto_delete=False,
            arguments=dict(exchange.arguments),
        )
    for queue in topo.queues:
        channel.queue_declare(
            queue.name,
            durable=True,
            exclusive=False,
            auto_delete=False,
            arguments=dict(queue.arguments),
        )
    for binding in topo.bindings:
        channel.queue_bind(binding.queue, binding.exchange, binding.routing_key)


def definitions(topo: Topology, *, vhost: str = "/") -> dict[str, Any]:
    """The topology in RabbitMQ's definitions format (``rabbitmqctl import_definitions``,
    or ``load_definitions`` in rabbitmq.conf)."""
    return {
        "exchanges": [
            {
                "name": exchange.name,
                "vhost": vhost,
                "type": exchange.type,
                "durable": True,
                "auto_delete": False,
                "internal": False,
                "arguments": exchange.arguments,
            }
            for exchange in topo.exchanges
        ],
        "queues": [
            {
                "name": queue.name,
                "vhost": vhost,
                "durable": True,
                "auto_delete": False,
                "arguments": queue.arguments,
            }
            for queue in topo.queues
        ],
        "bindings": [
            {
                "source": binding.exchange,
                "vhost": vhost,
                "destination": binding.queue,
                "destination_type": "queue",
                "routing_key": binding.routing_key,
                "arguments": {},
            }
            for binding in topo.bindings
        ],
    }


def render_definitions(settings: Settings, *, vhost: str = "/") -> str:
    return json.dumps(definitions(topology(settings), vhost=vhost), indent=2) + "\n"


def write_definitions(settings: Settings, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_definitions(settings), encoding="utf-8")
    log.info("wrote RabbitMQ definitions", extra={"path": str(path)})
    return path
