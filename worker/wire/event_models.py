"""The events' shapes: CloudEvents 1.0 in structured JSON, as the contract describes them.

``worker.wire.events`` builds these; the JSON Schemas (``worker.wire.schemas``) are made
from them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)
from pydantic.json_schema import SkipJsonSchema

from worker.wire.job_requests import JOB_ID_PATTERN, Action

# ------------------------------------------------------------------------------------------
# What leaves: CloudEvents 1.0, structured JSON (CONTRACT.md "Events")
# ------------------------------------------------------------------------------------------

JOB_STATUS = "batchworker.job.status"
JOB_PROGRESS = "batchworker.job.progress"
COMMAND_ACCEPTED = "batchworker.command.accepted"
COMMAND_REJECTED = "batchworker.command.rejected"

WORKER_DESCRIPTION = (
    "The worker process that published the event: its WORKER_NAME (the pod name under the"
    " Helm chart, else host name, pid and a random part), so two processes on one host"
    " differ. The event's source is the fleet's, whichever process publishes it."
)
EVENT_TYPES = (COMMAND_ACCEPTED, COMMAND_REJECTED, JOB_STATUS, JOB_PROGRESS)
RFC3339_MS_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"


def _omitted_when_absent(schema: dict[str, Any]) -> None:
    # Such a field is left out of the JSON when unset, never written as null.
    schema.pop("default", None)


class _Wire(BaseModel):
    # Consumers must tolerate fields added later, so the schemas stay open.
    model_config = ConfigDict(extra="allow", frozen=True)


class TilesData(_Wire):
    """Tile counts from the delivery bucket; the whole object is null when unreadable."""

    total: int | None = Field(description="Distinct features in the feature manifest.")
    processed: int = Field(ge=0, description="DONE rows of the execution database.")
    failed: int = Field(ge=0, description="FATAL rows of the execution database.")


class CostForecastData(_Wire):
    """How ``cost_forecast_pu`` was made."""

    method: Literal["linear", "minimum_charge", "manifest"] = Field(
        description=(
            "linear: costPU over completionPercentage, once enough is done;"
            " minimum_charge: the 100 PU minimum of a batch request (a lower bound);"
            " manifest: the documented PU rules at their cheapest over the feature"
            " manifest's sizes (a lower bound)."
        )
    )
    at_completion: float = Field(
        ge=0, le=100, description="The completionPercentage it was made at (0 for a bound)."
    )


class ErrorData(_Wire):
    source: Literal["worker", "api"]
    http_status: int | None
    code: str
    message: str


class BatchRequestData(_Wire):
    """One batch request of the job: the first (attempt 0) or a follow-up."""

    batch_request_id: str
    attempt: int = Field(ge=0, description="0: the first request; n: the n-th follow-up.")
    status: str | None = Field(description="Its last status read.")
    cost_pu: float = Field(description="Its own costPU.")
    features: int | None = Field(
        description="FATAL features of the request before it that it re-runs (null: the first)."
    )
    processed: int = Field(ge=0, description="Its DONE features.")
    failed: int = Field(ge=0, description="Its features not DONE: FATAL (or not yet run).")


class JobEventData(_Wire):
    job_id: str = Field(pattern=JOB_ID_PATTERN)
    batch_request_id: str | None
    status: str = Field(
        pattern=r"^[A-Z][A-Z0-9_]*$",
        description="The API's batch status; statuses the API adds later pass through.",
    )
    sequence: int = Field(
        ge=1, description="Rises per job; drop an event at or below the last seen."
    )
    completion_percentage: float
    tiles: TilesData | None
    cost_pu: float | None
    stopped_reason: str | None = Field(
        description="With STOPPED: USER_ACTION, OUT_OF_PU, UNHEALTHY, DEADLINE, COST_LIMIT,"
        " COST_FORECAST; with PAUSED: the API's stop it paused on (UNHEALTHY, OUT_OF_PU)."
    )
    error: ErrorData | None
    worker: str = Field(description=WORKER_DESCRIPTION)
    # Always sent; optional in the schema because the contract's v1 example predates them.
    final: bool = Field(
        default=False,
        description="True on the job's one terminal status event (DONE, FAILED, STOPPED);"
        " false on every other, a PAUSED one included.",
    )
    resume_at: str | None = Field(
        default=None,
        pattern=RFC3339_MS_PATTERN,
        description="With PAUSED: when the worker STARTs the batch request again; null:"
        " parked until a resume command.",
    )
    resumes: int = Field(
        default=0, ge=0, description="STARTs the worker sent after stops it paused on."
    )
    duplicates_stopped: list[str] = Field(
        default_factory=list,
        description="Extension: duplicate batch requests of this job the worker stopped.",
    )
    attempt: int = Field(
        default=0,
        ge=0,
        description="Extension: the attempt batch_request_id is (0: the first request, n: the"
        " n-th follow-up over FATAL features, retry_failed).",
    )
    batch_requests: list[BatchRequestData] = Field(
        default_factory=list,
        description="Extension: every batch request of the job so far, first to current.",
    )
    retry_skipped: ErrorData | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_omitted_when_absent,
        description="Extension: why a follow-up that was due was not made (the job ended as"
        " it would have without retry_failed). Left out when there is none.",
    )
    tenant: str | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_omitted_when_absent,
        description='The job\'s tenant (docs/contract.md "Tenancy"); absent when it has none.',
    )
    # Always sent (null until one is made); optional in the schema, added after v1.
    cost_forecast_pu: float | None = Field(
        default=None,
        description="Extension: the worker's forecast of the final costPU; null until made.",
    )
    cost_forecast: CostForecastData | None = Field(
        default=None, description="Extension: how cost_forecast_pu was made; null with it."
    )


class CommandEventData(_Wire):
    job_id: str | None = Field(description="Null when the message had no usable job_id.")
    action: Action | None
    code: str | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_omitted_when_absent,
        description="Rejections only: why (e.g. MALFORMED_JSON, JOB_CONFLICT).",
    )
    message: str | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_omitted_when_absent,
        description="Rejections only: what was wrong, naming the field.",
    )
    worker: str = Field(description=WORKER_DESCRIPTION)
    tenant: str | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_omitted_when_absent,
        description="The sender's tenant, when the message named one it could be read with.",
    )


class _CloudEvent(_Wire):
    specversion: Literal["1.0"]
    id: str = Field(description="Stable for a re-published event: de-duplicate on it.")
    source: str = Field(pattern=r"^/batch-worker/[A-Za-z0-9][A-Za-z0-9_-]*$")
    time: str = Field(pattern=RFC3339_MS_PATTERN)
    datacontenttype: Literal["application/json"]
    correlationid: str | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_omitted_when_absent,
        description="Extension: the request message's correlation_id.",
    )
    causationid: str | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_omitted_when_absent,
        description="Extension: the request message's message_id.",
    )


class JobEvent(_CloudEvent):
    """batchworker.job.status (routing key job.<status lower>) or .progress (job.progress)."""

    model_config = ConfigDict(title="JobEvent")
    type: Literal["batchworker.job.status", "batchworker.job.progress"]
    subject: str = Field(pattern=JOB_ID_PATTERN, description="The job_id.")
    data: JobEventData


class CommandEvent(_CloudEvent):
    """batchworker.command.accepted / .rejected (routing key command.accepted / .rejected)."""

    model_config = ConfigDict(
        title="CommandEvent",
        json_schema_extra={
            "if": {"properties": {"type": {"const": COMMAND_REJECTED}}},
            "then": {"properties": {"data": {"required": ["code", "message"]}}},
        },
    )
    type: Literal["batchworker.command.accepted", "batchworker.command.rejected"]
    subject: str | SkipJsonSchema[None] = Field(
        default=None,
        json_schema_extra=_omitted_when_absent,
        description="The job_id, when one could be read.",
    )
    data: CommandEventData
