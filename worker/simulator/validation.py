"""What the service checks at create (batch-v2-api.md §5, §6): everything but the evalscript.

The payload's shape (types, required fields, and the cross-field rules a client can check
itself) is the shared model's, ``worker.api.payload``, which the worker also applies before
it sends. What is left here is what only the service knows (its tiling grids and their
resolutions) and what the model lets through (unknown placeholders, Zarr array parameters,
tile-size fields in a batch request). Each problem is reported like the API does, as one
message (the 400's ``message``, code ``COMMON_BAD_PAYLOAD``, §9).
"""

from __future__ import annotations

import re
from typing import Any

from worker.api.errors import PayloadInvalid
from worker.api.payload import validate_create_payload
from worker.simulator.grids import GRIDS

_PLACEHOLDER = re.compile(r"<([^>]*)>")
_RASTER_TOKENS = {"requestId", "tileName", "tileId", "outputId", "format"}
_TILE_SIZE_FIELDS = ("width", "height", "resx", "resy")


class PayloadError(ValueError):
    """The payload breaks a rule; ``str(exc)`` is the API's message."""


def validate_create(payload: Any) -> None:
    """Raise :class:`PayloadError` on the first problem of a create payload."""
    try:
        validate_create_payload(payload)
    except PayloadInvalid as exc:
        raise PayloadError(exc.message) from None
    _check_input(payload["input"])
    output = payload["processRequest"]["output"]
    for size_key in _TILE_SIZE_FIELDS:
        if size_key in output:
            raise PayloadError(
                f"Field 'processRequest.output.{size_key}' is not allowed in"
                " batch requests; the tile size comes from the grid."
            )
    _check_output(payload["output"], output["responses"])


def _check_input(spec: dict[str, Any]) -> None:
    if spec["type"] == "geopackage":
        url = _url(spec["features"])
        if not url.endswith(".gpkg"):
            raise PayloadError("Field 'input.features' must point to a .gpkg file.")
        return
    grid_id = spec["id"]
    if grid_id not in GRIDS:
        raise PayloadError(f"Tiling grid with id {grid_id} does not exist.")
    resolution = float(spec["resolution"])
    if resolution not in GRIDS[grid_id].resolutions:
        allowed = ", ".join(str(r) for r in GRIDS[grid_id].resolutions)
        raise PayloadError(
            f"Resolution {spec['resolution']} is not supported by tiling grid {grid_id};"
            f" supported: {allowed}."
        )


def _check_output(spec: dict[str, Any], responses: list[dict[str, Any]]) -> None:
    tokens = set(_PLACEHOLDER.findall(_url(spec["delivery"])))
    if spec["type"] == "raster":
        unknown = tokens - _RASTER_TOKENS
        if unknown:
            raise PayloadError(f"Unknown placeholder <{sorted(unknown)[0]}> in the delivery url.")
        return
    if tokens - {"requestId"}:
        raise PayloadError("A zarr delivery url may only contain the <requestId> placeholder.")
    params = spec.get("arrayParameters") or {}
    overrides = spec.get("arrayOverrides") or {}
    for response in responses:
        merged = {**params, **(overrides.get(response["identifier"]) or {})}
        for key in ("dtype", "chunks"):
            if merged.get(key) is None:
                raise PayloadError(
                    f"Array '{response['identifier']}' has no '{key}' (set output.arrayParameters)."
                )


def _url(delivery: dict[str, Any]) -> str:
    # The shared model has made sure exactly one of the two is there.
    location: dict[str, Any] = delivery.get("s3") or delivery["gs"]
    return str(location["url"])
