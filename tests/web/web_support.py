"""The status API on a thread of the test process, and its document's schemas."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
from jsonschema import Draft202012Validator

from tests.e2e.conftest import Stack
from worker.settings import Settings
from worker.web.app import OPENAPI
from worker.web.server import WebServer

DOCUMENT: dict[str, Any] = json.loads(OPENAPI.read_text())


def web_settings(stack: Stack, **changes: Any) -> Settings:
    return Settings(
        broker_url=stack.broker_url,
        database_url=stack.database_url,
        web_port=0,
        **stack.names.settings(),
        **changes,
    )


@contextmanager
def web_server(stack: Stack, **changes: Any) -> Iterator[WebServer]:
    with WebServer(web_settings(stack, **changes)) as server:
        yield server


def get(server: WebServer, path: str, **kwargs: Any) -> requests.Response:
    return requests.get(server.url.rstrip("/") + path, timeout=30, **kwargs)


def conforms(answer: Any, schema: str) -> Any:
    """``answer`` validated against the document's ``components/schemas/<schema>``."""
    validator = Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema}", "components": DOCUMENT["components"]}
    )
    errors = sorted(validator.iter_errors(answer), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    return answer
