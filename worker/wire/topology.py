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

import amqp.exceptions

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


# The major version of RabbitMQ that the shipped definitions file is for (3.x: 3.10-3.13).
DEFAULT_RABBITMQ_MAJOR = 3

# x-delivery-limit -1 is "no limit" from RabbitMQ 4.0 on only. 3.x quorum queues have no
# limit unless one is set, and read -1 as a limit below every count: a 3.10 queue declared
# with it drops each message at its first return (measured). Hence one per major version.
UNLIMITED_DELIVERIES = -1


def rabbitmq_major(server_properties: dict[str, Any] | None) -> int:
    """The broker's major version from the ``version`` the broker announces on connecting
    (``"4.0.5"``); the shipped definitions' version when it says none that reads."""
    version = (server_properties or {}).get("version")
    if isinstance(version, bytes):
        version = version.decode("ascii", "replace")
    head = str(version or "").split(".", 1)[0]
    return int(head) if head.isdigit() else DEFAULT_RABBITMQ_MAJOR


def dlq_arguments(rabbitmq: int) -> dict[str, Any]:
    """The DLQ's arguments on RabbitMQ ``rabbitmq`` (a major version).

    Looking at the DLQ (``dlq list``, ``show``) fetches its messages and returns them, and
    every return counts as a delivery. RabbitMQ 4 gives every quorum queue a delivery limit
    of 20 unless it has one of its own, and a message past it is dropped (the DLQ has no
    dead-letter exchange): the twenty-first look would lose every dead letter. So from 4.0
    on the DLQ is declared with no limit, explicitly.
    """
    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if rabbitmq >= 4:
        arguments["x-delivery-limit"] = UNLIMITED_DELIVERIES
    return arguments


def topology(settings: Settings, *, rabbitmq: int = DEFAULT_RABBITMQ_MAJOR) -> Topology:
    """Everything the worker declares on a broker of major version ``rabbitmq``."""
    unrouted = unrouted_name(settings)
    return Topology(
        exchanges=(
            ExchangeSpec(unrouted, "fanout"),
            ExchangeSpec(settings.events_exchange, "topic", {"alternate-exchange": unrouted}),
        ),
        queues=(
            QueueSpec(settings.dlq, dlq_arguments(rabbitmq)),
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
        try:
            _declare_queue(channel, queue.name, queue.arguments)
        except amqp.exceptions.PreconditionFailed as exc:
            if not _declared_without_limit(queue, exc):
                raise
            # py-amqp reopened the channel that the refusal closed.
            _declare_queue(channel, queue.name, _without_limit(queue.arguments))
            log.warning(
                "the DLQ %s was declared without x-delivery-limit (by an earlier version, "
                "or from an older definitions file): RabbitMQ 4 gives it a delivery limit of "
                "20 that each `dlq list` and `dlq show` spends, and drops a dead letter past "
                "it. Set a policy with delivery-limit -1 on it (docs/operations.md)",
                queue.name,
                extra={"queue": queue.name},
            )
    for binding in topo.bindings:
        channel.queue_bind(binding.queue, binding.exchange, binding.routing_key)


def _declare_queue(channel: Any, name: str, arguments: dict[str, Any]) -> None:
    channel.queue_declare(
        name, durable=True, exclusive=False, auto_delete=False, arguments=dict(arguments)
    )


def _without_limit(arguments: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in arguments.items() if k != "x-delivery-limit"}


def _declared_without_limit(queue: QueueSpec, exc: amqp.exceptions.PreconditionFailed) -> bool:
    """The refusal of a DLQ that exists without the explicit unlimited delivery limit.

    RabbitMQ compares x-delivery-limit on a redeclare and cannot change it on a queue that
    exists (a policy can): such a DLQ is kept as it is, with a warning, rather than the
    worker refusing to start on it.
    """
    if queue.arguments.get("x-delivery-limit") != UNLIMITED_DELIVERIES:
        return False
    text = str(getattr(exc, "reply_text", "") or exc)
    return "'x-delivery-limit'" in text and "current is none" in text


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


def render_definitions(
    settings: Settings, *, vhost: str = "/", rabbitmq: int = DEFAULT_RABBITMQ_MAJOR
) -> str:
    topo = topology(settings, rabbitmq=rabbitmq)
    return json.dumps(definitions(topo, vhost=vhost), indent=2) + "\n"


def write_definitions(
    settings: Settings, path: Path, *, rabbitmq: int = DEFAULT_RABBITMQ_MAJOR
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_definitions(settings, rabbitmq=rabbitmq), encoding="utf-8")
    log.info("wrote RabbitMQ definitions", extra={"path": str(path)})
    return path
