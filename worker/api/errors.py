"""Typed errors of the Batch V2 client.

Every error carries what the engine decides on: the HTTP status (``None`` when no
response came), the API's ``code`` and ``message``, the endpoint, and whether the request
may have taken effect (``ambiguous``). The text is redacted at construction, so
``str(exc)`` is always safe to log or to put into an event.
"""

from __future__ import annotations

from worker.redact import redact_text


class ApiError(Exception):
    """A Batch V2 call failed. ``str(exc)`` never holds a secret."""

    http_status: int | None
    code: str
    message: str
    endpoint: str
    ambiguous: bool

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        code: str = "",
        endpoint: str = "",
        ambiguous: bool = False,
        retry_after: float | None = None,
    ) -> None:
        self.message = redact_text(message)
        self.http_status = http_status
        self.code = code or (f"HTTP_{http_status}" if http_status else "ERROR")
        self.endpoint = endpoint
        self.ambiguous = ambiguous
        # Seconds the server asked us to wait (429 Retry-After), when it said so.
        self.retry_after = retry_after
        super().__init__(self.message)

    def __str__(self) -> str:
        status = f"HTTP {self.http_status} " if self.http_status is not None else ""
        where = f"{self.endpoint}: " if self.endpoint else ""
        return f"{where}{status}{self.code}: {self.message}"

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments would otherwise be lost when the error is pickled.
        return (_rebuild, (type(self), self.message, dict(self.__dict__)))


def _rebuild(cls: type[ApiError], message: str, state: dict[str, object]) -> ApiError:
    error = cls(message)
    error.__dict__.update(state)
    return error


class NotFound(ApiError):
    """404, after the transient-404 retries when those apply."""


class Unauthorized(ApiError):
    """401 after one token refresh, 403, or the token endpoint refused the client."""


class ClientError(ApiError):
    """Any other 4xx: the API refused the request; repeating it will not help."""


class ServerError(ApiError):
    """5xx after retries (or an unreadable success response)."""


class RateLimited(ApiError):
    """429 after retries are exhausted; ``retry_after`` says when to come back."""


class TransportError(ApiError):
    """No HTTP response: connection refused or reset, timeout. ``http_status`` is None."""


class PayloadInvalid(ApiError):
    """Local validation refused a create payload before anything was sent."""

    def __init__(self, message: str, *, endpoint: str = "create") -> None:
        super().__init__(message, code="INVALID_PAYLOAD", endpoint=endpoint)
