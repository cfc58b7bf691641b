"""Create-payload validation (batch-v2-api.md §5): seeds pass, known-bad payloads name the field."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from api_support import SEEDS, seed
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.api.errors import PayloadInvalid
from worker.api.models import CreatePayload, validate_create_payload

Mutation = Callable[[dict[str, Any]], None]


@pytest.mark.parametrize("name", SEEDS)
def test_the_documented_examples_pass_unchanged(name: str) -> None:
    payload = seed(name)

    sent = validate_create_payload(payload)

    assert sent == payload
    assert sent is not payload


def test_the_models_read_the_api_names() -> None:
    model = CreatePayload.model_validate(seed("seed_zarr_tiling_grid"))

    assert model.output.type == "zarr"
    assert model.output.array_overrides is not None
    assert model.output.array_overrides["maxNDVI"].fill_value == "NaN"
    assert model.process_request.input.data[0].data_filter is not None
    assert model.process_request.input.data[0].data_filter.max_cloud_coverage == 70


_json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
_json = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
_PLACES = (
    (),
    ("processRequest",),
    ("processRequest", "input", "data", 0, "dataFilter"),
    ("input",),
    ("output",),
    ("output", "delivery", "s3"),
)


@settings(max_examples=60, deadline=None)
@given(
    place=st.sampled_from(_PLACES),
    key=st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=3, max_size=10).map("x_".__add__),
    value=_json,
)
def test_unknown_fields_pass_through_untouched(
    place: tuple[Any, ...], key: str, value: Any
) -> None:
    payload = seed()
    target: Any = payload
    for step in place:
        target = target[step]
    target[key] = copy.deepcopy(value)

    assert validate_create_payload(payload) == payload


def _set(path: str, value: Any) -> Mutation:
    def mutate(payload: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = payload
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(last) if last.isdigit() else last] = value

    return mutate


def _drop(path: str) -> Mutation:
    def mutate(payload: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = payload
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        del target[last]

    return mutate


FILTER = "processRequest.input.data.0.dataFilter"
BAD: list[tuple[str, str, Mutation, str]] = [
    (
        "seed_tiff_tiling_grid",
        "s3 url scheme",
        _set("output.delivery.s3.url", "https://b/x"),
        "output.delivery.s3.url: must start with s3://",
    ),
    (
        "seed_tiff_tiling_grid",
        "no processRequest",
        _drop("processRequest"),
        "processRequest: Field required",
    ),
    (
        "seed_tiff_tiling_grid",
        "no evalscript",
        _drop("processRequest.evalscript"),
        "processRequest.evalscript: Field required",
    ),
    (
        "seed_tiff_tiling_grid",
        "unknown input type",
        _set("input.type", "tiles"),
        "input.type: must be geopackage or tiling-grid",
    ),
    (
        "seed_tiff_tiling_grid",
        "unknown output type",
        _set("output.type", "cog"),
        "output.type: must be raster or zarr",
    ),
    (
        "seed_tiff_tiling_grid",
        "resolution as text",
        _set("input.resolution", "60"),
        "input.resolution: Input should be a valid number",
    ),
    (
        "seed_tiff_tiling_grid",
        "negative buffer",
        _set("input.bufferX", -1),
        "input.bufferX: Input should be greater than or equal to 0",
    ),
    (
        "seed_tiff_tiling_grid",
        "date-only time",
        _set(f"{FILTER}.timeRange.from", "2019-04-01"),
        f"{FILTER.replace('.0.', '[0].')}.timeRange.from: must be a date-time",
    ),
    (
        "seed_tiff_tiling_grid",
        "cloud cover > 100",
        _set(f"{FILTER}.maxCloudCoverage", 150),
        "maxCloudCoverage: Input should be less than or equal to 100",
    ),
    (
        "seed_tiff_tiling_grid",
        "mosaicking order",
        _set(f"{FILTER}.mosaickingOrder", "newest"),
        "mosaickingOrder: Input should be",
    ),
    (
        "seed_tiff_tiling_grid",
        "bbox of 3",
        _set("processRequest.input.bounds.bbox", [1, 2, 3]),
        "processRequest.input.bounds.bbox: List should have at least 4 items",
    ),
    (
        "seed_tiff_tiling_grid",
        "bbox inverted",
        _set("processRequest.input.bounds.bbox", [9, 43, 8, 41]),
        "processRequest.input.bounds.bbox: must be [minx, miny, maxx, maxy]",
    ),
    (
        "seed_tiff_tiling_grid",
        "grid without bounds",
        _drop("processRequest.input.bounds"),
        "processRequest.input.bounds: required with a tiling-grid input",
    ),
    (
        "seed_tiff_tiling_grid",
        "no responses",
        _set("processRequest.output.responses", []),
        "processRequest.output.responses: List should have at least 1 item",
    ),
    (
        "seed_tiff_tiling_grid",
        "unknown format",
        _set("processRequest.output.responses.0.format.type", "image/png"),
        "processRequest.output.responses[0].format.type: Input should be",
    ),
    (
        "seed_tiff_tiling_grid",
        "key without secret",
        _set("output.delivery.s3", {"url": "s3://b", "accessKey": "k"}),
        "output.delivery.s3: accessKey and secretAccessKey go together",
    ),
    (
        "seed_tiff_tiling_grid",
        "no credentials",
        _set("output.delivery.s3", {"url": "s3://b"}),
        "output.delivery.s3: needs iamRoleARN or accessKey and secretAccessKey",
    ),
    (
        "seed_tiff_tiling_grid",
        "s3 and gs",
        _set("output.delivery.gs", {"url": "gs://b", "credentials": "e30="}),
        "output.delivery: needs exactly one of s3 or gs",
    ),
    (
        "seed_tiff_tiling_grid",
        "template without tile",
        _set("output.delivery.s3.url", "s3://b/<requestId>/x.tif"),
        "output.delivery.s3.url: a template needs <tileName> or <tileId>",
    ),
    (
        "seed_tiff_tiling_grid",
        "createCollection without COG",
        _set("output.createCollection", True),
        "output.createCollection: needs cogOutput true",
    ),
    (
        "seed_tiff_tiling_grid",
        "cogOutput as text",
        _set("output.cogOutput", "yes"),
        "output.cogOutput: Input should be a valid boolean",
    ),
    (
        "seed_tiff_tiling_grid",
        "raster of zarr arrays",
        _set("processRequest.output.responses.0.format.type", "zarr/array"),
        "zarr/array needs an output of type zarr",
    ),
    (
        "seed_zarr_tiling_grid",
        "zarr on a UTM grid",
        _set("input.id", 0),
        "input.id: zarr output supports tiling grids 3, 6 and 7 only",
    ),
    (
        "seed_zarr_tiling_grid",
        "zarr format 3",
        _set("output.group.zarr_format", 3),
        "output.group.zarr_format: Input should be 2",
    ),
    (
        "seed_zarr_tiling_grid",
        "first chunk not 1",
        _set("output.arrayParameters.chunks", [2, 1000, 1000]),
        "output.arrayParameters.chunks: must be 3 positive ints, the first one 1",
    ),
    (
        "seed_zarr_tiling_grid",
        "zarr with tiff",
        _set("processRequest.output.responses.0.format.type", "image/tiff"),
        "a zarr output needs zarr/array only",
    ),
    (
        "seed_zarr_tiling_grid",
        "override of nothing",
        _set("output.arrayOverrides.nope", {"dtype": "<f4"}),
        "output.arrayOverrides.nope: no response has this identifier",
    ),
    (
        "seed_zarr_tiling_grid",
        "no fill value",
        _drop("output.arrayParameters.fill_value"),
        "output.arrayParameters.fill_value: required for band04",
    ),
    (
        "seed_tiff_geopackage",
        "gpkg features not s3",
        _set("input.features.s3.url", "/tmp/f.gpkg"),
        "input.features.s3.url: must start with s3://",
    ),
    (
        "seed_tiff_geopackage",
        "feature too wide",
        _set("input.defaults", {"width": 4000}),
        "input.defaults.width: Input should be less than or equal to 3500",
    ),
]


@pytest.mark.parametrize(("name", "case", "mutate", "expected"), BAD, ids=[b[1] for b in BAD])
def test_known_bad_payloads_fail_naming_the_field(
    name: str, case: str, mutate: Mutation, expected: str
) -> None:
    payload = seed(name)
    mutate(payload)

    with pytest.raises(PayloadInvalid) as caught:
        validate_create_payload(payload)

    assert expected in caught.value.message
    assert caught.value.code == "INVALID_PAYLOAD"


def test_a_geopackage_input_needs_no_bounds() -> None:
    payload = seed("seed_tiff_geopackage")
    del payload["processRequest"]["input"]["bounds"]

    assert validate_create_payload(payload) == payload


def test_every_problem_is_named_at_once() -> None:
    payload = seed()
    payload["output"]["delivery"]["s3"]["url"] = "b"
    payload["input"]["resolution"] = -1

    with pytest.raises(PayloadInvalid) as caught:
        validate_create_payload(payload)

    assert "input.resolution" in caught.value.message
    assert "output.delivery.s3.url" in caught.value.message


@pytest.mark.parametrize("payload", [[], {"a": {1, 2}}, {"x": float("nan")}])
def test_what_is_not_a_json_object_is_refused(payload: Any) -> None:
    with pytest.raises(PayloadInvalid, match="payload: must be"):
        validate_create_payload(payload)
