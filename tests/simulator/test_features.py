"""FATAL dice per feature and attempt (worker/simulator/features.py)."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from worker.simulator.config import SimulatorConfig
from worker.simulator.features import decide_outcome, fatal_indices
from worker.simulator.jobs import Outcome

NAMES = [f"tile-{i:03d}" for i in range(200)]


def never_run(_name: str) -> int:
    return 0


def test_an_exact_number_fails_on_the_first_attempts_only() -> None:
    outcome = decide_outcome("[sim:fatal=3]", SimulatorConfig(), random.Random(1))
    first = fatal_indices(NAMES[:10], outcome, never_run, seed=None, dice=random.Random(1))
    assert len(first) == 3
    follow_up = [NAMES[i] for i in sorted(first)]
    # The follow-up covers those three, each on its second attempt: it passes.
    assert not fatal_indices(follow_up, outcome, lambda _n: 1, seed=None, dice=random.Random(1))
    markers = "[sim:fatal=3] [sim:fatal-attempts=2]"
    sticky = decide_outcome(markers, SimulatorConfig(), random.Random())
    dice = random.Random()
    assert fatal_indices(follow_up, sticky, lambda _n: 1, seed=None, dice=dice) == {0, 1, 2}
    assert not fatal_indices(follow_up, sticky, lambda _n: 2, seed=None, dice=dice)


def test_fatal_attempts_is_a_setting_too() -> None:
    outcome = decide_outcome("[sim:fatal=2]", SimulatorConfig(fatal_attempts=3), random.Random())
    assert outcome.fatal_attempts == 3


@given(seed=st.integers(0, 2**31), attempt=st.integers(0, 5))
def test_a_seeded_rate_is_the_same_whatever_the_order(seed: int, attempt: int) -> None:
    outcome = Outcome(fatal_rate=0.3)
    forward = fatal_indices(NAMES, outcome, lambda _n: attempt, seed=seed, dice=random.Random())
    backward = fatal_indices(
        NAMES[::-1], outcome, lambda _n: attempt, seed=seed, dice=random.Random()
    )
    assert {NAMES[i] for i in forward} == {NAMES[::-1][i] for i in backward}


def test_a_rate_is_rolled_afresh_on_each_attempt() -> None:
    outcome = Outcome(fatal_rate=0.5)
    first = fatal_indices(NAMES, outcome, never_run, seed=7, dice=random.Random())
    again = [NAMES[i] for i in sorted(first)]
    second = fatal_indices(again, outcome, lambda _n: 1, seed=7, dice=random.Random())
    # Half fail, and of those about half fail again: a follow-up recovers some, not all.
    assert 60 < len(first) < 140
    assert 0 < len(second) < len(first)
    none = Outcome(fatal_rate=0.0)
    assert not fatal_indices(NAMES, none, never_run, seed=7, dice=random.Random())
