"""The consumer's settle policy, pure: no broker, batches and intake's outcomes given as data."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest

from worker.daemon.inbound import InboundMessage
from worker.daemon.settlement import (
    FAILED,
    PAUSE_AT_CAPACITY,
    PAUSE_AT_CAPACITY_ALONE,
    PAUSE_FAILED,
    PAUSE_UNAVAILABLE,
    TAKEN,
    UNAVAILABLE,
    Outcome,
    Settlement,
    Trial,
    after_trial,
    settle,
    settle_alone,
)


def batch(first: int, last: int) -> list[InboundMessage]:
    return [InboundMessage(b"{}", None, {}, {}, tag, False) for tag in range(first, last + 1)]


def test_a_batch_taken_whole_is_acked_with_one_cumulative_ack() -> None:
    assert settle(batch(11, 20), Outcome(TAKEN, [])) == Settlement(ack_up_to=20, taken=True)


def test_deferred_messages_are_held_and_the_rest_acked_one_by_one() -> None:
    messages = batch(1, 5)
    deferred = [messages[1], messages[3]]
    assert settle(messages, Outcome(TAKEN, deferred)) == Settlement(
        ack=(1, 3, 5), hold=deferred, pause=PAUSE_AT_CAPACITY
    )


def test_an_unavailable_intake_holds_the_whole_batch_and_pauses() -> None:
    messages = batch(1, 3)
    assert settle(messages, Outcome(UNAVAILABLE)) == Settlement(
        hold=messages, pause=PAUSE_UNAVAILABLE
    )


def test_a_lone_message_that_fails_is_requeued_and_intake_paused() -> None:
    assert settle(batch(7, 7), Outcome(FAILED)) == Settlement(reject=(7,), pause=PAUSE_FAILED)


def test_a_larger_batch_that_fails_is_tried_one_message_at_a_time() -> None:
    assert settle(batch(1, 2), Outcome(FAILED)) == Settlement(one_by_one=True)


# -- a failed batch, one message at a time ------------------------------------------------

T, D, F, U = "taken", "deferred", "failed", "unavailable"
OUTCOMES = {T: Outcome(TAKEN, []), F: Outcome(FAILED), U: Outcome(UNAVAILABLE)}


def trial(results: Sequence[str]) -> tuple[list[Settlement], dict[int, str]]:
    """Try a batch of ``len(results)`` messages alone as the consumer does (the i-th with
    outcome ``results[i]``, until the policy says stop); return the settlements and each
    delivery's fate as a channel would see them, checking that none is settled twice and
    that every cumulative ack covers exactly one delivery."""
    messages = batch(1, len(results))
    fate: dict[int, str] = {}
    settlements, state = [], Trial()
    for index, result in enumerate(results):
        outcome = Outcome(TAKEN, [messages[index]]) if result == D else OUTCOMES[result]
        settlement, state = settle_alone(messages, index, outcome, state)
        settlements.append(settlement)
        if state.over:
            break
    settlements.append(after_trial(state))
    for settlement in settlements:
        assert not settlement.one_by_one and not settlement.ack
        if settlement.ack_up_to is not None:
            unsettled = [t for t in range(1, settlement.ack_up_to + 1) if t not in fate]
            assert unsettled == [settlement.ack_up_to]
            fate[settlement.ack_up_to] = "acked"
        for tag in settlement.reject:
            assert tag not in fate
            fate[tag] = "requeued"
        if settlement.give_back_up_to is not None:
            for tag in range(1, settlement.give_back_up_to + 1):
                fate.setdefault(tag, "given back")
        for message in settlement.hold:
            assert message.delivery_tag not in fate
            fate[message.delivery_tag] = "held"
    return settlements, fate


@pytest.mark.parametrize(
    ("results", "fates", "paused"),
    [
        # Two failures with nothing taken: an outage, not poison; the rest back at once.
        ([F, F, T, T], ["requeued", "given back", "given back", "given back"], PAUSE_FAILED),
        # Poison between good messages: requeued alone, the others taken.
        ([T, F, F, T], ["acked", "requeued", "requeued", "acked"], None),
        ([F, T, F, F], ["acked" if i == 1 else "requeued" for i in range(4)], None),
        ([F, T, U, T], ["requeued", "acked", "held", "held"], None),
        ([T, D, T], ["acked", "held", "held"], None),
        ([U, T], ["held", "held"], PAUSE_FAILED),
    ],
)
def test_a_failed_batch_tried_alone(
    results: list[str], fates: list[str], paused: str | None
) -> None:
    settlements, fate = trial(results)
    assert [fate[tag] for tag in range(1, len(results) + 1)] == fates
    assert settlements[-1].pause == paused
    assert settlements[-1].taken == (paused is None)


def test_holding_pauses_intake_with_its_reason() -> None:
    (deferred, *_), _ = trial([D, T])
    (unavailable, *_), _ = trial([U, T])
    assert (deferred.pause, unavailable.pause) == (PAUSE_AT_CAPACITY_ALONE, PAUSE_UNAVAILABLE)


def test_every_message_of_a_failed_batch_is_settled_once_and_nothing_is_lost() -> None:
    for results in (r for n in range(2, 7) for r in itertools.product([T, D, F, U], repeat=n)):
        settlements, fate = trial(results)
        assert sorted(fate) == list(range(1, len(results) + 1)), results
        acked = [tag for tag, what in fate.items() if what == "acked"]
        for tag, what in fate.items():
            result = results[tag - 1]
            # Acked only when taken; a delivery attempt spent only on a failure.
            assert result == {"acked": T, "requeued": F}.get(what, result), results
            if what == "held":
                # From the first deferred or unavailable message on, the batch stays in hand.
                first = min(i for i, r in enumerate(results) if r in (D, U)) + 1
                assert tag >= first, results
        if "given back" in fate.values():
            # Only after two failures in a row, with nothing taken before them.
            assert list(results[:2]) == [F, F], results
        # Taking anything in starts intake's back-off over; taking nothing is a failure.
        last = settlements[-1]
        assert last.taken == bool(acked) and (last.pause is None) == bool(acked), results
