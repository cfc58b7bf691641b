"""Publish one job request to batch-worker, the way any producer should.

    python examples/producer.py JOB.json --url amqp://guest:guest@localhost:5672/%2F

Plain pika, nothing from the worker's own code: persistent, publisher confirms, and
``mandatory`` (so a missing queue is an error here rather than a silent drop). The file is
sent byte for byte. Exit codes: 0 confirmed, 1 refused (unroutable or nacked), 2 usage.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pika
from pika.exceptions import AMQPError, NackError, UnroutableError


def connection_parameters(url: str) -> pika.URLParameters:
    """pika takes the vhost from the URL path: kombu's ``//`` (vhost ``/``) is ``/%2F`` here."""
    parts = urlsplit(url)
    if parts.path == "//":
        url = urlunsplit(parts._replace(path="/%2F"))
    return pika.URLParameters(url)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("job", type=Path, help="the job request (JSON file)")
    parser.add_argument(
        "--url", default="amqp://guest:guest@localhost:5672/%2F", help="broker URL (amqps: TLS)"
    )
    parser.add_argument("--queue", default="batch.jobs", help="the worker's jobs queue")
    parser.add_argument(
        "--message-id",
        help="echoed on the events that answer (default: a fresh UUID); reuse it when you "
        "re-send the same request so the answer keeps its id",
    )
    parser.add_argument("--correlation-id", help="echoed as correlation_id on every event")
    parser.add_argument("--reply-to", help="a queue that gets a copy of every event of the job")
    return parser.parse_args(argv)


def publish(args: argparse.Namespace) -> str:
    """Publish and wait for the broker's confirm; return the message id."""
    body = args.job.read_bytes()
    message_id = args.message_id or str(uuid.uuid4())
    properties = pika.BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=message_id,
        correlation_id=args.correlation_id,
        reply_to=args.reply_to,
    )
    connection = pika.BlockingConnection(connection_parameters(args.url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        # Default exchange: the routing key is the queue name.
        channel.basic_publish("", args.queue, body, properties, mandatory=True)
    finally:
        connection.close()
    return message_id


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        message_id = publish(args)
    except OSError as exc:
        print(f"cannot read {args.job}: {exc.strerror}", file=sys.stderr)
        return 2
    except UnroutableError:
        print(f"no queue {args.queue!r}: is the worker's topology declared?", file=sys.stderr)
        return 1
    except NackError:
        print("the broker refused the message", file=sys.stderr)
        return 1
    except AMQPError as exc:
        print(f"broker error: {type(exc).__name__}", file=sys.stderr)
        return 1
    print(f"published {args.job} as message {message_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
