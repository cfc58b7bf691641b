"""OAuth2 client credentials (batch-v2-api.md §12), one token shared by every thread.

The token endpoint is rate-limited too, so one token serves every call until shortly
before it expires. While a token is still valid, one thread refreshes it and the others
keep using the old one; only an expired (or rejected) token makes callers wait.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import requests
from oauthlib.oauth2 import BackendApplicationClient, OAuth2Error
from requests_oauthlib import OAuth2Session

from worker.api.errors import (
    ApiError,
    ClientError,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
)
from worker.api.retry import RetryPolicy, call_with_retries
from worker.redact import forget_secret, install_log_filter, register_secret

logger = logging.getLogger(__name__)

ENDPOINT = "token"
# requests-oauthlib logs the token request body (with the client secret) and the token
# at DEBUG on this logger; the filter redacts those records where they are made.
_LEAKY_LOGGERS = ("requests_oauthlib.oauth2_session",)
_FALLBACK_LIFETIME = 300.0  # seconds, when the answer says nothing about expiry
_EXPIRY_SAFETY = 5.0  # seconds; a token this close to expiry is no longer handed out


@dataclass(frozen=True)
class _Token:
    value: str
    refresh_at: float  # monotonic seconds
    expires_at: float  # monotonic seconds


class _TokenRejected(Exception):
    """Raised from the compliance hook so the HTTP status of a refusal is not lost."""

    def __init__(self, response: requests.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _jwt_lifetime(token: str) -> float | None:
    """Seconds until the ``exp`` claim of a JWT (unverified: only used to plan a refresh)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"]) - time.time()
    except (IndexError, KeyError, TypeError, ValueError, binascii.Error):
        return None


def _lifetime(expires_in: Any, token: str) -> float:
    """Seconds the token lives: ``expires_in``, else the JWT's ``exp``, else a guess."""
    try:
        return float(expires_in)
    except (TypeError, ValueError):
        return _jwt_lifetime(token) or _FALLBACK_LIFETIME


def retry_after_seconds(response: requests.Response) -> float | None:
    """``Retry-After`` in seconds; the API sends MILLISECONDS (§10)."""
    raw = response.headers.get("Retry-After")
    if raw is None:
        return None
    try:
        value = float(raw) / 1000.0
    except ValueError:
        return None
    return value if value >= 0 else None


class TokenSource:
    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        client_secret: str,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        refresh_margin: float = 120.0,
        on_request: Callable[[str, str, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        register_secret(client_secret)
        install_log_filter(_LEAKY_LOGGERS)
        if urlsplit(token_url).scheme == "http":
            # oauthlib refuses plain HTTP unless told otherwise, process-wide. The operator
            # configured an http:// token URL (a simulator); honour it, loudly.
            logger.warning("token URL is not HTTPS; allowing plain-HTTP OAuth for this process")
            os.environ["OAUTHLIB_INSECURE_TRANSPORT"] = "1"
        self._token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._margin = refresh_margin
        self._on_request = on_request
        self._clock = clock
        self._lock = threading.Lock()
        self._current: _Token | None = None
        self._session = OAuth2Session(client=BackendApplicationClient(client_id=client_id))
        self._session.register_compliance_hook("access_token_response", self._check_response)
        self.fetch_count = 0

    def __repr__(self) -> str:
        return f"TokenSource(token_url={self._token_url!r}, client_id={self._client_id!r})"

    def token(self) -> str:
        """A valid access token; fetched only when none is held or it is about to expire."""
        current = self._current
        now = self._clock()
        if current is not None and now < current.refresh_at:
            return current.value
        if current is not None and now < current.expires_at - _EXPIRY_SAFETY:
            # Still usable: one thread refreshes, the others go on with this one.
            if self._lock.acquire(blocking=False):
                try:
                    if self._current is current:
                        self._fetch()
                except ApiError as exc:
                    logger.warning("token refresh failed, using the current token: %s", exc)
                finally:
                    self._lock.release()
            latest = self._current
            return latest.value if latest is not None else current.value
        with self._lock:
            held = self._current
            if held is None or held is current or self._clock() >= held.refresh_at:
                self._fetch()
            held = self._current
            assert held is not None  # _fetch sets it or raises
            return held.value

    def invalidate(self, token: str) -> None:
        """The API rejected this token (401): the next ``token()`` fetches a new one."""
        with self._lock:
            if self._current is not None and self._current.value == token:
                self._current = None

    def close(self) -> None:
        self._session.close()

    # --- fetching ----------------------------------------------------------------------

    def _fetch(self) -> None:
        def retryable(exc: ApiError) -> bool:
            return isinstance(exc, RateLimited | ServerError | TransportError)

        previous = self._current
        value, lifetime, started = call_with_retries(
            self._retry, ENDPOINT, self._fetch_once, retryable
        )
        register_secret(value)
        if previous is not None and previous.value != value:
            forget_secret(previous.value)
        margin = min(self._margin, lifetime / 4)
        self._current = _Token(
            value=value,
            refresh_at=started + lifetime - margin,
            expires_at=started + lifetime,
        )
        self.fetch_count += 1
        logger.debug("fetched an access token valid for %.0f s", lifetime)

    def _fetch_once(self) -> tuple[str, float, float]:
        started = self._clock()
        wall = time.monotonic()
        code = "error"
        try:
            token: dict[str, Any] = self._session.fetch_token(
                token_url=self._token_url,
                client_id=self._client_id,
                client_secret=self._client_secret,
                include_client_id=True,
                timeout=self._timeout,
            )
            code = "200"
        except _TokenRejected as rejected:
            code = str(rejected.response.status_code)
            raise self._refusal(rejected.response) from None
        except requests.RequestException as exc:
            raise TransportError(
                f"token endpoint unreachable: {type(exc).__name__}", endpoint=ENDPOINT
            ) from None
        except OAuth2Error as exc:
            code = str(exc.status_code or "error")
            raise Unauthorized(
                exc.description or exc.error, code=exc.error, endpoint=ENDPOINT
            ) from None
        except ValueError:
            raise ServerError(
                "token endpoint answered something that is not a token",
                code="INVALID_TOKEN_RESPONSE",
                endpoint=ENDPOINT,
            ) from None
        finally:
            self._report(code, time.monotonic() - wall)
        value = token.get("access_token")
        if not isinstance(value, str) or not value:
            raise ServerError(
                "token endpoint answered without an access_token",
                code="INVALID_TOKEN_RESPONSE",
                endpoint=ENDPOINT,
            )
        return value, max(_lifetime(token.get("expires_in"), value), 1.0), started

    def _check_response(self, response: requests.Response) -> requests.Response:
        if response.status_code >= 300:
            raise _TokenRejected(response)
        return response

    def _refusal(self, response: requests.Response) -> ApiError:
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        code, message = "", response.reason or ""
        if isinstance(body, dict):
            # OAuth errors: {"error": "invalid_client", "error_description": "..."};
            # the gateway's own: {"status", "code", "message"} (possibly wrapped).
            inner = body.get("error")
            if isinstance(inner, str):
                code = inner
                message = str(body.get("error_description") or message)
            else:
                detail = inner if isinstance(inner, dict) else body
                code = str(detail.get("code") or "")
                message = str(detail.get("message") or message)
        if status == 429:
            return RateLimited(
                message,
                http_status=status,
                code=code or "RATE_LIMIT_EXCEEDED",
                endpoint=ENDPOINT,
                retry_after=retry_after_seconds(response),
            )
        if status >= 500:
            return ServerError(message, http_status=status, code=code, endpoint=ENDPOINT)
        if status in {400, 401, 403}:
            return Unauthorized(message, http_status=status, code=code, endpoint=ENDPOINT)
        return ClientError(message, http_status=status, code=code, endpoint=ENDPOINT)

    def _report(self, code: str, seconds: float) -> None:
        if self._on_request is None:
            return
        try:
            self._on_request(ENDPOINT, code, seconds)
        except Exception:  # a metrics hook must never break a call
            logger.exception("on_request hook failed")
