"""BatchClient against a real HTTP server on loopback: every endpoint of §2."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from api_support import MakeClient, Recorder, seed
from scripted_server import Reply, ScriptedServer, error_body, task_body

from worker.api.client import BatchClient
from worker.api.errors import PayloadInvalid, ServerError

pytestmark = pytest.mark.integration

RID = "6aa8765a-e9eb-4dd0-a567-b86cfdb840e0"


def test_create_sends_the_payload_as_given_and_returns_the_task(
    client: BatchClient, server: ScriptedServer
) -> None:
    payload = seed()
    payload["someFutureField"] = {"kept": [1, 2]}
    server.on("POST", "/process", Reply(201, task_body(RID, request=payload)))

    task = client.create(payload)

    assert task.id == RID
    assert task.status == "CREATED"
    assert task.description == "Max NDVI over Corsica"
    (sent,) = server.seen("POST", "/process")
    assert sent.json() == payload
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["authorization"] == f"Bearer {server.issued[0]}"


def test_create_refuses_an_invalid_payload_without_sending(
    client: BatchClient, server: ScriptedServer
) -> None:
    payload = seed()
    payload["output"]["delivery"]["s3"]["url"] = "https://bucket/x"

    with pytest.raises(PayloadInvalid) as caught:
        client.create(payload)

    assert caught.value.code == "INVALID_PAYLOAD"
    assert caught.value.http_status is None
    assert "output.delivery.s3.url" in caught.value.message
    assert server.seen() == []


def test_get_parses_the_task(client: BatchClient, server: ScriptedServer) -> None:
    server.on(
        "GET",
        f"/process/{RID}",
        Reply(
            200,
            task_body(
                RID,
                "STOPPED",
                completionPercentage=42.5,
                costPU=310.5,
                stoppedStatusReason="OUT_OF_PU",
                userAction="START",
                projectId="p-1",
            ),
        ),
    )

    task = client.get(RID)

    assert (task.status, task.completion_percentage, task.cost_pu) == ("STOPPED", 42.5, 310.5)
    assert task.stopped_status_reason == "OUT_OF_PU"
    assert task.user_action == "START"
    assert task.model_extra == {"projectId": "p-1"}


def test_a_request_id_cannot_change_the_path(client: BatchClient, server: ScriptedServer) -> None:
    server.on("GET", "/process/..%2Ftilinggrids", Reply(200, task_body("x")))

    client.get("../tilinggrids")

    assert [r.path for r in server.seen("GET")] == ["/api/v2/batch/process/..%2Ftilinggrids"]


def test_list_follows_view_tokens_across_pages(client: BatchClient, server: ScriptedServer) -> None:
    server.on(
        "GET",
        "/process",
        Reply(200, {"data": [task_body("a"), task_body("b")], "links": {"nextToken": "t2"}}),
        Reply(200, {"data": [task_body("c")], "links": {"next": "http://x/process?viewtoken=t3"}}),
        Reply(200, {"data": [task_body("d")], "links": {"currentToken": "t3"}}),
    )

    pages = list(client.iter_pages(sort="created:desc", search="bw0123abc", count=2))

    assert [[t.id for t in p.tasks] for p in pages] == [["a", "b"], ["c"], ["d"]]
    assert [p.next_token for p in pages] == ["t2", "t3", None]
    queries = [r.query for r in server.seen("GET", "/process")]
    assert queries[0] == {"sort": ["created:desc"], "search": ["bw0123abc"], "count": ["2"]}
    assert queries[1]["viewtoken"] == ["t2"]
    assert queries[2]["viewtoken"] == ["t3"]
    assert all(q["search"] == ["bw0123abc"] for q in queries)


def test_iter_requests_flattens_pages_and_stops_on_an_empty_page(
    client: BatchClient, server: ScriptedServer
) -> None:
    server.on(
        "GET",
        "/process",
        Reply(200, {"data": [task_body("a")], "links": {"nextToken": "t2"}}),
        Reply(200, {"data": [], "links": {"nextToken": "t3"}}),
    )

    assert [t.id for t in client.iter_requests(sort=None)] == ["a"]
    first = server.seen("GET", "/process")[0]
    assert "sort" not in first.query


def test_list_pages_read_the_status_fields_and_leave_the_rest(
    client: BatchClient, server: ScriptedServer
) -> None:
    stopped = task_body(
        "a",
        "STOPPED",
        request={"description": "job bw0123", "processRequest": {"evalscript": "//VERSION=3"}},
        completionPercentage=42.5,
        costPU=310.5,
        stoppedStatusReason="OUT_OF_PU",
        error="no units left",
        userAction="STOP",
        projectId="p-1",
    )
    odd = task_body("b", request={"description": 7})  # not a string: no description
    server.on("GET", "/process", Reply(200, {"data": [stopped, odd], "links": {}}))

    (page,) = client.iter_pages()

    a, b = page.tasks
    assert (a.id, a.status, a.user_action) == ("a", "STOPPED", "STOP")
    assert a.created == datetime(2026, 11, 25, 21, 30, 0, 123456, tzinfo=UTC)
    assert (a.completion_percentage, a.cost_pu) == (42.5, 310.5)
    assert (a.stopped_status_reason, a.error) == ("OUT_OF_PU", "no units left")
    assert a.description == "job bw0123"
    assert b.description is None
    assert page.next_token is None


def test_a_bare_array_is_one_last_page(client: BatchClient, server: ScriptedServer) -> None:
    server.on("GET", "/process", Reply(200, [task_body("a"), task_body("b")]))

    pages = list(client.iter_pages())

    assert [[t.id for t in p.tasks] for p in pages] == [["a", "b"]]
    assert pages[0].next_token is None


@pytest.mark.parametrize(
    "answer",
    [
        {"links": {}},  # no data array
        {"data": [{"id": "a"}], "links": {}},  # a task without a status
        {"data": ["a"], "links": {}},
        "not json",
    ],
)
def test_a_list_answer_that_is_not_a_page_of_tasks_is_invalid(
    client: BatchClient, server: ScriptedServer, answer: object
) -> None:
    server.on("GET", "/process", Reply(200, answer))  # a str is sent as it is

    with pytest.raises(ServerError) as caught:
        list(client.iter_pages())

    assert (caught.value.code, caught.value.endpoint) == ("INVALID_RESPONSE", "list")


def test_iter_requests_keeps_the_whole_request(client: BatchClient, server: ScriptedServer) -> None:
    full = task_body("a", request={"description": "d", "input": {"type": "tiling-grid"}})
    server.on("GET", "/process", Reply(200, {"data": [full], "links": {}}))

    (task,) = client.iter_requests()

    assert task.request == {"description": "d", "input": {"type": "tiling-grid"}}


def test_update_description_puts_only_the_description(
    client: BatchClient, server: ScriptedServer
) -> None:
    server.on("PUT", f"/process/{RID}", Reply(200, task_body(RID, request={"description": "new"})))

    task = client.update_description(RID, "new")

    assert task.description == "new"
    assert server.seen("PUT")[0].json() == {"description": "new"}


def test_update_description_reads_the_task_when_the_answer_is_the_request(
    client: BatchClient, server: ScriptedServer
) -> None:
    # The spec says PUT answers with the request (BatchV2ProcessRequest), not the task.
    server.on("PUT", f"/process/{RID}", Reply(200, {"description": "new", "input": {}}))
    server.on("GET", f"/process/{RID}", Reply(200, task_body(RID, request={"description": "new"})))

    assert client.update_description(RID, "new").description == "new"


@pytest.mark.parametrize("action", ["analyse", "start", "stop"])
def test_actions_post_without_a_body(
    client: BatchClient, server: ScriptedServer, recorder: Recorder, action: str
) -> None:
    server.on("POST", f"/process/{RID}/{action}", Reply(204))

    getattr(client, action)(RID)

    (sent,) = server.seen("POST", f"/process/{RID}/{action}")
    assert sent.body == b""
    assert recorder.codes(action) == ["204"]


def test_tiling_grids_are_listed_across_pages_and_read_one_by_one(
    client: BatchClient, server: ScriptedServer
) -> None:
    grid = {"id": 0, "name": "20km grid", "properties": {"resolutions": [10.0, 20.0, 60.0]}}
    server.on(
        "GET",
        "/tilinggrids",
        Reply(200, {"data": [grid], "links": {"nextToken": "n"}}),
        Reply(200, {"data": [{"id": 6, "name": "LAEA 100km grid", "properties": {}}]}),
    )
    server.on("GET", "/tilinggrids/6", Reply(200, {"id": 6, "name": "LAEA", "properties": {}}))

    grids = list(client.iter_tiling_grids())
    one = client.get_tiling_grid(6)

    assert [(g.id, g.name) for g in grids] == [(0, "20km grid"), (6, "LAEA 100km grid")]
    assert grids[0].properties["resolutions"] == [10.0, 20.0, 60.0]
    assert (one.id, one.name) == (6, "LAEA")


def test_every_request_is_reported_to_the_hook(
    client: BatchClient, server: ScriptedServer, recorder: Recorder
) -> None:
    server.on("GET", f"/process/{RID}", Reply(404, error_body(404, "COMMON_NOT_FOUND", "gone")))
    server.on("POST", "/process", Reply(201, task_body(RID)))

    client.create(seed())
    with pytest.raises(Exception, match="gone"):
        client.get(RID)

    assert [(e, c) for e, c, _ in recorder.requests] == [
        ("token", "200"),
        ("create", "201"),
        ("get", "404"),
    ]
    assert all(seconds >= 0 for _, _, seconds in recorder.requests)


def test_a_budget_wait_is_reported(
    make_client: MakeClient, server: ScriptedServer, recorder: Recorder
) -> None:
    from worker.api.budget import RequestBudget

    # The budget's clock stands still but for its own sleeps: however slow the machine,
    # the second call finds the bucket as the first left it.
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    budget = RequestBudget(per_minute=600, burst=1, clock=lambda: now[0], sleep=sleep)
    client = make_client(budget=budget)  # one request now, then one per 0.1 s
    server.on("POST", f"/process/{RID}/start", Reply(204), Reply(204))

    client.start(RID)
    client.start(RID)

    assert len(recorder.budget_waits) == 1
    assert recorder.budget_waits[0] == pytest.approx(0.1)


def test_creates_ask_the_budget_at_low_priority_and_everything_else_at_high(
    make_client: MakeClient, server: ScriptedServer
) -> None:
    from worker.api.budget import Priority, RequestBudget

    class RecordingBudget(RequestBudget):
        def __init__(self) -> None:
            super().__init__(per_minute=6000)
            self.asked: list[Priority] = []

        def acquire(self, priority: Priority = Priority.HIGH) -> float:
            self.asked.append(priority)
            return super().acquire(priority)

    budget = RecordingBudget()
    client = make_client(budget=budget)
    server.on("POST", "/process", Reply(201, task_body(RID)))
    server.on("GET", f"/process/{RID}", Reply(200, task_body(RID)))
    server.on("GET", "/process", Reply(200, {"data": [task_body(RID)], "links": {}}))
    for action in ("analyse", "start", "stop"):
        server.on("POST", f"/process/{RID}/{action}", Reply(204))

    client.create(seed())
    client.get(RID)
    list(client.iter_pages())
    client.analyse(RID)
    client.start(RID)
    client.stop(RID)

    assert budget.asked == [Priority.LOW] + [Priority.HIGH] * 5


def test_a_netrc_entry_for_the_host_does_not_replace_the_token(
    client: BatchClient,
    server: ScriptedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password elsewhere\n")
    monkeypatch.setenv("NETRC", str(netrc))
    server.on("GET", f"/process/{RID}", Reply(200, task_body(RID)))

    client.get(RID)

    (sent,) = server.seen("GET", f"/process/{RID}")
    assert sent.headers["authorization"] == f"Bearer {server.issued[0]}"
