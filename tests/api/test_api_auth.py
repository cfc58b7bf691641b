"""OAuth2 client credentials (batch-v2-api.md §12): one token, shared, refreshed in time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from api_support import FAST, MakeClient, Recorder
from scripted_server import Reply, ScriptedServer, error_body, task_body

from tests.fakes import FakeClock
from worker.api.auth import TokenSource
from worker.api.client import BatchClient
from worker.api.errors import RateLimited, Unauthorized

pytestmark = pytest.mark.integration

RID = "7f1e3a52-0000-4000-8000-000000000002"


def _source(server: ScriptedServer, clock: FakeClock, **kwargs: object) -> TokenSource:
    return TokenSource(
        token_url=server.token_url,
        client_id=server.client_id,
        client_secret=server.client_secret,
        retry=FAST,
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )


def test_one_token_serves_every_call(client: BatchClient, server: ScriptedServer) -> None:
    server.on("GET", f"/process/{RID}", *[Reply(200, task_body(RID))] * 5)

    for _ in range(5):
        client.get(RID)

    assert len(server.token_requests) == 1
    form = server.token_requests[0].form
    assert form["grant_type"] == ["client_credentials"]
    assert form["client_id"] == [server.client_id]
    tokens = {r.headers["authorization"] for r in server.seen("GET")}
    assert tokens == {f"Bearer {server.issued[0]}"}


def test_threads_share_one_token(client: BatchClient, server: ScriptedServer) -> None:
    server.token_delay = 0.1  # every thread arrives while the first fetch is under way
    server.on("POST", f"/process/{RID}/stop", *[Reply(204)] * 40)
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for _ in range(5):
            client.stop(RID)

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work) for _ in range(8)]:
            future.result()

    assert len(server.token_requests) == 1
    assert len(server.seen("POST", f"/process/{RID}/stop")) == 40


def test_the_token_is_refreshed_shortly_before_it_expires(server: ScriptedServer) -> None:
    server.token_lifetime = 600.0
    clock = FakeClock()
    source = _source(server, clock, refresh_margin=120.0)

    first = source.token()
    clock.now += 600 - 120 - 1
    assert source.token() == first
    clock.now += 2  # inside the margin: refreshed while the old one is still valid
    second = source.token()
    assert second != first
    assert len(server.token_requests) == 2
    clock.now += 600 - 120 - 1
    assert source.token() == second
    source.close()


def test_an_expired_token_is_never_handed_out(server: ScriptedServer) -> None:
    server.token_lifetime = 60.0
    clock = FakeClock()
    source = _source(server, clock)
    first = source.token()
    clock.now += 61

    assert source.token() != first
    source.close()


def test_a_failed_refresh_keeps_the_still_valid_token(server: ScriptedServer) -> None:
    server.token_lifetime = 600.0
    clock = FakeClock()
    source = _source(server, clock)
    first = source.token()
    server.token_replies.extend([Reply(503, "down")] * FAST.max_attempts)
    clock.now += 590

    assert source.token() == first
    assert len(server.token_requests) == 1 + FAST.max_attempts
    source.close()


def test_a_401_fetches_a_new_token_once_and_repeats_the_call(
    client: BatchClient, server: ScriptedServer, recorder: Recorder
) -> None:
    server.on("GET", f"/process/{RID}", Reply(200, task_body(RID)), Reply(200, task_body(RID)))
    client.get(RID)
    server.revoke_tokens()  # the server forgets the token (rotated keys, say)

    assert client.get(RID).id == RID
    assert len(server.token_requests) == 2
    assert recorder.codes("get") == ["200", "401", "200"]


def test_a_second_401_is_unauthorized(client: BatchClient, server: ScriptedServer) -> None:
    denied = Reply(401, error_body(401, "COMMON_UNAUTHORIZED", "You are not authorized!"))
    server.on("GET", f"/process/{RID}", denied, denied)

    with pytest.raises(Unauthorized) as caught:
        client.get(RID)

    assert (caught.value.http_status, caught.value.code) == (401, "COMMON_UNAUTHORIZED")
    assert len(server.token_requests) == 2


def test_a_refused_client_is_unauthorized_without_retries(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    client = make_client(client_secret="wrong-secret-value")

    with pytest.raises(Unauthorized) as caught:
        client.get(RID)

    error = caught.value
    assert (error.endpoint, error.http_status, error.code) == ("token", 401, "unauthorized_client")
    assert error.message == "Invalid client credentials"
    assert len(server.token_requests) == 1
    assert server.seen("GET") == []


def test_token_endpoint_trouble_is_retried(
    client: BatchClient, server: ScriptedServer, recorder: Recorder
) -> None:
    limited = error_body(429, "RATE_LIMIT_EXCEEDED", "slow down", wrapped=False)
    server.token_replies.extend(
        [Reply(503, "<html>busy</html>"), Reply(429, limited, headers={"Retry-After": "20"})]
    )
    server.on("GET", f"/process/{RID}", Reply(200, task_body(RID)))

    assert client.get(RID).id == RID
    assert recorder.codes("token") == ["503", "429", "200"]


def test_token_endpoint_rate_limit_exhausted(client: BatchClient, server: ScriptedServer) -> None:
    limited = error_body(429, "RATE_LIMIT_EXCEEDED", "slow down", wrapped=False)
    server.token_replies.extend([Reply(429, limited)] * FAST.max_attempts)

    with pytest.raises(RateLimited) as caught:
        client.get(RID)

    assert caught.value.endpoint == "token"
