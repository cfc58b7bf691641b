"""What the Batch V2 API answers (batch-v2-api.md §2, §4, §7, §9), as plain pydantic models.

The API's own JSON names are the aliases, so the simulator can build its answers with
``model_dump(by_alias=True)``. Unknown keys are kept (``extra="allow"``): the API grows.
The create payload's models live in ``payload`` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from worker.api.payload import (
    CogParameters,
    CreatePayload,
    DataFilter,
    DataSource,
    Delivery,
    GcsLocation,
    GeoPackageDefaults,
    GeoPackageInput,
    ProcessBounds,
    ProcessInput,
    ProcessOutput,
    ProcessRequest,
    RasterOutput,
    ResponseFormat,
    ResponseSpec,
    S3Location,
    TilingGridInput,
    TimeRange,
    ZarrArrayParameters,
    ZarrGroup,
    ZarrOutput,
    validate_create_payload,
)

__all__ = [
    "CogParameters",
    "CreatePayload",
    "DataFilter",
    "DataSource",
    "Delivery",
    "ErrorBody",
    "ErrorEnvelope",
    "GcsLocation",
    "GeoPackageDefaults",
    "GeoPackageInput",
    "Links",
    "ListedPage",
    "ListedTask",
    "Page",
    "ProcessBounds",
    "ProcessInput",
    "ProcessOutput",
    "ProcessRequest",
    "RasterOutput",
    "ResponseFormat",
    "ResponseSpec",
    "S3Location",
    "Task",
    "TaskList",
    "TaskStatus",
    "TilingGrid",
    "TilingGridInput",
    "TilingGridList",
    "TimeRange",
    "TokenResponse",
    "ZarrArrayParameters",
    "ZarrGroup",
    "ZarrOutput",
    "parse_error_body",
    "validate_create_payload",
]


class _ApiModel(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class Task(_ApiModel):
    """A ``BatchV2ProcessTask`` (§4). ``request`` stays a plain dict: reads must be cheap."""

    id: str
    request: dict[str, Any] = Field(default_factory=dict)
    status: str
    user_action: str | None = Field(default=None, alias="userAction")
    user_action_updated: datetime | None = Field(default=None, alias="userActionUpdated")
    created: datetime | None = None
    last_updated: datetime | None = Field(default=None, alias="lastUpdated")
    completion_percentage: float = Field(default=0, alias="completionPercentage")
    cost_pu: float = Field(default=0, alias="costPU")
    stopped_status_reason: str | None = Field(default=None, alias="stoppedStatusReason")
    error: str | None = None

    @property
    def description(self) -> str | None:
        value = self.request.get("description")
        return value if isinstance(value, str) else None


class TaskStatus(Protocol):
    """What status reading needs of a task: a full ``Task`` or a ``ListedTask``."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def created(self) -> datetime | None: ...
    @property
    def completion_percentage(self) -> float: ...
    @property
    def cost_pu(self) -> float: ...
    @property
    def user_action(self) -> str | None: ...
    @property
    def stopped_status_reason(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def description(self) -> str | None: ...


class _ListedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    description: Any = None


class ListedTask(BaseModel):
    """A task of a list page, reduced to what status reading needs.

    Validated straight from the page's JSON bytes: every other key, the echoed request
    above all (most of a page), is parsed but never becomes a Python object. With 10,000
    jobs a status round reads ~100 pages of 100 tasks, and building each full ``Task``
    (request dict included) was most of the poller's CPU per page.
    """

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    id: str
    status: str
    created: datetime | None = None
    completion_percentage: float = Field(default=0, alias="completionPercentage")
    cost_pu: float = Field(default=0, alias="costPU")
    user_action: str | None = Field(default=None, alias="userAction")
    stopped_status_reason: str | None = Field(default=None, alias="stoppedStatusReason")
    error: str | None = None
    request: _ListedRequest = Field(default_factory=_ListedRequest)

    @property
    def description(self) -> str | None:
        value = self.request.description
        return value if isinstance(value, str) else None


class ListedPage(BaseModel):
    """A ``GET /process`` answer in its usual shape, for ``ListedTask``s."""

    model_config = ConfigDict(extra="ignore")

    data: list[ListedTask]
    links: Any = None


@dataclass(frozen=True)
class Page:
    """One page of ``GET /process``: its tasks and the token of the next page, if any."""

    tasks: Sequence[TaskStatus]
    next_token: str | None = None


class TilingGrid(_ApiModel):
    """A ``BatchV2TilingGridDescriptor`` (§7.2)."""

    id: int
    name: str
    properties: dict[str, Any] = Field(default_factory=dict)


class Links(_ApiModel):
    """The ``View`` of a paged list (§2.1)."""

    current_token: str | None = Field(default=None, alias="currentToken")
    next_token: str | None = Field(default=None, alias="nextToken")
    previous_token: str | None = Field(default=None, alias="previousToken")
    self_url: str | None = Field(default=None, alias="@id")
    next: str | None = None
    previous: str | None = None


class TaskList(_ApiModel):
    data: list[Task]
    links: Links = Field(default_factory=Links)


class TilingGridList(_ApiModel):
    data: list[TilingGrid]
    links: Links = Field(default_factory=Links)


class ErrorBody(_ApiModel):
    """The API's error object (``Boom``, §9.1)."""

    status: int | None = None
    reason: str | None = None
    message: str = ""
    code: str = ""
    errors: Any = None


class ErrorEnvelope(_ApiModel):
    """``{"error": {...}}``: how 400/404/409/5xx answers are wrapped (§9.1)."""

    error: ErrorBody


class TokenResponse(_ApiModel):
    """The token endpoint's answer (§12)."""

    access_token: str
    expires_in: float | None = None
    token_type: str = "Bearer"  # noqa: S105 (the scheme's name, not a credential)


def parse_error_body(body: Any) -> ErrorBody | None:
    """The error object of a response body in either shape (wrapped or bare), or None."""
    if not isinstance(body, dict):
        return None
    inner = body.get("error")
    candidate = inner if isinstance(inner, dict) else body
    if not ({"message", "code"} & candidate.keys()):
        return None
    try:
        return ErrorBody.model_validate(candidate)
    except ValueError:
        return None
