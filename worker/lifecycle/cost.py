"""What a job will cost: the forecast from its progress, the bounds known before START, and
the guard that stops a job by its forecast (docs/lifecycle.md "Cost forecast and guard").

Pure, and on plain numbers rather than a job's state, so whatever sums a job's cost over
several batch requests forecasts it the same way.

V2 gives no estimate of its own (batch-v2-api.md §16): ``costPU`` grows as processing is
billed, beside ``completionPercentage``. Billing follows the features processed (§14:
features processed or in progress are charged), so the spend so far over the share done
is the forecast of the whole, once the share is large enough to mean something.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict

CostGuard = Literal["spent", "forecast"]
COST_GUARDS: tuple[CostGuard, ...] = ("spent", "forecast")

# §14: a batch request costs at least this much, whatever it processes.
MIN_CHARGE_PU = 100.0

# The documented PU rules (batch-v2-api.md §14), at their cheapest, for a lower bound from
# the sizes of the manifest's features: 1 PU is 512 x 512 px of 3 input bands; the fewest
# bands a request can ask for is one (a factor of 1/3); the output-size factor is never
# below 0.01; batch processing takes a third off tiles bigger than 10 000 px. Outputs,
# collections, samples, 32-bit formats and orthorectification only ever add to it.
_PU_PIXELS = 512 * 512
_FEWEST_BANDS_FACTOR = 1 / 3
_MIN_SIZE_FACTOR = 0.01
_BATCH_FACTOR = 1 / 3
_BATCH_FACTOR_ABOVE_PIXELS = 10_000
# §14: no feature is bigger than 3500 x 3500 px; a manifest that says more is not believed.
_MAX_FEATURE_PIXELS = 3500 * 3500

Method = Literal["linear", "minimum_charge", "manifest"]


class CostForecast(BaseModel):
    """A forecast of the final ``costPU``, and how it was made.

    ``linear``: spend over completion, from ``at_completion`` percent done on (never below
    the minimum charge). ``minimum_charge`` and ``manifest`` are lower bounds known before
    processing: the 100 PU minimum per request, or the PU rules applied to the feature
    manifest's sizes at their cheapest (``at_completion`` 0).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    pu: float
    method: Method
    at_completion: float


def linear_forecast(
    completion: float,
    cost_pu: float | None,
    min_completion: float,
    spent_before: float = 0.0,
    rerun_base: float = 0.0,
) -> CostForecast | None:
    """The final cost by the spend so far, once ``min_completion`` percent is done.

    ``completion`` and ``cost_pu`` are the current request's highest read so far (neither
    goes down for one request); ``spent_before`` what the job's earlier requests cost (its
    follow-ups over FATAL features sum them all); ``rerun_base`` what earlier runs of this
    request billed when a restart (resume by policy) processes it again from 0 %: its
    ``costPU`` keeps that, so only the rest is this run's spend over its completion.
    Below the minimum there is no forecast: a few early features say little.
    """
    if cost_pu is None or completion <= 0 or completion < min_completion:
        return None
    share = min(completion, 100.0) / 100.0
    this_run = max(0.0, cost_pu - rerun_base) / share
    return CostForecast(
        pu=round(spent_before + max(MIN_CHARGE_PU, rerun_base + this_run), 3),
        method="linear",
        at_completion=completion,
    )


def manifest_lower_bound(feature_pixels: Iterable[int]) -> float:
    """The least the PU rules can charge for features of these sizes (width x height, one
    per distinct feature), never below the minimum charge."""
    total = 0.0
    for given in feature_pixels:
        pixels = min(max(given, 0), _MAX_FEATURE_PIXELS)
        factor = max(_MIN_SIZE_FACTOR, pixels / _PU_PIXELS) * _FEWEST_BANDS_FACTOR
        if pixels > _BATCH_FACTOR_ABOVE_PIXELS:
            factor *= _BATCH_FACTOR
        total += factor
    return max(MIN_CHARGE_PU, round(total, 3))


def lower_bound(manifest_bound_pu: float | None) -> CostForecast:
    """The bound known before START: the manifest's when it was read, else the minimum."""
    if manifest_bound_pu is not None and manifest_bound_pu > MIN_CHARGE_PU:
        return CostForecast(pu=manifest_bound_pu, method="manifest", at_completion=0.0)
    return CostForecast(pu=MIN_CHARGE_PU, method="minimum_charge", at_completion=0.0)


def guard_limit(max_cost_pu: float, margin: float) -> float:
    """The forecast above which a ``forecast``-guarded job is stopped."""
    return max_cost_pu * (1.0 + margin)


def over_forecast(
    guard: CostGuard,
    max_cost_pu: float | None,
    forecast: CostForecast | None,
    margin: float,
) -> bool:
    """Whether the forecast guard stops the job: it asked for it, it has a cap, and the
    forecast made from its progress exceeds the cap and its margin."""
    if guard != "forecast" or max_cost_pu is None or forecast is None:
        return False
    return forecast.method == "linear" and forecast.pu > guard_limit(max_cost_pu, margin)


def bound_exceeds_cap(
    guard: CostGuard, max_cost_pu: float | None, bound: CostForecast | None
) -> bool:
    """Whether what the job will cost at least is already above its cap (no margin: a
    lower bound is not a guess)."""
    if guard != "forecast" or max_cost_pu is None or bound is None:
        return False
    return bound.method != "linear" and bound.pu > max_cost_pu
