"""List pages (batch-v2-api.md §2.1): count, viewtoken, links, sort, search, lag, history."""

from __future__ import annotations

import time

import pytest
import requests

from tests.simulator.conftest import Api, small_request
from worker.simulator import Running, SimulatorConfig, start_background

pytestmark = pytest.mark.integration


def all_pages(api: Api, **params: object) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    url: str | None = api.base + "/process"
    first = True
    while url:
        body = api.session.get(url, params=params if first else None, timeout=10).json()
        first = False
        items += body["data"]
        url = body["links"].get("next")
    return items


def test_history_pages_and_new_requests_last(sim: Running) -> None:
    with start_background(
        SimulatorConfig(history=250, requests_per_minute=0, write_artifacts=False)
    ) as big:
        api = Api(big)
        mine = api.create()
        page = api.get("/process").json()
        assert len(page["data"]) == 100 and page["links"]["nextToken"]  # page_size_max
        listed = all_pages(api, count=40)
        assert len(listed) == 251 and len({t["id"] for t in listed}) == 251
        assert listed[-1]["id"] == mine["id"]
        assert {t["status"] for t in listed[:-1]} <= {"DONE", "FAILED", "STOPPED"}
        newest = api.get("/process", params={"sort": "created:desc", "count": 1}).json()
        assert newest["data"][0]["id"] == mine["id"]


def test_created_desc_cursor_is_stable_when_requests_arrive(api: Api) -> None:
    for _ in range(4):
        api.create()
    first = api.get("/process", params={"sort": "created:desc", "count": 3}).json()
    api.create()  # arrives between two pages
    second = api.get(
        "/process",
        params={"sort": "created:desc", "count": 3, "viewtoken": first["links"]["nextToken"]},
    ).json()
    ids = [t["id"] for t in first["data"] + second["data"]]
    assert len(set(ids)) == 6
    created = [t["created"] for t in first["data"] + second["data"]]
    assert created == sorted(created, reverse=True)


def test_sort_by_status(api: Api) -> None:
    task = api.create()
    statuses = [t["status"] for t in api.get("/process", params={"sort": "status"}).json()["data"]]
    assert statuses[0] == "CREATED" and task["status"] == "CREATED"
    desc = api.get("/process", params={"sort": "status:desc"}).json()["data"]
    assert desc[-1]["id"] == task["id"]
    assert api.get("/process", params={"sort": "size"}).status_code == 400


@pytest.mark.parametrize(
    ("mode", "search", "expected"),
    [
        ("substring", "bw1234", {"alpha bw1234abc", "x-bw1234abc-y"}),
        ("substring", "alpha&beta", {"alpha beta"}),
        ("substring", "gamma|beta", {"alpha beta", "gamma"}),
        ("words", "bw1234abc", {"alpha bw1234abc", "x-bw1234abc-y"}),
        ("words", "bw1234", set()),
        ("ignored", "nothing-matches", None),
    ],
)
def test_search_modes(
    sim: Running, api: Api, mode: str, search: str, expected: set[str] | None
) -> None:
    sim.configure(search_mode=mode, history=0)
    for description in ("alpha bw1234abc", "x-bw1234abc-y", "alpha beta", "gamma"):
        api.create(small_request(description))
    found = {t["request"]["description"] for t in all_pages(api, search=search)}
    if expected is None:
        assert len(found) == 4 + 3  # everything, history included
    else:
        assert found == expected


def test_list_lag_hides_new_requests_for_a_while(sim: Running, api: Api) -> None:
    sim.configure(list_lag=0.3)
    task = api.create()
    listed = {t["id"] for t in all_pages(api)}
    assert task["id"] not in listed
    assert api.get(f"/process/{task['id']}").status_code == 200  # GET sees it at once
    time.sleep(0.35)  # the list catches up
    assert task["id"] in {t["id"] for t in all_pages(api)}


def test_bad_count_and_token_are_400(api: Api) -> None:
    assert api.get("/process", params={"count": 0}).status_code == 400
    assert api.get("/process", params={"viewtoken": "!!"}).status_code == 400
    assert len(api.get("/process", params={"count": 1000}).json()["data"]) == 3


def test_links_carry_the_current_token(api: Api) -> None:
    for _ in range(3):
        api.create()
    first = api.get("/process", params={"count": 2}).json()
    token = first["links"]["nextToken"]
    second = requests.get(first["links"]["next"], headers=api.session.headers).json()
    assert second["links"]["currentToken"] == token
    assert second["links"]["@id"].endswith(f"viewtoken={token}")


def test_a_listed_request_is_the_one_a_get_answers(api: Api) -> None:
    # List pages splice each request's cached JSON: the cache must follow a PUT.
    task = api.create(small_request("before"))
    listed = {t["id"]: t for t in all_pages(api, sort="created:desc")}
    assert listed[task["id"]] == task
    assert api.put(f"/process/{task['id']}", json={"description": "after"}).status_code == 200
    again = {t["id"]: t for t in all_pages(api, sort="created:desc")}
    assert again[task["id"]]["request"]["description"] == "after"
    assert again[task["id"]] == api.get(f"/process/{task['id']}").json()
