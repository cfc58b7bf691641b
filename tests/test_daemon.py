"""The daemon's process-wide settings (its loops are tested end to end in tests/daemon/)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker.daemon import GC_YOUNG_THRESHOLD, tune_gc


@pytest.fixture
def thresholds() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)


def test_the_young_generation_is_collected_less_often_and_the_rest_left_alone(
    thresholds: tuple[int, int, int],
) -> None:
    gc.set_threshold(700, 10, 10)  # Python's defaults
    tune_gc()
    assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
    assert GC_YOUNG_THRESHOLD > 700
    gc.set_threshold(50_000, 5, 5)  # someone asked for more already: kept
    tune_gc()
    assert gc.get_threshold() == (50_000, 5, 5)
