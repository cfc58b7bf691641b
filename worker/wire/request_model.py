"""A job request as the contract defines it: the model and the rejection codes.

The decisions it makes where the contract leaves them open are listed in job_requests.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator
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


# Batch V2 request ids are UUIDs (batch-v2-api.md); any case, the canonical 8-4-4-4-12 form.
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


_UUID_RE = re.compile(UUID_PATTERN)


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
