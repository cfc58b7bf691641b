"""``batch-worker dlq list|show|replay|drop|purge``: the dead-letter queue, for people.

Every request the worker could not use sits in the DLQ whole (body, properties, headers)
with the reason in ``x-batch-worker-reason`` / ``x-batch-worker-detail``. Looking is
non-destructive: messages are fetched without ack and go back when the channel closes.
Replaying publishes the original message to the jobs queue with a confirm, and only then
removes it from the DLQ. A message is named by its message id, or by a digest of it when
it has none (``sha256:`` and 16 hex digits), as ``dlq list`` prints it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from amqp import Channel
from amqp.basic_message import Message

from worker.broker import connection
from worker.settings import Settings
from worker.wire.events import DETAIL_HEADER, REASON_HEADER, REJECTED_AT_HEADER

OUR_HEADERS = (REASON_HEADER, DETAIL_HEADER, REJECTED_AT_HEADER)
# Headers the broker adds on dead-lettering or redelivery; not part of the original.
BROKER_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)


DIGEST_PREFIX = "sha256:"


@dataclass(frozen=True)
class DeadLetter:
    message: Message

    @property
    def headers(self) -> dict[str, Any]:
        headers = self.message.properties.get("application_headers") or {}
        return dict(headers)

    @property
    def key(self) -> str:
        """What names this message in ``dlq show|replay|drop``: its message id, or, for a
        message without one, a digest of the message as it was dead-lettered.

        Never a position: a quorum queue puts a returned message back at its end (RabbitMQ
        4, or 3.x without a delivery limit), so every look reorders the DLQ.
        """
        message_id = self.message.properties.get("message_id")
        return str(message_id) if message_id else DIGEST_PREFIX + self.digest

    @property
    def digest(self) -> str:
        """SHA-256 of the body and the properties, less what the broker changes on each
        delivery (``x-delivery-count``) or on dead-lettering: the same on every look, and
        different for two rejections of one body (their ``rejected_at`` differs)."""
        properties = dict(self.message.properties)
        properties["application_headers"] = {
            k: v for k, v in self.headers.items() if k not in BROKER_HEADERS
        }
        body = self.message.body
        raw = body if isinstance(body, bytes) else str(body).encode("utf-8")
        described = json.dumps(properties, sort_keys=True, default=str).encode("utf-8")
        return hashlib.sha256(raw + b"\0" + described).hexdigest()[:DIGEST_CHARS]

    @property
    def job_id(self) -> str:
        try:
            body = json.loads(self.message.body)
        except (ValueError, UnicodeDecodeError):
            return "-"
        job_id = body.get("job_id") if isinstance(body, dict) else None
        return str(job_id) if job_id is not None else "-"

    @property
    def reason(self) -> str:
        """The worker's rejection code, or the broker's reason when the broker dead-lettered
        it (a request redelivered past ``JOBS_DELIVERY_LIMIT``)."""
        headers = self.headers
        if REASON_HEADER in headers:
            return str(headers[REASON_HEADER])
        broker_reason = headers.get("x-first-death-reason")
        return f"broker: {broker_reason}" if broker_reason else "-"


# 16 hex digits (64 bits): a DLQ would need billions of messages for two to share one.
DIGEST_CHARS = 16


@contextmanager
def _dead_letters(settings: Settings, limit: int) -> Iterator[tuple[Channel, list[DeadLetter]]]:
    """Fetch up to ``limit`` messages unacked; whatever is not acked goes back on exit."""
    with connection(settings, purpose="dlq") as conn:
        channel: Channel = conn.channel()
        letters = []
        for _ in range(limit):
            message = channel.basic_get(queue=settings.dlq, no_ack=False)
            if message is None:
                break
            letters.append(DeadLetter(message))
        try:
            yield channel, letters
        finally:
            channel.close()  # requeues every message not acked


# list and show write only once the connection is closed: a reader slower than the
# broker's heartbeat timeout (a pager, a full pipe) must not hold it open meanwhile, and
# the messages are back in the DLQ before the first line is out.


def list_messages(settings: Settings, *, limit: int, as_json: bool = False) -> int:
    """One line per message: the id that names it, job id, reason, size. In the order the
    DLQ gave them, which is no name: a look returns them, and the next look may see
    another order. ``as_json``: one JSON object, the messages and how many more lie beyond
    ``limit``."""
    with _dead_letters(settings, limit) as (channel, letters):
        _, count, _ = channel.queue_declare(settings.dlq, passive=True)
        lines = [
            f"{letter.key:<36}  {letter.job_id:<30}  {letter.reason:<26}  "
            f"{len(letter.message.body)}"
            for letter in letters
        ]
        listed = [
            {
                "id": letter.key,
                "job_id": None if letter.job_id == "-" else letter.job_id,
                "reason": None if letter.reason == "-" else letter.reason,
                "bytes": len(letter.message.body),
            }
            for letter in letters
        ]
    if as_json:
        print(json.dumps({"queue": settings.dlq, "messages": listed, "more": count}, indent=2))
        return 0
    if not lines:
        print(f"{settings.dlq} is empty")
        return 0
    print(f"{'message id':<36}  {'job id':<30}  {'reason':<26}  bytes")
    print("\n".join(lines))
    # The ones fetched were unacked, so the ready count was what lay beyond them.
    if count:
        print(f"... and {count} more (--limit)")
    return 0


def _no_such(settings: Settings, key: str) -> int:
    print(f"no dead-lettered message {key!r} in {settings.dlq}", file=sys.stderr)
    return 1


def show_message(
    settings: Settings, key: str, *, limit: int = 10_000, as_json: bool = False
) -> int:
    """The message's properties, then its body as it was dead-lettered. ``as_json``: one
    JSON object, the body as text where it is UTF-8 and always in base64 (its bytes)."""
    with _dead_letters(settings, limit) as (_, letters):
        found = [letter.message for letter in letters if letter.key == key]
    if not found:
        return _no_such(settings, key)
    if len(found) > 1:
        # The same request dead-lettered more than once (a producer's retried publish).
        print(f"{len(found)} messages have the id {key!r}; the first:", file=sys.stderr)
    properties = {k: v for k, v in found[0].properties.items()}
    body = found[0].body
    if as_json:
        raw = body if isinstance(body, bytes) else str(body).encode("utf-8")
        try:
            text: str | None = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        shown = {
            "id": key,
            "properties": properties,
            "body": text,
            "body_base64": base64.b64encode(raw).decode("ascii"),
        }
        print(json.dumps(shown, indent=2, default=str))
        return 0
    print(json.dumps(properties, indent=2, default=str))
    sys.stdout.write(body.decode("utf-8", "replace") if isinstance(body, bytes) else body)
    sys.stdout.write("\n")
    return 0


def _original_properties(message: Message) -> dict[str, Any]:
    properties = dict(message.properties)
    headers = {
        k: v
        for k, v in (properties.pop("application_headers", None) or {}).items()
        if k not in OUR_HEADERS and k not in BROKER_HEADERS
    }
    if headers:
        properties["application_headers"] = headers
    return properties


def replay(
    settings: Settings, *, message: str | None, replay_all: bool, limit: int = 10_000
) -> int:
    """Every message with that id (or all of them) back to the jobs queue."""
    replayed = 0
    with _dead_letters(settings, limit) as (channel, letters):
        chosen = [ltr for ltr in letters if replay_all or ltr.key == message]
        if not chosen:
            if message is not None and not replay_all:
                return _no_such(settings, message)
            print(f"nothing to replay in {settings.dlq}", file=sys.stderr)
            return 1
        publisher: Channel = channel.connection.channel()
        try:
            for letter in chosen:
                original = Message(letter.message.body, **_original_properties(letter.message))
                # Waits for the broker's confirm (raises on a nack) before the ack below.
                publisher.basic_publish_confirm(
                    original, exchange="", routing_key=settings.jobs_queue, mandatory=True
                )
                channel.basic_ack(letter.message.delivery_tag)
                replayed += 1
        finally:
            publisher.close()
    print(f"replayed {replayed} message(s) to {settings.jobs_queue}")
    return 0


def drop(settings: Settings, key: str, *, limit: int = 10_000) -> int:
    """Remove every message with that id from the DLQ (the others go back untouched)."""
    with _dead_letters(settings, limit) as (channel, letters):
        chosen = [letter for letter in letters if letter.key == key]
        for letter in chosen:
            channel.basic_ack(letter.message.delivery_tag)
    if not chosen:
        return _no_such(settings, key)
    print(f"dropped {len(chosen)} message(s) {key!r} from {settings.dlq}")
    return 0


def purge(settings: Settings, *, confirmed: bool) -> int:
    with connection(settings, purpose="dlq") as conn:
        channel = conn.channel()
        _, count, _ = channel.queue_declare(settings.dlq, passive=True)
        if not confirmed:
            print(f"{settings.dlq} holds {count} message(s); pass --yes to drop them")
            return 1
        dropped = channel.queue_purge(settings.dlq)
        print(f"dropped {dropped} message(s) from {settings.dlq}")
    return 0
