"""Which features a request covers, what they cost, and what goes wrong with them.

Features come from the tiling grid and the bounds (§5.2, §7), or from the GeoPackage input
read from S3 (§5.2 rules). Faults per request come from markers in the description
(``[sim:fail-analysis]``, ``[sim:out-of-pu]``, ``[sim:unhealthy]``, ``[sim:unhealthy=2]``
(that many stops, one per run), ``[sim:fatal=3]``, ``[sim:fatal-attempts=2]``,
``[sim:features=12]``, ``[sim:cost=900]``) or from the configured rates.

FATAL dice are per feature *and attempt*: a feature's attempt is how many earlier requests
of the account processed a feature of that name to the same output path (a follow-up over
FATAL features re-runs them there, docs/simulator.md), so a follow-up may pass where the
first request failed, and with a seed the same feature meets the same fate on every run.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from worker.api import geopackage
from worker.simulator.config import SimulatorConfig
from worker.simulator.grids import GRIDS, BBox, Feature, bbox_of_bounds, grid_features
from worker.simulator.jobs import Outcome

logger = logging.getLogger(__name__)

_MARKER = re.compile(r"\[sim:([a-z-]+)(?:=(\d+))?\]")
_PU_PIXELS = 512 * 512  # §14: 1 PU = 512 x 512 px, 3 bands
_BATCH_MULTIPLIER = 1 / 3  # §14, for processed tiles bigger than 10 000 px

Downloader = Callable[[str, Path], None]


def decide_outcome(description: str, config: SimulatorConfig, dice: random.Random) -> Outcome:
    """The faults a new request will meet: markers win over the rates."""
    markers = {name: value for name, value in _MARKER.findall(description)}
    outcome = Outcome(fatal_rate=config.rate_fatal_feature, fatal_attempts=config.fatal_attempts)
    outcome.fail_analysis = "fail-analysis" in markers or dice.random() < config.rate_fail_analysis
    if "out-of-pu" in markers or dice.random() < config.rate_out_of_pu:
        outcome.stop_reason, outcome.stop_at = "OUT_OF_PU", 50.0
        outcome.stops = _stops(markers.get("out-of-pu"))
    elif "unhealthy" in markers or dice.random() < config.rate_unhealthy:
        outcome.stop_reason, outcome.stop_at = "UNHEALTHY", 30.0
        outcome.stops = _stops(markers.get("unhealthy"))
    if markers.get("fatal"):
        outcome.fatal = int(markers["fatal"])
    if markers.get("fatal-attempts"):
        outcome.fatal_attempts = max(1, int(markers["fatal-attempts"]))
    if markers.get("features"):
        outcome.features = max(1, int(markers["features"]))
    if markers.get("cost"):
        outcome.cost = float(max(1, int(markers["cost"])))
    return outcome


def _stops(count: str | None) -> int:
    """``[sim:unhealthy=2]``: stopped twice (each restart runs until the next stop)."""
    return max(1, int(count)) if count else 1


def resolve_features(
    request: dict[str, Any], outcome: Outcome, config: SimulatorConfig, download: Downloader | None
) -> list[Feature]:
    """The request's features (blocking: may read S3). ``ValueError`` = analysis fails."""
    input_spec = request["input"]
    if outcome.features is not None:
        return _laid_over(request, outcome.features)
    if input_spec["type"] == "tiling-grid":
        bounds = request["processRequest"]["input"].get("bounds") or {}
        bbox = bbox_of_bounds(bounds)
        if bbox is None:
            raise ValueError("Bounds are required when using a tiling grid input.")
        if not (
            -180 <= bbox[0] <= 180 and -90 <= bbox[1] <= 90 and bbox[2] <= 180 and bbox[3] <= 90
        ):
            # Projected bounds: project nothing, lay the grid over the raw extent.
            bbox = _degrees_from_metres(bbox)
        features = grid_features(GRIDS[input_spec["id"]], bbox)
        if not features:
            raise ValueError("The area of interest does not intersect the tiling grid.")
        return features
    url = input_spec["features"]["s3"]["url"]
    if download is None:
        return [
            Feature(f"feature-{i:05d}", 4326, (0.0, 0.0, 1.0, 1.0))
            for i in range(1, config.geopackage_default_features + 1)
        ]
    with tempfile.TemporaryDirectory(prefix="sim-gpkg-") as folder:
        local = Path(folder) / "input.gpkg"
        try:
            download(url, local)
        except Exception as exc:
            logger.info("GeoPackage input %s cannot be read: %s", url, type(exc).__name__)
            raise ValueError(f"Unable to read the GeoPackage at {url}.") from exc
        rows = geopackage.read_features(local)
    if len(rows) > 700_000:  # §14
        raise ValueError("The GeoPackage holds more than 700000 features.")
    return [Feature(row.identifier, row.epsg, row.extent) for row in rows]


def _laid_over(request: dict[str, Any], count: int) -> list[Feature]:
    """``count`` features side by side over the request's bounds (in degrees), so a map of
    them shows each apart; without such bounds, over the unit square at 0, 0."""
    process_input = (request.get("processRequest") or {}).get("input") or {}
    bbox = bbox_of_bounds(process_input.get("bounds") or {})
    if bbox is None or not (-180 <= bbox[0] < bbox[2] <= 180 and -90 <= bbox[1] < bbox[3] <= 90):
        bbox = (0.0, 0.0, 1.0, 1.0)
    columns = max(1, round(count**0.5))
    rows = -(-count // columns)
    width, height = (bbox[2] - bbox[0]) / columns, (bbox[3] - bbox[1]) / rows
    features = []
    for i in range(count):
        row, column = divmod(i, columns)
        x, y = bbox[0] + column * width, bbox[3] - (row + 1) * height
        features.append(Feature(f"feature-{i + 1:05d}", 4326, (x, y, x + width, y + height)))
    return features


def _degrees_from_metres(bbox: BBox) -> BBox:
    # A rough inverse near the equator: keeps the feature count proportional to the area.
    min_x, min_y, max_x, max_y = bbox
    return (0.0, 0.0, (max_x - min_x) / 111_320.0, (max_y - min_y) / 110_574.0)


def pu_per_feature(request: dict[str, Any]) -> float:
    """PUs one feature costs (§14): pixels, outputs and input collections."""
    input_spec = request["input"]
    if input_spec["type"] == "tiling-grid":
        pixels = GRIDS[input_spec["id"]].tile_pixels(float(input_spec["resolution"])) ** 2
    else:
        defaults = input_spec.get("defaults") or {}
        side = int(defaults.get("width") or 1000)
        pixels = side * int(defaults.get("height") or side)
    outputs = len(request["processRequest"]["output"]["responses"])
    collections = len(request["processRequest"]["input"]["data"])
    cost = pixels / _PU_PIXELS * outputs * collections
    if pixels > 10_000:
        cost *= _BATCH_MULTIPLIER
    return round(cost, 6)


def fatal_indices(
    names: Sequence[str],
    outcome: Outcome,
    attempts: Callable[[str], int],
    *,
    seed: int | None,
    dice: random.Random,
) -> frozenset[int]:
    """Which features will end FATAL.

    An exact number (``[sim:fatal=N]``) picks N features spread evenly; each of them is
    FATAL while it is on one of its first ``fatal_attempts`` attempts (``attempts(name)``:
    0 for a feature never run before). Else each feature rolls ``fatal_rate`` afresh on
    every attempt: with a seed, a die of its own (seed, name, attempt), so the outcome does
    not depend on the order requests are made in.
    """
    count = len(names)
    if outcome.fatal is not None:
        wanted = min(outcome.fatal, count)
        if wanted == 0:
            return frozenset()
        step = count / wanted
        chosen = (int(i * step) for i in range(wanted))
        return frozenset(i for i in chosen if attempts(names[i]) < outcome.fatal_attempts)
    if outcome.fatal_rate <= 0:
        return frozenset()
    return frozenset(
        i
        for i, name in enumerate(names)
        if _roll(seed, name, attempts(name), dice) < outcome.fatal_rate
    )


def _roll(seed: int | None, name: str, attempt: int, dice: random.Random) -> float:
    if seed is None:
        return dice.random()
    digest = hashlib.sha256(f"{seed}\0{name}\0{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
