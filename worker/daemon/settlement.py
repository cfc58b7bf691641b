"""How the jobs consumer settles a batch once intake is done with it: decided here, pure.

Input: the batch (in delivery order) and how intake's transaction on it ended (its
``Outcome``). Output: a ``Settlement``, what the consumer then does on the channel and to its
own intake: ack up to a delivery tag cumulatively, ack or reject (requeue) single messages,
give back every unsettled delivery up to a tag, hold messages in hand (unacked, no delivery
attempt spent), pause intake for its back-off or start the back-off over.

- Taken whole: one cumulative ack. Batches are settled in delivery order, so every earlier
  delivery is settled already and the ack covers exactly this batch.
- Taken with some deferred (intake at MAX_IN_FLIGHT): the rest acked one by one, the deferred
  held, intake paused.
- Unavailable (the database is down): the whole batch held, intake paused. Requeueing would
  spend the quorum queue's delivery limit and dead-letter good requests in a long outage.
- Failed: a lone message is rejected (requeued: its delivery limit dead-letters poison);
  a larger batch is tried again one message at a time (``settle_alone`` for each, then
  ``after_trial``), so that one poison message cannot fail the others forever. Two failures
  in a row with nothing taken look like an outage, not poison: the rest is given back at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from worker.daemon.inbound import InboundMessage

TAKEN, FAILED, UNAVAILABLE = "taken", "failed", "unavailable"

# Why intake pauses (the consumer's log line).
PAUSE_UNAVAILABLE = "intake unavailable"
PAUSE_AT_CAPACITY = "at capacity (MAX_IN_FLIGHT)"
PAUSE_AT_CAPACITY_ALONE = "at capacity"
PAUSE_FAILED = "intake failed"


class Outcome(NamedTuple):
    """How intake's transaction on a batch ended: ``TAKEN`` (with the messages it deferred,
    if any), ``FAILED`` or ``UNAVAILABLE``."""

    result: str
    deferred: Sequence[InboundMessage] = ()

    @property
    def taken_whole(self) -> bool:
        return self.result == TAKEN and not self.deferred


class Settlement(NamedTuple):
    """What the consumer does after a batch, in this order (fields left empty: nothing)."""

    ack_up_to: int | None = None  # basic.ack multiple: this delivery and every earlier one
    ack: tuple[int, ...] = ()  # basic.ack, one delivery each
    reject: tuple[int, ...] = ()  # basic.reject with requeue: one delivery attempt each
    give_back_up_to: int | None = None  # basic.nack multiple with requeue
    hold: Sequence[InboundMessage] = ()  # kept in hand, unacked, first in line again
    taken: bool = False  # intake took something in: its back-off starts over
    pause: str | None = None  # why intake pauses for its back-off (stopping: give back all)
    one_by_one: bool = False  # try each message alone: ``settle_alone``, then ``after_trial``


class Trial(NamedTuple):
    """A failed batch tried again one message at a time, so far."""

    taken: int = 0
    failures_in_a_row: int = 0
    over: bool = False  # the rest of the batch is settled already: try no more


def settle(batch: Sequence[InboundMessage], outcome: Outcome) -> Settlement:
    """The settlement of ``batch`` (not empty) after intake's ``outcome`` on it whole."""
    if outcome.result == TAKEN:
        if not outcome.deferred:
            return Settlement(ack_up_to=batch[-1].delivery_tag, taken=True)
        deferred = {m.delivery_tag for m in outcome.deferred}
        return Settlement(
            ack=tuple(m.delivery_tag for m in batch if m.delivery_tag not in deferred),
            hold=[m for m in batch if m.delivery_tag in deferred],
            pause=PAUSE_AT_CAPACITY,
        )
    if outcome.result == UNAVAILABLE:
        return Settlement(hold=batch, pause=PAUSE_UNAVAILABLE)
    if len(batch) == 1:
        return Settlement(reject=(batch[0].delivery_tag,), pause=PAUSE_FAILED)
    return Settlement(one_by_one=True)


def settle_alone(
    batch: Sequence[InboundMessage], index: int, outcome: Outcome, trial: Trial
) -> tuple[Settlement, Trial]:
    """The settlement after intake's ``outcome`` on ``batch[index]`` alone, the messages
    before it settled as ``trial`` says; and the trial with it."""
    if outcome.result == TAKEN and outcome.deferred:
        return Settlement(hold=batch[index:], pause=PAUSE_AT_CAPACITY_ALONE), trial._replace(
            over=True
        )
    if outcome.result == TAKEN:
        return Settlement(ack_up_to=batch[index].delivery_tag), Trial(trial.taken + 1, 0)
    if outcome.result == UNAVAILABLE:
        return Settlement(hold=batch[index:], pause=PAUSE_UNAVAILABLE), trial._replace(over=True)
    failures = trial.failures_in_a_row + 1
    if failures >= 2 and not trial.taken:
        # Not one poison message: everything fails. Give the rest back at once.
        return Settlement(give_back_up_to=batch[-1].delivery_tag), Trial(0, failures, over=True)
    # Requeued alone: if it is poison, the delivery limit dead-letters it.
    return Settlement(reject=(batch[index].delivery_tag,)), Trial(trial.taken, failures)


def after_trial(trial: Trial) -> Settlement:
    """Once a failed batch has been tried one message at a time: taking any in ends the
    back-off; taking none is one more failure of intake."""
    return Settlement(taken=True) if trial.taken else Settlement(pause=PAUSE_FAILED)
