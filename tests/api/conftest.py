"""Fixtures of the API client tests: a scripted server on loopback and clients for it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from api_support import FAST, MakeClient, Recorder
from scripted_server import ScriptedServer

from worker.api.client import BatchClient


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    running = ScriptedServer().start()
    yield running
    running.stop()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_client(server: ScriptedServer, recorder: Recorder) -> Iterator[MakeClient]:
    made: list[BatchClient] = []

    def make(**overrides: Any) -> BatchClient:
        kwargs: dict[str, Any] = {
            "batch_url": server.batch_url,
            "token_url": server.token_url,
            "client_id": server.client_id,
            "client_secret": server.client_secret,
            "timeout": 2.0,
            "hooks": recorder.hooks(),
            "retry": FAST,
        }
        kwargs.update(overrides)
        client = BatchClient(**kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def client(make_client: MakeClient) -> BatchClient:
    return make_client()
