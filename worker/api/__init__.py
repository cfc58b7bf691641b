"""The Batch Processing API V2: client, models, errors, request budget, artifact paths.

The bottom layer: imports nothing from ``worker`` but ``worker.redact`` (and the settings
type, for ``BatchClient.from_settings``).
"""

from worker.api.budget import RequestBudget
from worker.api.client import ApiHooks, BatchClient
from worker.api.errors import (
    ApiError,
    ClientError,
    NotFound,
    PayloadInvalid,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
)
from worker.api.models import Page, Task, TilingGrid, validate_create_payload
from worker.api.retry import RetryPolicy

__all__ = [
    "ApiError",
    "ApiHooks",
    "BatchClient",
    "ClientError",
    "NotFound",
    "Page",
    "PayloadInvalid",
    "RateLimited",
    "RequestBudget",
    "RetryPolicy",
    "ServerError",
    "Task",
    "TilingGrid",
    "TransportError",
    "Unauthorized",
    "validate_create_payload",
]
