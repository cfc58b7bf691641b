"""The consumer's pipeline without a broker: a scripted intake in steps and a recording channel.

While batch N is in its transaction, batch N+1 is read; acks stay cumulative and in
delivery order, and whatever goes wrong in N puts N+1 back behind it, never ahead.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import pytest

from worker.daemon.consumer import JobsConsumer
from worker.daemon.inbound import InboundMessage, IntakeUnavailable
from worker.settings import Settings

PREFETCH = 20  # batches of 10


class Channel:
    """Records settlements; a multiple ack settles every earlier delivery."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.requeued: list[int] = []
        self.ack_calls: list[tuple[int, bool]] = []

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.ack_calls.append((tag, multiple))
        self.acked += [tag] if not multiple else [t for t in self._open(tag)]

    def basic_reject(self, tag: int, requeue: bool) -> None:
        self.requeued.append(tag)

    def send_method(self, method: Any, fmt: str, args: tuple[int, bool, bool]) -> None:
        self.requeued += self._open(args[0])  # basic.nack(multiple, requeue)

    def _open(self, up_to: int) -> list[int]:
        settled = set(self.acked) | set(self.requeued)
        return [t for t in range(1, up_to + 1) if t not in settled]


class Scripted:
    """Intake in three steps (lookup, writes, commit), logging what happens when."""

    def __init__(self, unavailable_once_at: int | None = None, poison: int | None = None) -> None:
        self.log: list[tuple[str, int]] = []
        self.taken: list[int] = []
        self._unavailable_at = unavailable_once_at
        self._poison = poison

    def read(self, batch: list[InboundMessage]) -> list[InboundMessage]:
        self.log.append(("read", batch[0].delivery_tag))
        return batch

    def take_in_steps(
        self, batch: list[InboundMessage]
    ) -> Generator[None, None, list[InboundMessage]]:
        first = batch[0].delivery_tag
        self.log.append(("lookup", first))
        yield
        self.log.append(("writes", first))
        yield
        if self._unavailable_at == first:  # at commit: the next batch has been read
            self._unavailable_at = None
            raise IntakeUnavailable("database down")
        if any(m.delivery_tag == self._poison for m in batch):
            raise ValueError("a bug one message provokes")
        self.taken += [m.delivery_tag for m in batch]
        self.log.append(("commit", first))
        return []


def message(tag: int) -> InboundMessage:
    return InboundMessage(b"{}", "application/json", {}, {}, tag, False)


def run(intake: Scripted, total: int, channel: Channel) -> JobsConsumer:
    """Deliver ``total`` messages as a broker would (never more unsettled than the
    prefetch window), a few per drain, and turn the pipeline until all are settled
    (acked, or requeued: not delivered again here)."""
    # Batches form only when full (the totals are whole batches).
    consumer = JobsConsumer(Settings(prefetch=PREFETCH), intake, batch_wait=60.0)
    delivered = 0
    for _ in range(10_000):
        settled = len(set(channel.acked))
        room = PREFETCH - (delivered - settled - len(channel.requeued))
        arriving = min(3, room, total - delivered)
        for _ in range(arriving):
            delivered += 1
            consumer._on_message_inbound(message(delivered))  # type: ignore[attr-defined]
        consumer._quiet = arriving == 0  # what the drain would have found
        consumer._resume_at = 0.0  # no real back-off in a unit test
        consumer._advance(channel)
        if len(set(channel.acked) | set(channel.requeued)) == total:
            return consumer
    raise AssertionError("the pipeline stopped moving")


@pytest.fixture(autouse=True)
def _inbound(monkeypatch: pytest.MonkeyPatch) -> None:
    def on_message_inbound(self: JobsConsumer, inbound: InboundMessage) -> None:
        if not self._pending:
            self._first_pending_at = time.monotonic()
        self._pending.append(inbound)

    monkeypatch.setattr(JobsConsumer, "_on_message_inbound", on_message_inbound, raising=False)


def test_the_next_batch_is_read_while_this_one_is_in_its_transaction() -> None:
    intake, channel = Scripted(), Channel()
    run(intake, 60, channel)
    assert intake.taken == list(range(1, 61))
    log = intake.log
    # Batch 11-20 is read after batch 1-10 sent its writes and before it commits.
    assert log.index(("writes", 1)) < log.index(("read", 11)) < log.index(("commit", 1))
    # One cumulative ack per batch, in delivery order, each after its commit.
    assert channel.ack_calls == [(tag, True) for tag in range(10, 61, 10)]
    assert channel.acked == list(range(1, 61))


def test_a_failed_transaction_puts_the_batch_read_ahead_back_behind_it() -> None:
    intake, channel = Scripted(unavailable_once_at=11), Channel()
    run(intake, 40, channel)
    # Batch 11-20 failed while 21-30 was read ahead: both were held, in order, and taken
    # in once intake was back; nothing acked out of order, nothing handed back.
    assert intake.taken == list(range(1, 41))
    assert channel.acked == list(range(1, 41))
    assert channel.requeued == []
    reads = [tag for what, tag in intake.log if what == "read"]
    assert reads.count(21) == 2  # read ahead, dropped with its predecessor, read again


def test_a_failed_batch_is_taken_in_alone_but_its_poison_message() -> None:
    intake, channel = Scripted(poison=13), Channel()
    run(intake, 30, channel)
    # Batch 11-20 failed with 21-30 read ahead: 21-30 went back behind it, 11-20 was taken
    # in one message at a time, each acked as it went in, 13 requeued alone; then 21-30.
    good = [tag for tag in range(1, 31) if tag != 13]
    assert intake.taken == good
    assert channel.acked == good
    assert channel.requeued == [13]
    alone = [(tag, True) for tag in range(11, 21) if tag != 13]
    assert channel.ack_calls == [(10, True), *alone, (30, True)]
