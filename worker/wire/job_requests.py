"""Job requests: what arrives on the jobs queue, parsed, validated and hashed.

``parse_job_request`` turns a message body into a ``JobRequest`` or a ``Rejection`` (never an
exception). ``request_hash`` and ``same_request`` tell an idempotent re-submit from a conflict.

Decisions the contract leaves open (documented in docs/events.md and the schemas):

- ``start``, ``cancel`` and ``resume`` carry only ``job_id``: the submit-only fields
  (``request``, ``batch_request_id``, ``auto_start``, ``deadline``, ``max_cost_pu``,
  ``resume_on``, ``cost_guard``) are ignored on them,
  not validated, so a cancel is never refused for what it did not need.
- ``request: null`` and ``batch_request_id: null`` count as absent.
- ``Rejection.action`` is only ever a known action (or None): it becomes a metric label.
- Limits (docs/events.md): a body of at most ``MAX_REQUEST_BYTES`` (``REQUEST_TOO_LARGE``,
  refused before it is parsed, so a huge body costs no memory), nesting at most
  ``MAX_DEPTH`` deep (``REQUEST_TOO_DEEP``); ``batch_request_id`` a UUID (the API's ids:
  ``.`` or ``..`` would be a path); no NUL character in any string (PostgreSQL cannot store
  one); a deadline whose instant exists (an offset that moves it past year 9999 does not).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, get_args

import orjson
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from worker.lifecycle import CostGuard
from worker.lifecycle.resume_rules import ResumeOn
from worker.settings import TENANT_PATTERN

SCHEMA_VERSION = 1
JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
Action = Literal["submit", "start", "cancel", "resume"]
ACTIONS: tuple[Action, ...] = get_args(Action)
COMMANDS = ("start", "cancel", "resume")  # the actions on a job that exists
SUBMIT_ONLY_FIELDS = (
    "request",
    "batch_request_id",
    "auto_start",
    "deadline",
    "max_cost_pu",
    "retry_failed",
    "resume_on",
    "cost_guard",
)
_JOB_ID_RE = re.compile(JOB_ID_PATTERN)
# Batch V2 request ids are UUIDs (batch-v2-api.md); any case, the canonical 8-4-4-4-12 form.
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_UUID_RE = re.compile(UUID_PATTERN)
# A create payload is a few KiB (its evalscript the most of it); 256 KiB leaves room for a
# long evalscript and inline geometry, and bounds what one message may cost to parse.
MAX_REQUEST_BYTES = 256 * 1024
# Objects and arrays inside one another, counting the message itself as depth 1.
MAX_DEPTH = 32


class RejectCode(StrEnum):
    MALFORMED_JSON = "MALFORMED_JSON"
    NOT_AN_OBJECT = "NOT_AN_OBJECT"
    INVALID_JOB_ID = "INVALID_JOB_ID"
    UNKNOWN_ACTION = "UNKNOWN_ACTION"
    MISSING_REQUEST = "MISSING_REQUEST"
    CONFLICTING_FIELDS = "CONFLICTING_FIELDS"
    UNSUPPORTED_SCHEMA_VERSION = "UNSUPPORTED_SCHEMA_VERSION"
    INVALID_FIELD = "INVALID_FIELD"
    UNSUPPORTED_CONTENT_TYPE = "UNSUPPORTED_CONTENT_TYPE"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    REQUEST_TOO_DEEP = "REQUEST_TOO_DEEP"
    # the AMQP properties or headers (worker/wire/properties.py)
    INVALID_PROPERTY = "INVALID_PROPERTY"
    INVALID_REPLY_TO = "INVALID_REPLY_TO"
    # raised by intake after looking the job up
    JOB_CONFLICT = "JOB_CONFLICT"
    JOB_NOT_FOUND = "JOB_NOT_FOUND"
    # tenancy (docs/contract.md "Tenancy"), also decided after the lookup
    ADOPTION_REFUSED = "ADOPTION_REFUSED"
    NOT_JOB_OWNER = "NOT_JOB_OWNER"
    UNKNOWN_TENANT = "UNKNOWN_TENANT"
    TENANT_REQUIRED = "TENANT_REQUIRED"
    TENANT_MISMATCH = "TENANT_MISMATCH"
    # intake's last resort: the message provoked a bug; it is dead-lettered, not retried
    INTERNAL_ERROR = "INTERNAL_ERROR"


@dataclass(frozen=True)
class Rejection:
    """Why a message could not be used. ``message`` names the field, never a value."""

    code: str
    message: str
    job_id: str | None = None
    action: str | None = None


_SUBMIT_NEEDS_ONE_SOURCE: dict[str, Any] = {
    # A submit names exactly one of `request` / `batch_request_id` (null counts as absent);
    # start and cancel ignore both.
    "if": {
        "not": {
            "required": ["action"],
            "properties": {"action": {"enum": list(COMMANDS)}},
        }
    },
    "then": {
        "oneOf": [
            {"required": ["request"], "properties": {"request": {"type": "object"}}},
            {
                "required": ["batch_request_id"],
                "properties": {"batch_request_id": {"type": "string"}},
            },
        ]
    },
}


class JobRequest(BaseModel):
    """A job request (CONTRACT.md "Job requests"). Unknown top-level fields are ignored."""

    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        frozen=True,
        title="JobRequest",
        json_schema_extra=_SUBMIT_NEEDS_ONE_SOURCE,
    )

    schema_version: int = Field(
        default=SCHEMA_VERSION,
        ge=1,
        le=SCHEMA_VERSION,
        description="Versions above what the worker knows are rejected.",
    )
    job_id: str = Field(
        pattern=JOB_ID_PATTERN, description="The producer's key for the job within its fleet."
    )
    action: Action = "submit"
    tenant: str | None = Field(
        default=None,
        pattern=TENANT_PATTERN,
        description=(
            'Who sends it (docs/contract.md "Tenancy"): owns the job a submit creates;'
            " checked against TENANTS when set."
        ),
    )
    request: dict[str, Any] | None = Field(
        default=None,
        description="A Batch V2 create payload, as the API takes it.",
    )
    batch_request_id: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="An existing batch request to adopt instead of creating one: its id, a UUID.",
        # Checked after the one-source rule (a conflict is told as one), see below.
        json_schema_extra={"pattern": UUID_PATTERN},
    )
    auto_start: bool = Field(
        default=True, description="false: the job rests at ANALYSIS_DONE until start/cancel."
    )
    deadline: AwareDatetime | None = Field(
        default=None,
        strict=False,
        description="RFC 3339 with a time zone; past it the worker stops the batch request.",
    )
    max_cost_pu: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="Cap on costPU; above it the worker stops the batch request.",
    )
    retry_failed: int | None = Field(
        default=None,
        ge=0,
        le=10,
        description=(
            "Follow-up batch requests over the features that ended FATAL, at most this many"
            " (one per attempt); unset: the fleet's RETRY_FAILED (default 0)."
        ),
    )
    resume_on: ResumeOn | None = Field(
        default=None,
        strict=False,
        description="Stops of the API that pause the job instead of ending it (UNHEALTHY:"
        " attempts; OUT_OF_PU: until a date or a resume); absent: the fleet's RESUME_ON.",
    )
    cost_guard: CostGuard | None = Field(
        default=None,
        description=(
            "What max_cost_pu is held to: 'spent' stops once costPU exceeds it (COST_LIMIT);"
            " 'forecast' also stops once the cost forecast from progress exceeds it and the"
            " fleet's margin (COST_FORECAST), and an auto_start job then rests at"
            " ANALYSIS_DONE when a lower bound of its cost already exceeds it. Absent: the"
            " fleet's COST_GUARD."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _start_and_cancel_carry_only_job_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("action") in COMMANDS:
            return {k: v for k, v in data.items() if k not in SUBMIT_ONLY_FIELDS}
        return data

    @field_validator("deadline", mode="before")
    @classmethod
    def _deadline_is_text(cls, value: Any) -> Any:
        # Lax datetime parsing would take a bare number as Unix time; the contract says RFC 3339.
        if value is not None and not isinstance(value, str | datetime):
            raise PydanticCustomError("datetime_type", "must be an RFC 3339 date-time string")
        return value

    @field_validator("deadline", mode="after")
    @classmethod
    def _deadline_is_an_instant(cls, value: datetime | None) -> datetime | None:
        # "9999-12-31T23:59:59-23:59" parses, but its instant is past what a datetime holds.
        if value is not None:
            try:
                value.astimezone(UTC)
            except (OverflowError, ValueError):
                raise PydanticCustomError(
                    "datetime_range", "the instant is out of range (years 1-9999 in UTC)"
                ) from None
        return value

    @model_validator(mode="after")
    def _one_source_per_submit(self) -> JobRequest:
        if self.action != "submit":
            return self
        if self.request is not None and self.batch_request_id is not None:
            raise PydanticCustomError(
                "conflicting_fields", "give either 'request' or 'batch_request_id', not both"
            )
        if self.request is None and self.batch_request_id is None:
            raise PydanticCustomError(
                "missing_request", "a submit needs 'request' (or 'batch_request_id')"
            )
        if self.batch_request_id is not None and not _UUID_RE.fullmatch(self.batch_request_id):
            raise PydanticCustomError(
                "batch_request_id", "field 'batch_request_id': must be a batch request id (a UUID)"
            )
        return self


_TENANT_RE = re.compile(TENANT_PATTERN)


def valid_tenant(name: str) -> str:
    """``name`` if it can be a tenant's name (a ``user_id`` taken as one), else ValueError."""
    if not _TENANT_RE.fullmatch(name):
        raise ValueError("not a tenant name")
    return name


def parse_job_request(body: bytes, content_type: str | None) -> JobRequest | Rejection:
    """Read one message body. UTF-8 JSON; ``application/json`` or no content type at all."""
    if len(body) > MAX_REQUEST_BYTES:
        return Rejection(
            RejectCode.REQUEST_TOO_LARGE,
            f"the body is {len(body)} bytes; at most {MAX_REQUEST_BYTES} are taken",
        )
    req = _parse_quickly(body, content_type)
    if not isinstance(req, JobRequest):
        return req
    if _too_deep(req.request, MAX_DEPTH - 1):
        return Rejection(
            RejectCode.REQUEST_TOO_DEEP,
            f"field 'request': nested deeper than {MAX_DEPTH} levels",
            req.job_id,
            req.action,
        )
    if _SURROGATE_ESCAPE.search(body):
        where = _not_text(req, _has_lone_surrogate)
        if where is not None:
            return Rejection(
                RejectCode.INVALID_FIELD,
                f"field '{where}': a string holds a lone UTF-16 surrogate, which is not text",
                req.job_id,
                req.action,
            )
    if _NUL_ESCAPE in body:
        where = _not_text(req, _has_nul)
        if where is not None:
            return Rejection(
                RejectCode.INVALID_FIELD,
                f"field '{where}': a string holds a NUL character (\\u0000), which cannot be"
                " stored",
                req.job_id,
                req.action,
            )
    return req


def _too_deep(value: Any, room: int) -> bool:
    """Whether ``value`` nests objects or arrays more than ``room`` levels deep."""
    if isinstance(value, dict):
        return room <= 0 or any(_too_deep(v, room - 1) for v in value.values())
    if isinstance(value, list):
        return room <= 0 or any(_too_deep(v, room - 1) for v in value)
    return False


def _parse_quickly(body: bytes, content_type: str | None) -> JobRequest | Rejection:
    if _is_json_content_type(content_type) and not any(c in body for c in _NOT_JSON_CONSTANTS):
        # The usual case, a valid request, validated straight from the bytes: half the cost
        # of json.loads + model_validate. Whatever this refuses is read again below, so
        # every rejection (its code, message, job id) is the one the full reading gives.
        with suppress(ValidationError):
            return JobRequest.model_validate_json(body)
    return _parse_fully(body, content_type)


# JSON lets a string escape half of a UTF-16 pair ("\ud800") and both parsers take it, but
# such a string is not text: it cannot be stored (PostgreSQL refuses it), hashed or sent
# on as UTF-8. Only a body with such an escape (pairs included) is looked through.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


# JSON can escape NUL in a string, and both parsers take it, but PostgreSQL's text and jsonb
# cannot hold it (an INTERNAL_ERROR before). A raw NUL byte is not JSON at all; only the
# escape can bring one in.
_NUL_ESCAPE = rb"\u0000"


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _has_nul(text: str) -> bool:
    return "\x00" in text


def _not_text(req: JobRequest, bad: Callable[[str], bool]) -> str | None:
    """The first field holding a string (or key) that ``bad`` finds, if any."""

    def holds_one(value: Any) -> bool:
        if isinstance(value, str):
            return bad(value)
        if isinstance(value, dict):
            return any(holds_one(k) or holds_one(v) for k, v in value.items())
        if isinstance(value, list):
            return any(holds_one(v) for v in value)
        return False

    for field in ("request", "batch_request_id"):
        if holds_one(getattr(req, field)):
            return field
    return None


def _parse_fully(body: bytes, content_type: str | None) -> JobRequest | Rejection:
    try:
        data = json.loads(body.decode("utf-8-sig"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        return Rejection(RejectCode.MALFORMED_JSON, "the body is not UTF-8 JSON")
    except RecursionError:
        return Rejection(RejectCode.REQUEST_TOO_DEEP, f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        return Rejection(RejectCode.NOT_AN_OBJECT, "the body is JSON but not an object")

    job_id = _readable_job_id(data.get("job_id"))
    raw_action = data.get("action", "submit")
    action = raw_action if raw_action in ACTIONS else None
    if not _is_json_content_type(content_type):
        return Rejection(
            RejectCode.UNSUPPORTED_CONTENT_TYPE,
            "content_type must be application/json (UTF-8) or absent",
            job_id,
            action,
        )
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        code, message = _first_problem(exc)
        return Rejection(code, message, job_id, action)


# The request hash is stored with each job, so its bytes are for good. Version 1 hashed
# json.dumps' text; version 2 (prefixed) hashes orjson's, a fifth of the cost on intake's hot
# path. A job stored with a version-1 hash is compared in version 1 (``same_request``).
REQUEST_HASH_V2 = "v2:"


def request_hash(req: JobRequest) -> str:
    """What makes a submit "the same request" for an idempotent re-submit: ``v2:`` and the
    SHA-256 (hex) of its defining fields as orjson writes them, keys sorted. A request
    orjson cannot write (an integer beyond 64 bits) is hashed as version 1."""
    canonical = _defining_fields(req)
    try:
        data = orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return request_hash_v1(req)
    return REQUEST_HASH_V2 + hashlib.sha256(data).hexdigest()


def request_hash_v1(req: JobRequest) -> str:
    """Version 1: the SHA-256 (hex, no prefix) of json.dumps' text, keys sorted."""
    text = json.dumps(
        _defining_fields(req), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def same_request(stored: str, req: JobRequest, digest: str) -> bool:
    """Whether ``req`` (whose ``request_hash`` is ``digest``) is the request hashed as
    ``stored``, whichever version that was written in."""
    if stored.startswith(REQUEST_HASH_V2) == digest.startswith(REQUEST_HASH_V2):
        return stored == digest
    return stored == request_hash_v1(req)


def _defining_fields(req: JobRequest) -> dict[str, Any]:
    deadline = (
        req.deadline.astimezone(UTC).isoformat().replace("+00:00", "Z") if req.deadline else None
    )
    fields: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "request": req.request,
        "batch_request_id": req.batch_request_id,
        "auto_start": req.auto_start,
        "deadline": deadline,
        "max_cost_pu": req.max_cost_pu,
        # Only when given: the hash of every job stored before the field existed holds.
        **({"retry_failed": req.retry_failed} if req.retry_failed is not None else {}),
    }
    if req.resume_on is not None:
        # Only when given, so the hashes stored before resume_on existed still match.
        fields["resume_on"] = req.resume_on.model_dump(mode="json", exclude_none=True)
    # Only when given: the hashes stored before the field existed stay what they were.
    if req.cost_guard is not None:
        fields["cost_guard"] = req.cost_guard
    return fields


# pydantic's JSON parser takes these constants, which the contract refuses (json.loads
# below is told to reject them): a body holding them anywhere takes the full reading.
_NOT_JSON_CONSTANTS = (b"NaN", b"Infinity")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _readable_job_id(value: Any) -> str | None:
    """The job id for a rejection, only when it is one: it goes into events and logs."""
    return value if isinstance(value, str) and _JOB_ID_RE.fullmatch(value) else None


@functools.lru_cache(maxsize=64)  # producers send one or two content types
def _is_json_content_type(content_type: str | None) -> bool:
    if not content_type or not content_type.strip():
        return True
    mime, *params = (part.strip().lower() for part in content_type.split(";"))
    if mime != "application/json":
        return False
    for param in params:
        key, _, value = param.partition("=")
        if key.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


# Pydantic error → rejection code; the first matching rule in this order wins.
def _first_problem(exc: ValidationError) -> tuple[RejectCode, str]:
    errors = exc.errors(include_input=False, include_url=False, include_context=False)

    def field(err: Any) -> str:
        return str(err["loc"][0]) if err["loc"] else ""

    rules: list[tuple[RejectCode, Any]] = [
        (RejectCode.INVALID_JOB_ID, lambda e: field(e) == "job_id"),
        (
            RejectCode.UNSUPPORTED_SCHEMA_VERSION,
            lambda e: field(e) == "schema_version" and e["type"] == "less_than_equal",
        ),
        (RejectCode.UNKNOWN_ACTION, lambda e: field(e) == "action"),
        (RejectCode.CONFLICTING_FIELDS, lambda e: e["type"] == "conflicting_fields"),
        (RejectCode.MISSING_REQUEST, lambda e: e["type"] == "missing_request"),
        (RejectCode.INVALID_FIELD, lambda e: e["type"] == "batch_request_id"),
        (RejectCode.INVALID_FIELD, lambda e: True),
    ]
    for code, matches in rules:
        for err in errors:
            if matches(err):
                name = field(err)
                return code, (f"field '{name}': {err['msg']}" if name else err["msg"])
    raise AssertionError("a ValidationError without errors")  # pragma: no cover
