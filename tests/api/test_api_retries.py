"""Retries and typed errors (batch-v2-api.md §3.3, §9, §10, §11) against a loopback server."""

from __future__ import annotations

import dataclasses
import itertools
import socket
import time
from datetime import UTC, datetime, timedelta

import pytest
from api_support import FAST, MakeClient, Recorder, seed
from scripted_server import Reply, ScriptedServer, error_body, task_body

from worker.api.client import BatchClient
from worker.api.errors import (
    ApiError,
    ClientError,
    NotFound,
    RateLimited,
    ServerError,
    TransportError,
    Unauthorized,
)
from worker.settings import Settings

pytestmark = pytest.mark.integration

RID = "0c7d2d1e-0000-4000-8000-000000000001"
RATE_LIMITED = error_body(
    429, "RATE_LIMIT_EXCEEDED", "You have exceeded your rate limit", wrapped=False
)


def _gaps(server: ScriptedServer, method: str, path: str) -> list[float]:
    arrivals = [r.at for r in server.seen(method, path)]
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


def test_429_waits_the_retry_after_milliseconds(
    client: BatchClient, server: ScriptedServer
) -> None:
    server.on(
        "GET",
        f"/process/{RID}",
        Reply(429, RATE_LIMITED, headers={"Retry-After": "300"}),
        Reply(200, task_body(RID)),
    )

    started = time.monotonic()
    assert client.get(RID).id == RID
    elapsed = time.monotonic() - started

    # Correctness, not speed: the client must not come back before the server said.
    assert elapsed >= 0.3
    assert _gaps(server, "GET", f"/process/{RID}")[0] >= 0.3


def test_429_without_retry_after_waits_the_default(
    client: BatchClient, server: ScriptedServer
) -> None:
    server.on("GET", f"/process/{RID}", Reply(429, RATE_LIMITED), Reply(200, task_body(RID)))

    client.get(RID)

    assert _gaps(server, "GET", f"/process/{RID}")[0] >= FAST.default_retry_after


def test_429_also_holds_back_the_shared_budget(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    from worker.api.budget import RequestBudget

    budget = RequestBudget(per_minute=6000)
    client = make_client(budget=budget)
    server.on("GET", f"/process/{RID}", Reply(429, RATE_LIMITED, headers={"Retry-After": "200"}))
    server.on("GET", f"/process/{RID}", Reply(200, task_body(RID)))

    client.get(RID)

    # Other threads of the process would have waited too: the bucket was emptied.
    assert budget.available < budget.capacity


def test_429_exhausted_raises_rate_limited_with_the_bare_body(
    client: BatchClient, server: ScriptedServer
) -> None:
    server.on("GET", "/process", *[Reply(429, RATE_LIMITED, headers={"Retry-After": "10"})] * 4)

    with pytest.raises(RateLimited) as caught:
        list(client.iter_pages())

    error = caught.value
    assert (error.http_status, error.code, error.endpoint) == (429, "RATE_LIMIT_EXCEEDED", "list")
    assert error.message == "You have exceeded your rate limit"
    assert error.retry_after == pytest.approx(0.01)
    assert error.ambiguous is False
    assert len(server.seen("GET", "/process")) == FAST.max_attempts


def test_5xx_backs_off_and_recovers(
    client: BatchClient, server: ScriptedServer, recorder: Recorder
) -> None:
    server.on(
        "GET",
        f"/process/{RID}",
        Reply(503, "<html>unavailable</html>"),
        Reply(502, error_body(502, "COMMON_EXCEPTION", "bad gateway")),
        Reply(200, task_body(RID)),
    )

    assert client.get(RID).id == RID
    assert recorder.codes("get") == ["503", "502", "200"]


def test_5xx_exhausted_is_an_ambiguous_server_error(
    client: BatchClient, server: ScriptedServer
) -> None:
    server.on("POST", f"/process/{RID}/start", *[Reply(500, "<h1>boom</h1>")] * 4)

    with pytest.raises(ServerError) as caught:
        client.start(RID)

    assert caught.value.http_status == 500
    assert caught.value.message == "<h1>boom</h1>"
    assert caught.value.ambiguous is True
    assert len(server.seen("POST", f"/process/{RID}/start")) == FAST.max_attempts


def test_retry_time_is_bounded(make_client: MakeClient, server: ScriptedServer) -> None:
    policy = dataclasses.replace(FAST, max_attempts=100, max_total_seconds=3.0)
    client = make_client(retry=policy)
    # Each answer asks for 2 s: the first wait ends inside the 3 s bound, the second would end
    # past it. The margins (1 s each way) outlast a loaded machine's scheduling delays.
    server.on(
        "GET", f"/process/{RID}", *[Reply(429, RATE_LIMITED, headers={"Retry-After": "2000"})] * 5
    )

    with pytest.raises(RateLimited):
        client.get(RID)

    assert len(server.seen("GET")) == 2


def test_create_is_not_repeated_after_a_5xx(client: BatchClient, server: ScriptedServer) -> None:
    server.on("POST", "/process", Reply(500, error_body(500, "COMMON_EXCEPTION", "oops")))

    with pytest.raises(ServerError) as caught:
        client.create(seed())

    assert caught.value.ambiguous is True
    assert caught.value.code == "COMMON_EXCEPTION"
    assert len(server.seen("POST", "/process")) == 1


def test_create_is_repeated_after_a_429(client: BatchClient, server: ScriptedServer) -> None:
    server.on("POST", "/process", Reply(429, RATE_LIMITED), Reply(201, task_body(RID)))

    assert client.create(seed()).id == RID
    assert len(server.seen("POST", "/process")) == 2


def test_create_cut_off_after_sending_is_ambiguous_and_not_repeated(
    client: BatchClient, server: ScriptedServer
) -> None:
    server.on("POST", "/process", Reply(drop=True))

    with pytest.raises(TransportError) as caught:
        client.create(seed())

    assert caught.value.ambiguous is True
    assert caught.value.http_status is None
    assert len(server.seen("POST", "/process")) == 1


def test_a_read_timeout_is_retried(make_client: MakeClient, server: ScriptedServer) -> None:
    client = make_client(timeout=0.2)
    server.on("GET", f"/process/{RID}", Reply(200, task_body(RID), delay=0.5))
    server.on("GET", f"/process/{RID}", Reply(200, task_body(RID)))

    assert client.get(RID).id == RID
    assert len(server.seen("GET")) == 2


def test_a_refused_connection_is_not_ambiguous_and_create_retries_it(
    make_client: MakeClient, server: ScriptedServer, recorder: Recorder
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    client = make_client(batch_url=f"http://127.0.0.1:{dead_port}/api/v2/batch")

    with pytest.raises(TransportError) as caught:
        client.create(seed())

    assert caught.value.ambiguous is False
    assert recorder.codes("create") == ["error"] * FAST.max_attempts


def test_a_404_moments_after_create_is_retried(client: BatchClient, server: ScriptedServer) -> None:
    not_found = Reply(404, error_body(404, "COMMON_NOT_FOUND", "no such request"))
    server.on("GET", f"/process/{RID}", not_found, not_found, Reply(200, task_body(RID)))

    task = client.get(RID, created_at=datetime.now(UTC))

    assert task.id == RID
    assert len(server.seen("GET")) == 3


def test_an_action_404_moments_after_create_is_retried(
    client: BatchClient, server: ScriptedServer
) -> None:
    not_found = Reply(404, error_body(404, "COMMON_NOT_FOUND", "no such request"))
    server.on("POST", f"/process/{RID}/start", not_found, Reply(204))

    client.start(RID, created_at=datetime.now(UTC))

    assert len(server.seen("POST", f"/process/{RID}/start")) == 2


@pytest.mark.parametrize("created_at", [None, datetime.now(UTC) - timedelta(hours=1)])
def test_a_404_on_an_old_or_unknown_task_fails_at_once(
    client: BatchClient, server: ScriptedServer, created_at: datetime | None
) -> None:
    server.on("GET", f"/process/{RID}", Reply(404, error_body(404, "COMMON_NOT_FOUND", "nope")))

    with pytest.raises(NotFound) as caught:
        client.get(RID, created_at=created_at)

    assert (caught.value.http_status, caught.value.code) == (404, "COMMON_NOT_FOUND")
    assert len(server.seen("GET")) == 1


def test_transient_404_retries_end_with_the_window(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    client = make_client(retry=dataclasses.replace(FAST, not_found_window=0.2))
    server.on(
        "GET", f"/process/{RID}", *[Reply(404, error_body(404, "COMMON_NOT_FOUND", "x"))] * 50
    )

    with pytest.raises(NotFound):
        client.get(RID, created_at=datetime.now(UTC))

    assert 2 <= len(server.seen("GET")) < 50


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, ClientError), (409, ClientError), (403, Unauthorized), (404, NotFound)],
)
def test_4xx_fails_at_once_with_the_api_code_and_message(
    client: BatchClient, server: ScriptedServer, status: int, kind: type[ApiError]
) -> None:
    body = error_body(status, "COMMON_BAD_PAYLOAD", "Only requests with status X can be Y.")
    server.on("PUT", f"/process/{RID}", Reply(status, body))

    with pytest.raises(kind) as caught:
        client.update_description(RID, "d")

    error = caught.value
    assert (error.http_status, error.code, error.endpoint) == (
        status,
        "COMMON_BAD_PAYLOAD",
        "update",
    )  # type: ignore[attr-defined]
    assert error.message == "Only requests with status X can be Y."  # type: ignore[attr-defined]
    assert str(error) == f"update: HTTP {status} COMMON_BAD_PAYLOAD: {error.message}"  # type: ignore[attr-defined]
    assert len(server.seen("PUT")) == 1


def test_a_refusal_after_an_attempt_that_may_have_landed_is_ambiguous(
    client: BatchClient, server: ScriptedServer
) -> None:
    # The first stop may have worked before the 502; the second is refused because of it.
    server.on(
        "POST",
        f"/process/{RID}/stop",
        Reply(502, "bad gateway"),
        Reply(400, error_body(400, "COMMON_BAD_PAYLOAD", "already stopped")),
    )

    with pytest.raises(ClientError) as caught:
        client.stop(RID)

    assert caught.value.ambiguous is True


def test_the_settings_not_found_window_bounds_the_clients_own_retries(
    server: ScriptedServer,
) -> None:
    # NOT_FOUND_WINDOW is the one window: the client made from the settings stops retrying a
    # 404 once it is past, and the lifecycle's own re-send schedule takes over.
    settings = Settings(
        api_url=server.base,
        token_url=server.token_url,
        client_id=server.client_id,
        client_secret=server.client_secret,
        not_found_window=1.0,
    )
    server.on(
        "GET", f"/process/{RID}", *[Reply(404, error_body(404, "COMMON_NOT_FOUND", "x"))] * 50
    )
    with BatchClient.from_settings(settings) as client, pytest.raises(NotFound):
        client.get(RID, created_at=datetime.now(UTC) - timedelta(seconds=2))

    assert len(server.seen("GET")) == 1
