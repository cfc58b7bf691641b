"""Helpers shared by the API client tests."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.api.client import ApiHooks, BatchClient, RetryPolicy

DATA = Path(__file__).parent / "data"
SEEDS = ("seed_tiff_tiling_grid", "seed_zarr_tiling_grid", "seed_tiff_geopackage")

MakeClient = Callable[..., BatchClient]

# Small waits keep the suite fast; the behaviour under test is the same.
FAST = RetryPolicy(
    max_attempts=4,
    max_total_seconds=5.0,
    backoff_base=0.01,
    backoff_cap=0.05,
    default_retry_after=0.05,
    not_found_window=60.0,
    not_found_delay=0.02,
)


def seed(name: str = "seed_tiff_tiling_grid") -> dict[str, Any]:
    """One of the documented example payloads (batch-v2-api.md §5, seed examples)."""
    payload: dict[str, Any] = json.loads((DATA / f"{name}.json").read_text())
    return copy.deepcopy(payload)


class Recorder:
    """ApiHooks that remember every call."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, float]] = []
        self.budget_waits: list[float] = []

    def hooks(self) -> ApiHooks:
        return ApiHooks(
            on_request=lambda e, c, s: self.requests.append((e, c, s)),
            on_budget_wait=self.budget_waits.append,
        )

    def codes(self, endpoint: str) -> list[str]:
        return [code for e, code, _ in self.requests if e == endpoint]
