"""The create payload (``BatchV2ProcessRequest``, batch-v2-api.md §5) and its local checks.

The models describe what the seed examples and the facts file use; unknown fields pass
through (``extra="allow"``), because the API grows faster than this client. Validation
catches what the API is known to reject, before a request is spent on it, and names the
field: ``output.delivery.s3.url: must start with s3://``. The payload that is sent is the
caller's own (a deep copy), never a re-serialisation, so nothing is reordered, coerced
or dropped.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from worker.api.errors import PayloadInvalid


class _Payload(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# --- processRequest (§5.1) ---------------------------------------------------------------


def _check_datetime(value: str) -> str:
    # §5.1: "date-only strings don't work"; the API wants a full date-time.
    if "T" not in value:
        raise ValueError("must be a date-time like 2019-04-01T00:00:00Z, not a date")
    try:
        datetime.fromisoformat(value)
    except ValueError:
        raise ValueError("must be an ISO 8601 date-time") from None
    return value


class TimeRange(_Payload):
    from_: str = Field(alias="from")
    to: str

    _dates = field_validator("from_", "to")(_check_datetime)

    @model_validator(mode="after")
    def _ordered(self) -> TimeRange:
        start = datetime.fromisoformat(self.from_)
        end = datetime.fromisoformat(self.to)
        if (start.tzinfo is None) == (end.tzinfo is None) and start > end:
            raise ValueError("'from' is after 'to'")
        return self


class DataFilter(_Payload):
    time_range: TimeRange | None = Field(default=None, alias="timeRange")
    max_cloud_coverage: StrictFloat | None = Field(
        default=None, alias="maxCloudCoverage", ge=0, le=100
    )
    mosaicking_order: Literal["mostRecent", "leastRecent", "leastCC"] | None = Field(
        default=None, alias="mosaickingOrder"
    )


class DataSource(_Payload):
    type: str = Field(min_length=1)
    data_filter: DataFilter | None = Field(default=None, alias="dataFilter")
    processing: dict[str, Any] | None = None


class ProcessBounds(_Payload):
    bbox: list[StrictFloat] | None = Field(default=None, min_length=4, max_length=4)
    geometry: dict[str, Any] | None = None
    properties: dict[str, Any] | None = None

    @field_validator("bbox")
    @classmethod
    def _bbox_order(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and not (value[0] < value[2] and value[1] < value[3]):
            raise ValueError("must be [minx, miny, maxx, maxy] with min < max")
        return value

    @field_validator("geometry")
    @classmethod
    def _polygon(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            if value.get("type") not in {"Polygon", "MultiPolygon"}:
                raise ValueError("must be a GeoJSON Polygon or MultiPolygon")
            if not isinstance(value.get("coordinates"), list):
                raise ValueError("must have coordinates")
        return value

    @model_validator(mode="after")
    def _some_area(self) -> ProcessBounds:
        if self.bbox is None and self.geometry is None:
            raise ValueError("needs a bbox or a geometry")
        return self


class ProcessInput(_Payload):
    bounds: ProcessBounds | None = None
    data: list[DataSource] = Field(min_length=1)


class ResponseFormat(_Payload):
    type: Literal["image/tiff", "application/json", "zarr/array"]


class ResponseSpec(_Payload):
    identifier: str = Field(min_length=1)
    format: ResponseFormat


class ProcessOutput(_Payload):
    responses: list[ResponseSpec] = Field(min_length=1)

    @field_validator("responses")
    @classmethod
    def _unique(cls, value: list[ResponseSpec]) -> list[ResponseSpec]:
        identifiers = [r.identifier for r in value]
        if len(set(identifiers)) != len(identifiers):
            raise ValueError("identifiers must be unique")
        return value


class ProcessRequest(_Payload):
    input: ProcessInput
    output: ProcessOutput
    evalscript: str = Field(min_length=1)


# --- object storage (§5.4) ---------------------------------------------------------------


class S3Location(_Payload):
    url: str
    iam_role_arn: str | None = Field(default=None, alias="iamRoleARN")
    access_key: str | None = Field(default=None, alias="accessKey")
    secret_access_key: str | None = Field(default=None, alias="secretAccessKey")
    region: str | None = None

    @field_validator("url")
    @classmethod
    def _s3_url(cls, value: str) -> str:
        if not value.startswith("s3://") or len(value) <= len("s3://"):
            raise ValueError("must start with s3:// and name a bucket")
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> S3Location:
        keys = (self.access_key is not None, self.secret_access_key is not None)
        if keys[0] != keys[1]:
            raise ValueError("accessKey and secretAccessKey go together")
        if self.iam_role_arn is not None and keys[0]:
            raise ValueError("give iamRoleARN or accessKey/secretAccessKey, not both")
        # V2 has no bucket-policy access (§5.4): the request must carry a way in.
        if self.iam_role_arn is None and not keys[0]:
            raise ValueError("needs iamRoleARN or accessKey and secretAccessKey")
        return self


class GcsLocation(_Payload):
    url: str
    credentials: str = Field(min_length=1)

    @field_validator("url")
    @classmethod
    def _gs_url(cls, value: str) -> str:
        if not value.startswith("gs://") or len(value) <= len("gs://"):
            raise ValueError("must start with gs:// and name a bucket")
        return value


class Delivery(_Payload):
    s3: S3Location | None = None
    gs: GcsLocation | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Delivery:
        if (self.s3 is None) == (self.gs is None):
            raise ValueError("needs exactly one of s3 or gs")
        return self

    @property
    def url(self) -> str:
        location = self.s3 or self.gs
        return location.url if location is not None else ""


# --- input (§5.2) --------------------------------------------------------------------------


class TilingGridInput(_Payload):
    type: Literal["tiling-grid"]
    id: StrictInt = Field(ge=0)
    resolution: StrictFloat = Field(gt=0)
    buffer_x: StrictInt | None = Field(default=None, alias="bufferX", ge=0, le=32767)
    buffer_y: StrictInt | None = Field(default=None, alias="bufferY", ge=0, le=32767)


class GeoPackageDefaults(_Payload):
    width: StrictInt | None = Field(default=None, ge=1, le=3500)
    height: StrictInt | None = Field(default=None, ge=1, le=3500)
    resolution: StrictFloat | None = Field(default=None, gt=0)


class GeoPackageInput(_Payload):
    type: Literal["geopackage"]
    features: Delivery
    defaults: GeoPackageDefaults | None = None


# --- output (§5.3) -------------------------------------------------------------------------


class CogParameters(_Payload):
    overview_levels: list[StrictInt] | None = Field(default=None, alias="overviewLevels")
    overview_min_size: StrictInt | None = Field(default=None, alias="overviewMinSize", ge=1)
    resampling_algorithm: (
        Literal[
            "nearest",
            "average",
            "gauss",
            "cubic",
            "cubicspline",
            "lanczos",
            "average_magphase",
            "mode",
        ]
        | None
    ) = Field(default=None, alias="resamplingAlgorithm")
    blockxsize: StrictInt | None = Field(default=None, ge=1)
    blockysize: StrictInt | None = Field(default=None, ge=1)
    use_predictor: StrictBool | None = Field(default=None, alias="usePredictor")


class RasterOutput(_Payload):
    type: Literal["raster"]
    delivery: Delivery
    overwrite: StrictBool | None = None
    skip_existing: StrictBool | None = Field(default=None, alias="skipExisting")
    cog_output: StrictBool | None = Field(default=None, alias="cogOutput")
    cog_parameters: CogParameters | None = Field(default=None, alias="cogParameters")
    create_collection: StrictBool | None = Field(default=None, alias="createCollection")
    collection_id: str | None = Field(default=None, alias="collectionId")


ZarrDtype = Literal["|u1", "|i1", "<u2", ">u2", "<i2", ">i2", "<f4", ">f4", "<f8", ">f8"]


class ZarrArrayParameters(_Payload):
    dtype: ZarrDtype | None = None
    order: Literal["C"] | None = None
    chunks: list[StrictInt] | None = Field(default=None, min_length=3, max_length=3)
    fill_value: Any = None
    compressor: dict[str, Any] | None = None

    @field_validator("chunks")
    @classmethod
    def _first_chunk(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (value[0] != 1 or min(value) < 1):
            raise ValueError("must be 3 positive ints, the first one 1")
        return value


class ZarrGroup(_Payload):
    zarr_format: Literal[2]


class ZarrOutput(_Payload):
    type: Literal["zarr"]
    delivery: Delivery
    group: ZarrGroup
    array_parameters: ZarrArrayParameters | None = Field(default=None, alias="arrayParameters")
    array_overrides: dict[str, ZarrArrayParameters] | None = Field(
        default=None, alias="arrayOverrides"
    )


InputSpec = Annotated[TilingGridInput | GeoPackageInput, Field(discriminator="type")]
OutputSpec = Annotated[RasterOutput | ZarrOutput, Field(discriminator="type")]


class CreatePayload(_Payload):
    """The body of ``POST /process``."""

    process_request: ProcessRequest = Field(alias="processRequest")
    input: InputSpec
    output: OutputSpec
    description: str | None = None
    instance_type: Literal["normal", "large"] | None = Field(default=None, alias="instanceType")


# --- cross-field rules ---------------------------------------------------------------------

_TEMPLATE_TOKENS = ("<requestId>", "<tileName>", "<tileId>", "<outputId>", "<format>")
_ZARR_GRIDS = frozenset({3, 6, 7})  # §5.3: WGS84 and the two LAEA grids only
_ZARR_RESERVED = (".zattrs", ".zgroup", ".zmetadata")


def _delivery_path(output: RasterOutput | ZarrOutput) -> str:
    return "output.delivery." + ("s3" if output.delivery.s3 is not None else "gs") + ".url"


def _raster_problems(payload: CreatePayload, output: RasterOutput) -> list[str]:
    problems: list[str] = []
    responses = payload.process_request.output.responses
    formats = [r.format.type for r in responses]
    if "zarr/array" in formats:
        problems.append("processRequest.output.responses: zarr/array needs an output of type zarr")
    if output.cog_output and any(f != "image/tiff" for f in formats):
        problems.append("output.cogOutput: every response must be image/tiff")
    if output.create_collection and not output.cog_output:
        problems.append("output.createCollection: needs cogOutput true")
    url = output.delivery.url
    # §5.3: a URL with placeholders is a template; it must place each tile (and output).
    if any(token in url for token in _TEMPLATE_TOKENS):
        if "<tileName>" not in url and "<tileId>" not in url:
            problems.append(f"{_delivery_path(output)}: a template needs <tileName> or <tileId>")
        if len(responses) > 1 and "<outputId>" not in url:
            problems.append(
                f"{_delivery_path(output)}: a template needs <outputId> with several responses"
            )
    return problems


def _zarr_problems(payload: CreatePayload, output: ZarrOutput) -> list[str]:
    problems: list[str] = []
    responses = payload.process_request.output.responses
    if any(r.format.type != "zarr/array" for r in responses):
        problems.append("processRequest.output.responses: a zarr output needs zarr/array only")
    if isinstance(payload.input, TilingGridInput) and payload.input.id not in _ZARR_GRIDS:
        problems.append("input.id: zarr output supports tiling grids 3, 6 and 7 only")
    if any(name in output.delivery.url for name in _ZARR_RESERVED):
        problems.append(f"{_delivery_path(output)}: must not name .zattrs/.zgroup/.zmetadata")
    overrides = output.array_overrides or {}
    identifiers = {r.identifier for r in responses}
    problems.extend(
        f"output.arrayOverrides.{name}: no response has this identifier"
        for name in overrides
        if name not in identifiers
    )
    for identifier in sorted(identifiers):
        override = overrides.get(identifier)
        base = output.array_parameters
        if base is None and override is None:
            problems.append(f"output.arrayParameters: required (no override for {identifier})")
        elif (override is None or override.fill_value is None) and (
            base is None or base.fill_value is None
        ):
            problems.append(f"output.arrayParameters.fill_value: required for {identifier}")
    return problems


def _cross_problems(payload: CreatePayload) -> list[str]:
    problems: list[str] = []
    if isinstance(payload.input, TilingGridInput) and payload.process_request.input.bounds is None:
        # §5.1: bounds are optional only for a GeoPackage input.
        problems.append("processRequest.input.bounds: required with a tiling-grid input")
    if isinstance(payload.output, RasterOutput):
        problems.extend(_raster_problems(payload, payload.output))
    else:
        problems.extend(_zarr_problems(payload, payload.output))
    return problems


# --- the entry point -----------------------------------------------------------------------

_UNION_TAGS = {"input": {"tiling-grid", "geopackage"}, "output": {"raster", "zarr"}}
_MAX_PROBLEMS = 10


def _path(loc: Sequence[int | str]) -> str:
    parts = list(loc)
    # A discriminated union puts the tag into the location; the JSON path has no such step.
    if len(parts) > 1 and isinstance(parts[0], str) and parts[1] in _UNION_TAGS.get(parts[0], ()):
        del parts[1]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "payload"


def _describe(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    if error["type"] in {"union_tag_invalid", "union_tag_not_found"} and loc:
        expected = " or ".join(sorted(_UNION_TAGS.get(str(loc[0]), ())))
        return f"{_path(loc)}.type: must be {expected}"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{_path(loc)}: {message}"


def validate_create_payload(payload: Mapping[str, Any]) -> dict[str, Any]:
    """Check a create payload; return the payload to send (a deep copy, unknown fields intact).

    Raises PayloadInvalid whose message names every field at fault (values are never
    quoted: a payload may carry S3 keys).
    """
    if not isinstance(payload, Mapping):
        raise PayloadInvalid("payload: must be a JSON object")
    try:
        json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError):
        raise PayloadInvalid(
            "payload: must be plain JSON (strings, numbers, lists, objects)"
        ) from None
    try:
        model = CreatePayload.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False, include_context=False)
        problems = [_describe(error) for error in errors]
    else:
        problems = _cross_problems(model)
    if problems:
        shown = problems[:_MAX_PROBLEMS]
        if len(problems) > _MAX_PROBLEMS:
            shown.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
        raise PayloadInvalid("; ".join(shown))
    return copy.deepcopy(dict(payload))
