"""Fixtures of the simulator tests: a fast simulator in-process and an authenticated client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from worker.simulator import Running, SimulatorConfig, start_background

EXAMPLES = Path(__file__).resolve().parents[2] / "worker" / "examples"

# Fast enough that a few-feature job runs in about a second.
FAST = {
    "speed": 2000.0,
    "history": 3,
    "write_artifacts": False,
    "requests_per_minute": 0,
}


def example_request(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text())["request"]


def small_request(description: str = "test request", **changes: Any) -> dict[str, Any]:
    """A tiling-grid request over a small area (grid 0: 16 features)."""
    request = example_request("max-ndvi-geotiff.json")
    request["processRequest"]["input"]["bounds"]["bbox"] = [9.0, 42.0, 9.5, 42.5]
    request["description"] = description
    request.update(changes)
    return request


class Api:
    """A requests session holding a token, with the API base of one simulator."""

    def __init__(self, sim: Running, prefix: str = "/api/v2/batch") -> None:
        self.sim = sim
        self.base = sim.url + prefix
        self.session = requests.Session()
        token = requests.post(
            sim.token_url,
            data={"grant_type": "client_credentials", "client_id": "c", "client_secret": "s"},
            timeout=5,
        ).json()["access_token"]
        self.session.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.get(self.base + path, timeout=10, **kwargs)

    def post(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.post(self.base + path, timeout=10, **kwargs)

    def put(self, path: str, **kwargs: Any) -> requests.Response:
        return self.session.put(self.base + path, timeout=10, **kwargs)

    def create(self, request: dict[str, Any] | None = None) -> dict[str, Any]:
        response = self.post("/process", json=request or small_request())
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture
def sim() -> Iterator[Running]:
    with start_background(SimulatorConfig(**FAST)) as running:
        yield running


@pytest.fixture
def api(sim: Running) -> Api:
    return Api(sim)
