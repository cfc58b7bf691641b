"""The Batch Processing API V2 client (batch-v2-api.md §2).

One client is shared by the engine's threads: one connection pool, one OAuth token, one
request budget. Every HTTP request (retries included) passes the budget and is reported
to ``ApiHooks.on_request``; this package never imports metrics.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Self, TypeVar
from urllib.parse import quote

import requests
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError

from worker import APP_ID, __version__
from worker.api import pages
from worker.api.auth import ENDPOINT as TOKEN_ENDPOINT
from worker.api.auth import TokenSource, retry_after_seconds
from worker.api.budget import Priority, RequestBudget
from worker.api.errors import (
    ApiError,
    ClientError,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
)
from worker.api.models import ListedTask, Page, Task, TilingGrid, parse_error_body
from worker.api.pages import ListAnswer
from worker.api.payload import validate_create_payload
from worker.api.retry import RetryPolicy, call_with_retries

if TYPE_CHECKING:
    from worker.settings import Settings

__all__ = ["ApiHooks", "BatchClient", "RetryPolicy"]

logger = logging.getLogger(__name__)

_MESSAGE_LIMIT = 300  # characters of a non-JSON error body kept in an error message
# Creates wait for tokens nobody else wants: a status read or an action on a running job
# is what a job's latency waits on, and a storm of creates must not queue ahead of it.
_LOW_PRIORITY_ENDPOINTS = frozenset({"create"})


@dataclass
class ApiHooks:
    # (endpoint, code, seconds): code is the HTTP status, or "error" when no response came.
    on_request: Callable[[str, str, float], None] | None = None
    on_budget_wait: Callable[[float], None] | None = None


@dataclass
class _Call:
    """One logical call: what it may retry and what its attempts have seen."""

    endpoint: str
    method: str
    url: str
    params: Mapping[str, str | int] | None = None
    body: Any = None
    idempotent: bool = True
    not_found_until: datetime | None = None
    maybe_applied: bool = False  # an earlier attempt may have taken effect


_T = TypeVar("_T")


class _Bearer(AuthBase):
    """The OAuth token as the request's own auth. Passing it as a plain header would leave
    requests to look up ~/.netrc on every request (file checks on the status-read hot path),
    and a netrc entry for the API's host would then replace the token with basic auth."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_Bearer(<token>)"


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request surely never reached the server (refused, connect timeout)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError) and exc.args:
        cause = exc.args[0]
        reason = cause.reason if isinstance(cause, MaxRetryError) else cause
        return isinstance(reason, NewConnectionError | ConnectTimeoutError)
    return False


def _error_from_response(response: requests.Response, endpoint: str) -> ApiError:
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = parse_error_body(body)
    if detail is not None:
        code, message = detail.code, detail.message or (response.reason or "")
    else:
        text = " ".join(response.text.split())[:_MESSAGE_LIMIT]
        code, message = "", text or (response.reason or "")
    kwargs: dict[str, Any] = {"http_status": status, "code": code, "endpoint": endpoint}
    if status in {401, 403}:
        return Unauthorized(message, **kwargs)
    if status == 404:
        return NotFound(message, **kwargs)
    if status == 429:
        return RateLimited(message, retry_after=retry_after_seconds(response), **kwargs)
    if status >= 500:
        return ServerError(message, ambiguous=True, **kwargs)
    return ClientError(message, **kwargs)


class BatchClient:
    def __init__(
        self,
        *,
        batch_url: str,
        token_url: str,
        client_id: str,
        client_secret: str,
        budget: RequestBudget | None = None,
        timeout: float = 30.0,
        hooks: ApiHooks | None = None,
        retry: RetryPolicy | None = None,
        pool_size: int = 32,
    ) -> None:
        self.batch_url = batch_url.rstrip("/")
        self._budget = budget
        self._timeout = timeout
        self._hooks = hooks or ApiHooks()
        self._retry = retry or RetryPolicy()
        self._auth = TokenSource(
            token_url=token_url,
            client_id=client_id,
            client_secret=client_secret,
            timeout=timeout,
            retry=self._retry,
            on_request=self._hooks.on_request,
        )
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=2, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)
        self._session.headers["User-Agent"] = f"{APP_ID}/{__version__}"

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        hooks: ApiHooks | None = None,
        budget: RequestBudget | None = None,
    ) -> BatchClient:
        """``budget``: the fleet's shared one (the daemon's); by default this process's own."""
        return cls(
            batch_url=settings.batch_url,
            token_url=settings.token_url,
            client_id=settings.client_id,
            client_secret=settings.client_secret.get_secret_value(),
            budget=budget or RequestBudget(settings.api_budget_per_minute),
            timeout=settings.api_timeout,
            hooks=hooks,
            # One window for a new request's 404s: past it, the lifecycle decides.
            retry=RetryPolicy(not_found_window=settings.not_found_window),
        )

    def __repr__(self) -> str:
        return f"BatchClient(batch_url={self.batch_url!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()
        self._auth.close()

    # --- batch requests (§2 rows 1-7) ------------------------------------------------------

    def create(self, payload: Mapping[str, Any]) -> Task:
        """POST /process. Validates first; retries only what surely never reached the API.

        A failure that may have created the task anyway (timeout, reset, 5xx) raises with
        ``ambiguous=True``: look for the task before creating again.
        """
        body = validate_create_payload(payload)
        call = _Call("create", "POST", self._process_url(), body=body, idempotent=False)
        return self._task(call, self._execute(call))

    def get(self, request_id: str, *, created_at: datetime | None = None) -> Task:
        """GET /process/{id}; a 404 is retried while the task is younger than the window."""
        call = _Call(
            "get",
            "GET",
            self._process_url(request_id),
            not_found_until=self._not_found_until(created_at),
        )
        return self._task(call, self._execute(call))

    def iter_pages(
        self,
        *,
        sort: str | None = "created:desc",
        search: str | None = None,
        count: int | None = None,
    ) -> Iterator[Page]:
        """GET /process page by page, following ``links.nextToken`` (§2.1); each task read
        only as far as its status (``ListedTask``)."""
        params = pages.list_params(sort, search, count)
        for tasks, next_token in self._pages("list", self._process_url(), params, self._listed):
            yield Page(tasks=tasks, next_token=next_token)

    def iter_requests(
        self,
        *,
        sort: str | None = "created:desc",
        search: str | None = None,
        count: int | None = None,
    ) -> Iterator[Task]:
        """Every batch request in full (``iter_pages`` reads only their statuses)."""
        params = pages.list_params(sort, search, count)
        for data, _ in self._pages("list", self._process_url(), params, self._any_list):
            yield from (Task.model_validate(item) for item in data if isinstance(item, dict))

    def update_description(
        self, request_id: str, description: str, *, created_at: datetime | None = None
    ) -> Task:
        """PUT /process/{id}: only the description can change (409 while processing)."""
        call = _Call(
            "update",
            "PUT",
            self._process_url(request_id),
            body={"description": description},
            not_found_until=self._not_found_until(created_at),
        )
        answer = self._json(call, self._execute(call))
        # The spec says the answer is the request, not the task; take a task when given one.
        if isinstance(answer, dict) and "id" in answer and "status" in answer:
            return Task.model_validate(answer)
        return self.get(request_id, created_at=created_at)

    def analyse(self, request_id: str, *, created_at: datetime | None = None) -> None:
        self._action(request_id, "analyse", created_at)

    def start(self, request_id: str, *, created_at: datetime | None = None) -> None:
        self._action(request_id, "start", created_at)

    def stop(self, request_id: str, *, created_at: datetime | None = None) -> None:
        self._action(request_id, "stop", created_at)

    # --- tiling grids (§2 rows 8-9) ----------------------------------------------------

    def iter_tiling_grids(self) -> Iterator[TilingGrid]:
        url = f"{self.batch_url}/tilinggrids"
        for data, _ in self._pages("tilinggrids", url, {}, self._any_list):
            for item in data:
                yield TilingGrid.model_validate(item)

    def get_tiling_grid(self, grid_id: int) -> TilingGrid:
        call = _Call("tilinggrids", "GET", f"{self.batch_url}/tilinggrids/{int(grid_id)}")
        return TilingGrid.model_validate(self._json(call, self._execute(call)))

    # --- plumbing ------------------------------------------------------------------------

    def _process_url(self, request_id: str | None = None) -> str:
        if request_id is None:
            return f"{self.batch_url}/process"
        # The id may come from a producer: never let it change the path.
        return f"{self.batch_url}/process/{quote(request_id, safe='')}"

    def _not_found_until(self, created_at: datetime | None) -> datetime | None:
        if created_at is None:
            return None
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=UTC)
        return created_at + timedelta(seconds=self._retry.not_found_window)

    def _action(self, request_id: str, action: str, created_at: datetime | None) -> None:
        # Repeating analyse/start/stop is harmless (a status that moved refuses it), so
        # these retry like reads; the error says if an earlier try may have landed.
        call = _Call(
            action,
            "POST",
            f"{self._process_url(request_id)}/{action}",
            not_found_until=self._not_found_until(created_at),
        )
        self._execute(call)

    def _any_list(self, call: _Call, response: requests.Response) -> ListAnswer[Any]:
        return pages.any_list(self._json(call, response), call.endpoint)

    @staticmethod
    def _listed(call: _Call, response: requests.Response) -> ListAnswer[ListedTask]:
        return pages.listed(response, call.endpoint)

    def _pages(
        self,
        endpoint: str,
        url: str,
        params: dict[str, str | int],
        parse: Callable[[_Call, requests.Response], ListAnswer[_T]],
    ) -> Iterator[tuple[list[_T], str | None]]:
        token: str | None = None
        while True:
            query = dict(params)
            if token is not None:
                query["viewtoken"] = token
            call = _Call(endpoint, "GET", url, params=query)
            data, links, bare = parse(call, self._execute(call))
            if bare:  # a bare array: everything at once
                yield data, None
                return
            next_token = pages.next_token(links)
            if next_token is not None and next_token == token:
                logger.warning("%s: the API repeated page token; stopping", endpoint)
                next_token = None
            yield data, (next_token if data else None)
            if not data or next_token is None:
                return
            token = next_token

    def _json(self, call: _Call, response: requests.Response) -> Any:
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ServerError(
                "answer is not JSON",
                http_status=response.status_code,
                code="INVALID_RESPONSE",
                endpoint=call.endpoint,
                ambiguous=not call.idempotent,
            ) from None

    def _task(self, call: _Call, response: requests.Response) -> Task:
        answer = self._json(call, response)
        try:
            return Task.model_validate(answer)
        except ValueError:
            raise ServerError(
                "answer is not a batch task",
                http_status=response.status_code,
                code="INVALID_RESPONSE",
                endpoint=call.endpoint,
                ambiguous=not call.idempotent,
            ) from None

    def _execute(self, call: _Call) -> requests.Response:
        def should_retry(exc: ApiError) -> bool:
            if exc.endpoint == TOKEN_ENDPOINT:
                return False  # the token source has already retried what it could
            if isinstance(exc, RateLimited):
                return True  # refused before it was processed
            if isinstance(exc, NotFound):
                return call.not_found_until is not None and datetime.now(UTC) < (
                    call.not_found_until
                )
            if isinstance(exc, ServerError | TransportError):
                return call.idempotent or not exc.ambiguous
            return False

        try:
            return call_with_retries(
                self._retry, call.endpoint, lambda: self._attempt(call), should_retry
            )
        except ApiError as exc:
            exc.ambiguous = exc.ambiguous or call.maybe_applied
            raise

    def _attempt(self, call: _Call) -> requests.Response:
        """One try: budget, token, request; a 401 fetches a new token and tries once more."""
        for fresh_token in (False, True):
            token = self._auth.token()
            response = self._send(call, token)
            if response.status_code == 401 and not fresh_token:
                logger.info("%s: token rejected (401); fetching a new one", call.endpoint)
                self._auth.invalidate(token)
                continue
            break
        if 200 <= response.status_code < 300:
            return response
        error = _error_from_response(response, call.endpoint)
        if isinstance(error, RateLimited) and self._budget is not None:
            wait = error.retry_after
            self._budget.defer(wait if wait is not None else self._retry.default_retry_after)
        if error.ambiguous:
            call.maybe_applied = True
        raise error

    def _send(self, call: _Call, token: str) -> requests.Response:
        if self._budget is not None:
            priority = Priority.LOW if call.endpoint in _LOW_PRIORITY_ENDPOINTS else Priority.HIGH
            waited = self._budget.acquire(priority)
            if waited > 0 and self._hooks.on_budget_wait is not None:
                self._hook(self._hooks.on_budget_wait, waited)
        started = time.monotonic()
        try:
            response = self._session.request(
                call.method,
                call.url,
                params=call.params,
                json=call.body,
                auth=_Bearer(token),
                timeout=self._timeout,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            seconds = time.monotonic() - started
            self._report(call.endpoint, "error", seconds)
            unsent = _never_sent(exc)
            if not unsent:
                call.maybe_applied = True
            logger.debug("%s %s: %s after %.3f s", call.method, call.endpoint, exc, seconds)
            raise TransportError(
                f"{type(exc).__name__} talking to the API",
                endpoint=call.endpoint,
                ambiguous=not unsent,
            ) from None
        seconds = time.monotonic() - started
        self._report(call.endpoint, str(response.status_code), seconds)
        logger.debug(
            "%s %s -> %d in %.3f s", call.method, call.endpoint, response.status_code, seconds
        )
        return response

    def _report(self, endpoint: str, code: str, seconds: float) -> None:
        if self._hooks.on_request is not None:
            self._hook(self._hooks.on_request, endpoint, code, seconds)

    @staticmethod
    def _hook(hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception:  # a metrics hook must never break a call
            logger.exception("API hook failed")
