"""Follow batch-worker's events, de-duplicated, one line per new event.

    python examples/consumer.py --url amqp://guest:guest@localhost:5672/%2F --binding-key 'job.*'

Plain pika, nothing from the worker's own code. It binds a queue of its own to the events
exchange (a private one that goes away with it, or ``--queue NAME`` for a durable one that
keeps events while it is down) and follows the rules of docs/events.md: delivery is
at-least-once, so drop an ``id`` already seen, and a job event whose ``sequence`` is at or
below the last one seen for that job.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
from pika.exceptions import AMQPError, ChannelClosedByBroker


def connection_parameters(url: str) -> pika.URLParameters:
    """pika takes the vhost from the URL path: kombu's ``//`` (vhost ``/``) is ``/%2F`` here."""
    parts = urlsplit(url)
    if parts.path == "//":
        url = urlunsplit(parts._replace(path="/%2F"))
    return pika.URLParameters(url)


class Deduplicator:
    """Remembers the last ``max_ids`` event ids and the last sequence of every job."""

    def __init__(self, max_ids: int = 100_000) -> None:
        self.max_ids = max_ids
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._sequences: dict[tuple[str, str], int] = {}

    def is_new(self, event: dict[str, Any]) -> bool:
        event_id = event.get("id")
        if not isinstance(event_id, str) or event_id in self._ids:
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)
        data = event.get("data")
        if not str(event.get("type", "")).startswith("batchworker.job.") or not isinstance(
            data, dict
        ):
            return True  # command events carry no sequence
        # Job ids are unique within a fleet; the source names the fleet.
        job = (str(event.get("source")), str(data.get("job_id")))
        sequence = data.get("sequence")
        if not isinstance(sequence, int):
            return True
        if sequence <= self._sequences.get(job, 0):
            return False
        self._sequences[job] = sequence
        return True


def describe(event: dict[str, Any]) -> str:
    data = event.get("data") or {}
    line = f"{event.get('time')}  {event.get('type')}  {event.get('subject', '-')}"
    if "status" in data:
        line += f"  {data['status']}  seq={data.get('sequence')}"
        line += f"  {data.get('completion_percentage', 0):.1f}%"
        tiles = data.get("tiles")
        if tiles:
            line += f"  tiles={tiles.get('processed')}/{tiles.get('total')}"
        if data.get("stopped_reason"):
            line += f"  reason={data['stopped_reason']}"
        if data.get("error"):
            line += f"  error={data['error'].get('code')}"
    elif "code" in data:
        line += f"  {data['code']}: {data.get('message')}"
    return line + f"  id={event.get('id')}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@localhost:5672/%2F")
    parser.add_argument("--exchange", default="batch.events", help="the worker's events exchange")
    parser.add_argument(
        "--binding-key",
        action="append",
        help="routing keys to follow (repeatable; default '#': everything)",
    )
    parser.add_argument("--queue", help="a durable queue of this name instead of a private one")
    parser.add_argument("--max-events", type=int, help="exit after printing this many")
    parser.add_argument(
        "--idle-timeout", type=float, help="exit when nothing arrives for this many seconds"
    )
    return parser.parse_args(argv)


def follow(args: argparse.Namespace) -> int:
    connection = pika.BlockingConnection(connection_parameters(args.url))
    try:
        channel = connection.channel()
        try:
            # Passive: the worker owns the exchange and its arguments.
            channel.exchange_declare(args.exchange, passive=True)
        except ChannelClosedByBroker:
            print(f"no exchange {args.exchange!r}: has the worker started?", file=sys.stderr)
            return 1
        if args.queue:
            queue = channel.queue_declare(args.queue, durable=True).method.queue
        else:
            queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for key in args.binding_key or ["#"]:
            channel.queue_bind(queue, args.exchange, routing_key=key)
        channel.basic_qos(prefetch_count=100)
        print(f"following {args.exchange} on queue {queue}", file=sys.stderr, flush=True)

        seen = Deduplicator()
        printed = 0
        for method, _properties, body in channel.consume(
            queue, inactivity_timeout=args.idle_timeout
        ):
            if method is None:  # idle for --idle-timeout seconds
                break
            try:
                event = json.loads(body)
            except ValueError:
                event = None
            if isinstance(event, dict) and seen.is_new(event):
                print(describe(event), flush=True)
                printed += 1
            channel.basic_ack(method.delivery_tag)
            if args.max_events is not None and printed >= args.max_events:
                break
        channel.cancel()
        return 0
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return follow(args)
    except AMQPError as exc:
        print(f"broker error: {type(exc).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
