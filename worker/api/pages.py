"""Reading list answers (batch-v2-api.md §2.1): the query, the shapes, the next token."""

from __future__ import annotations

from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import requests
from pydantic import TypeAdapter, ValidationError

from worker.api.errors import ServerError
from worker.api.models import ListedPage, ListedTask

_T = TypeVar("_T")
# A list answer: its items, its ``links`` object, and whether it was a bare array.
ListAnswer = tuple[list[_T], Any, bool]
_LISTED_ARRAY = TypeAdapter(list[ListedTask])


def list_params(sort: str | None, search: str | None, count: int | None) -> dict[str, str | int]:
    params: dict[str, str | int] = {}
    if sort:
        params["sort"] = sort
    if search:
        params["search"] = search
    if count is not None:
        params["count"] = count
    return params


def any_list(answer: Any, endpoint: str) -> ListAnswer[Any]:
    """The items of a decoded list answer, in either shape (``{"data": [...]}`` or bare)."""
    if isinstance(answer, list):
        return answer, None, True
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise ServerError(
            "list answer has no data array", code="INVALID_RESPONSE", endpoint=endpoint
        )
    return data, answer.get("links"), False


def listed(response: requests.Response, endpoint: str) -> ListAnswer[ListedTask]:
    """A list page's tasks as ``ListedTask``s, validated from the bytes in one pass."""
    content = response.content
    try:
        if content.lstrip()[:1] == b"[":
            return _LISTED_ARRAY.validate_json(content), None, True
        page = ListedPage.model_validate_json(content)
    except ValidationError:
        raise ServerError(
            "list answer is not a page of batch tasks",
            http_status=response.status_code,
            code="INVALID_RESPONSE",
            endpoint=endpoint,
        ) from None
    return page.data, page.links, False


def next_token(links: Any) -> str | None:
    """The token of the next page, from ``nextToken`` or the ``next`` URL's viewtoken."""
    if not isinstance(links, dict):
        return None
    token = links.get("nextToken")
    if isinstance(token, str) and token:
        return token
    # Some answers carry only the "next" URL; its viewtoken is the same thing.
    next_url = links.get("next")
    if isinstance(next_url, str) and next_url:
        values = parse_qs(urlsplit(next_url).query).get("viewtoken")
        if values:
            return values[0]
    return None
