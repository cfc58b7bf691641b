"""What the service checks at create (batch-v2-api.md §5, §6): everything but the evalscript.

Each problem is reported like the API does, as one specific message (the 400's
``message``, code ``COMMON_BAD_PAYLOAD``, §9).
"""

from __future__ import annotations

import re
from typing import Any

from worker.simulator.grids import GRIDS

_RESPONSE_FORMATS = {"image/tiff", "application/json", "zarr/array"}
_PLACEHOLDER = re.compile(r"<([^>]*)>")
_RASTER_TOKENS = {"requestId", "tileName", "tileId", "outputId", "format"}
_ZARR_GRIDS = {3, 6, 7}  # §5.3: WGS84 and LAEA grids only


class PayloadError(ValueError):
    """The payload breaks a rule; ``str(exc)`` is the API's message."""


def validate_create(payload: Any, *, evalscript_in_part: bool = False) -> None:
    """Raise :class:`PayloadError` on the first problem of a create payload."""
    if not isinstance(payload, dict):
        raise PayloadError("The request body must be a JSON object.")
    for key in ("processRequest", "input", "output"):
        if not isinstance(payload.get(key), dict):
            raise PayloadError(f"Field '{key}' is required and must be an object.")
    description = payload.get("description")
    if description is not None and not isinstance(description, str):
        raise PayloadError("Field 'description' must be a string.")
    instance = payload.get("instanceType", "normal")
    if instance not in {"normal", "large"}:
        raise PayloadError("Field 'instanceType' must be one of [normal, large].")
    input_spec = payload["input"]
    grid_id = _check_input(input_spec)
    responses = _check_process_request(
        payload["processRequest"], evalscript_in_part, needs_bounds=grid_id is not None
    )
    _check_output(payload["output"], responses, grid_id)


def _check_input(spec: dict[str, Any]) -> int | None:
    kind = spec.get("type")
    if kind == "tiling-grid":
        grid_id = spec.get("id")
        if not isinstance(grid_id, int) or grid_id not in GRIDS:
            raise PayloadError(f"Tiling grid with id {grid_id} does not exist.")
        resolution = spec.get("resolution")
        if (
            not isinstance(resolution, int | float)
            or float(resolution) not in GRIDS[grid_id].resolutions
        ):
            allowed = ", ".join(str(r) for r in GRIDS[grid_id].resolutions)
            raise PayloadError(
                f"Resolution {resolution} is not supported by tiling grid {grid_id};"
                f" supported: {allowed}."
            )
        for buffer in ("bufferX", "bufferY"):
            value = spec.get(buffer, 0)
            if not isinstance(value, int) or not 0 <= value <= 32767:
                raise PayloadError(f"Field 'input.{buffer}' must be a non-negative integer.")
        return grid_id
    if kind == "geopackage":
        _check_storage(spec.get("features"), "input.features", suffix=".gpkg")
        return None
    raise PayloadError("Field 'input.type' must be one of [tiling-grid, geopackage].")


def _check_process_request(
    spec: dict[str, Any], evalscript_in_part: bool, *, needs_bounds: bool
) -> list[dict[str, Any]]:
    if not evalscript_in_part and not isinstance(spec.get("evalscript"), str):
        raise PayloadError("Field 'processRequest.evalscript' is required.")
    input_spec = spec.get("input")
    if not isinstance(input_spec, dict):
        raise PayloadError("Field 'processRequest.input' is required.")
    bounds = input_spec.get("bounds")
    if bounds is None and needs_bounds:
        raise PayloadError("Bounds are required when using a tiling grid input.")
    if bounds is not None:
        bbox = bounds.get("bbox") if isinstance(bounds, dict) else None
        geometry = bounds.get("geometry") if isinstance(bounds, dict) else None
        if bbox is None and geometry is None:
            raise PayloadError("Field 'processRequest.input.bounds' needs a bbox or a geometry.")
        if bbox is not None and not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, int | float) for v in bbox)
            and bbox[0] < bbox[2]
            and bbox[1] < bbox[3]
        ):
            raise PayloadError(
                "Field 'processRequest.input.bounds.bbox' must be"
                " [minX, minY, maxX, maxY] with min < max."
            )
    data = input_spec.get("data")
    if (
        not isinstance(data, list)
        or not data
        or not all(isinstance(d, dict) and isinstance(d.get("type"), str) for d in data)
    ):
        raise PayloadError(
            "Field 'processRequest.input.data' must list at least one collection with a 'type'."
        )
    output = spec.get("output")
    responses = output.get("responses") if isinstance(output, dict) else None
    if not isinstance(responses, list) or not responses:
        raise PayloadError("Field 'processRequest.output.responses' must not be empty.")
    seen: set[str] = set()
    for response in responses:
        identifier = response.get("identifier") if isinstance(response, dict) else None
        fmt = response.get("format") if isinstance(response, dict) else None
        if not isinstance(identifier, str) or not identifier:
            raise PayloadError("Every output response needs an 'identifier'.")
        if identifier in seen:
            raise PayloadError(f"Output response identifier '{identifier}' is repeated.")
        seen.add(identifier)
        if not isinstance(fmt, dict) or fmt.get("type") not in _RESPONSE_FORMATS:
            raise PayloadError(
                f"Output response '{identifier}' has an unsupported format; use one of"
                f" {sorted(_RESPONSE_FORMATS)}."
            )
        for size_key in ("width", "height", "resx", "resy"):
            if size_key in (output or {}):
                raise PayloadError(
                    f"Field 'processRequest.output.{size_key}' is not allowed in"
                    " batch requests; the tile size comes from the grid."
                )
    return responses


def _check_output(spec: dict[str, Any], responses: list[dict[str, Any]], grid: int | None) -> None:
    kind = spec.get("type")
    url = _check_storage(spec.get("delivery"), "output.delivery")
    tokens = set(_PLACEHOLDER.findall(url))
    formats = {r["format"]["type"] for r in responses}
    if kind == "raster":
        if "zarr/array" in formats:
            raise PayloadError("Responses of a raster output cannot use the zarr/array format.")
        unknown = tokens - _RASTER_TOKENS
        if unknown:
            raise PayloadError(f"Unknown placeholder <{sorted(unknown)[0]}> in the delivery url.")
        if tokens and not tokens & {"tileName", "tileId"}:
            raise PayloadError("The delivery url template must contain <tileName> or <tileId>.")
        if tokens and len(responses) > 1 and "outputId" not in tokens:
            raise PayloadError(
                "The delivery url template must contain <outputId> when there are several outputs."
            )
        for flag in ("overwrite", "skipExisting", "cogOutput", "createCollection"):
            if not isinstance(spec.get(flag, False), bool):
                raise PayloadError(f"Field 'output.{flag}' must be a boolean.")
        return
    if kind == "zarr":
        if grid is not None and grid not in _ZARR_GRIDS:
            raise PayloadError("Zarr output is only supported on tiling grids 3, 6 and 7.")
        if formats != {"zarr/array"}:
            raise PayloadError("All responses of a zarr output must use the zarr/array format.")
        if tokens - {"requestId"}:
            raise PayloadError("A zarr delivery url may only contain the <requestId> placeholder.")
        group = spec.get("group")
        if not isinstance(group, dict) or group.get("zarr_format") != 2:
            raise PayloadError("Field 'output.group.zarr_format' must be 2.")
        _check_zarr_arrays(spec, responses)
        return
    raise PayloadError("Field 'output.type' must be one of [raster, zarr].")


def _check_zarr_arrays(spec: dict[str, Any], responses: list[dict[str, Any]]) -> None:
    params = spec.get("arrayParameters")
    overrides = spec.get("arrayOverrides") or {}
    if not isinstance(overrides, dict):
        raise PayloadError("Field 'output.arrayOverrides' must be an object.")
    for response in responses:
        merged = {**(params or {}), **(overrides.get(response["identifier"]) or {})}
        for key in ("dtype", "chunks", "fill_value"):
            if key not in merged:
                raise PayloadError(
                    f"Array '{response['identifier']}' has no '{key}' (set output.arrayParameters)."
                )
        chunks = merged["chunks"]
        if not (isinstance(chunks, list) and len(chunks) == 3 and chunks[0] == 1):
            raise PayloadError("Field 'chunks' must hold 3 integers, the first being 1.")
        if merged.get("order", "C") != "C":
            raise PayloadError("Field 'order' only supports 'C'.")


def _check_storage(spec: Any, where: str, *, suffix: str = "") -> str:
    if not isinstance(spec, dict):
        raise PayloadError(f"Field '{where}' is required.")
    if "s3" in spec and isinstance(spec["s3"], dict):
        s3 = spec["s3"]
        url = s3.get("url")
        if not isinstance(url, str) or not url.startswith("s3://") or len(url) <= len("s3://"):
            raise PayloadError(f"Field '{where}.s3.url' must be an s3:// url.")
        has_role = "iamRoleARN" in s3
        has_keys = "accessKey" in s3 or "secretAccessKey" in s3
        if has_role == has_keys:
            raise PayloadError(
                f"Field '{where}.s3' needs either 'iamRoleARN' or 'accessKey'"
                " and 'secretAccessKey'."
            )
        if has_keys and not ("accessKey" in s3 and "secretAccessKey" in s3):
            raise PayloadError(f"Field '{where}.s3' needs both 'accessKey' and 'secretAccessKey'.")
    elif "gs" in spec and isinstance(spec["gs"], dict):
        url = spec["gs"].get("url")
        if not isinstance(url, str) or not url.startswith("gs://"):
            raise PayloadError(f"Field '{where}.gs.url' must be a gs:// url.")
    else:
        raise PayloadError(f"Field '{where}' must hold an 's3' or 'gs' location.")
    if suffix and not url.endswith(suffix):
        raise PayloadError(f"Field '{where}' must point to a {suffix} file.")
    return url
