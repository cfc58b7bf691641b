"""The HTTP surface against a real simulator on loopback (batch-v2-api.md §2, §9, §10, §12)."""

from __future__ import annotations

import time
import uuid

import pytest
import requests

from tests.simulator.conftest import Api, example_request, small_request
from worker.api.models import Task, TaskList
from worker.simulator import Running

pytestmark = pytest.mark.integration


def wait_for(api: Api, job_id: str, status: str, limit: float = 10.0) -> dict[str, object]:
    deadline = time.monotonic() + limit  # a bound on a wait, not an assertion on speed
    while True:
        body: dict[str, object] = api.get(f"/process/{job_id}").json()
        if body["status"] == status or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_token_endpoint_issues_bearer_tokens(sim: Running) -> None:
    response = requests.post(
        sim.token_url,
        data={"grant_type": "client_credentials", "client_id": "a", "client_secret": "b"},
    )
    body = response.json()
    assert response.status_code == 200
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3599
    assert body["access_token"].count(".") == 2  # a JWT, as the real one


def test_fixed_client_credentials_are_enforced(sim: Running) -> None:
    sim.configure(client_id="me", client_secret="right")
    wrong = requests.post(
        sim.token_url,
        data={"grant_type": "client_credentials", "client_id": "me", "client_secret": "wrong"},
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    basic = requests.post(
        sim.token_url, data={"grant_type": "client_credentials"}, auth=("me", "right")
    )
    assert basic.status_code == 200


def test_missing_or_expired_token_is_401_in_the_error_shape(sim: Running) -> None:
    anonymous = requests.get(sim.url + "/api/v2/batch/process")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "COMMON_UNAUTHORIZED"
    sim.configure(token_lifetime=0.2)
    api = Api(sim)
    assert api.get("/tilinggrids").status_code == 200
    time.sleep(0.3)  # the token expires
    assert api.get("/tilinggrids").status_code == 401


def test_create_echoes_the_request_with_defaults_and_masked_keys(api: Api) -> None:
    request = small_request()
    request["output"]["delivery"]["s3"] = {
        "url": "s3://b/out",
        "accessKey": "AKIAX",
        "secretAccessKey": "hush",
    }
    task = api.create(request)
    assert uuid.UUID(task["id"])
    assert (task["status"], task["userAction"], task["completionPercentage"], task["costPU"]) == (
        "CREATED",
        "NONE",
        0.0,
        0.0,
    )
    assert task["request"]["output"]["skipExisting"] is False
    assert task["request"]["instanceType"] == "normal"
    assert "hush" not in str(task) and "AKIAX" not in str(task)
    assert task["created"].endswith("Z") and len(task["created"]) == 27
    assert "error" not in task and "stoppedStatusReason" not in task
    # The worker's own models read what the simulator answers.
    assert Task.model_validate(task).status == "CREATED"
    assert TaskList.model_validate(api.get("/process").json()).data


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["input"].update(id=42), "Tiling grid with id 42"),
        (lambda r: r["input"].update(resolution=7.0), "Resolution 7.0"),
        (lambda r: r.pop("output"), "output"),
        (lambda r: r["output"]["delivery"]["s3"].update(url="s3://b/<tileName>"), None),
        (lambda r: r["output"]["delivery"]["s3"].update(url="http://b"), "s3://"),
        # What only the service checks, past the shared model the worker applies too:
        (lambda r: r["processRequest"]["output"].update(width=512), "output.width' is not allowed"),
        (
            lambda r: r["output"]["delivery"]["s3"].update(url="s3://b/<tileName>/<colour>.tif"),
            "Unknown placeholder <colour>",
        ),
        (
            lambda r: r.update(
                input={
                    "type": "geopackage",
                    "features": {"s3": {"url": "s3://b/fields.json", "iamRoleARN": "arn:r"}},
                }
            ),
            "must point to a .gpkg file",
        ),
    ],
)
def test_create_validates_like_the_api(api: Api, change, message: str | None) -> None:  # type: ignore[no-untyped-def]
    request = small_request()
    change(request)
    response = api.post("/process", json=request)
    if message is None:
        assert response.status_code == 201
        return
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "COMMON_BAD_PAYLOAD" and message in error["message"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda r: r["output"]["delivery"]["s3"].update(url="s3://b/<tileName>/zarr"),
            "may only contain the <requestId> placeholder",
        ),
        (lambda r: r["output"]["arrayParameters"].pop("dtype"), "has no 'dtype'"),
    ],
)
def test_create_checks_zarr_outputs_like_the_api(api: Api, change, message: str) -> None:  # type: ignore[no-untyped-def]
    request = example_request("max-ndvi-zarr.json")
    change(request)
    response = api.post("/process", json=request)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "COMMON_BAD_PAYLOAD" and message in error["message"]


def test_seed_examples_are_accepted(api: Api) -> None:
    for name in ("max-ndvi-geotiff.json", "max-ndvi-zarr.json", "geopackage-fields.json"):
        assert api.post("/process", json=example_request(name)).status_code == 201, name


def test_multipart_create_takes_the_evalscript_part(api: Api) -> None:
    request = small_request()
    request["processRequest"].pop("evalscript")
    import json

    response = api.post(
        "/process",
        files={"request": (None, json.dumps(request)), "evalscript": (None, "//VERSION=3")},
    )
    assert response.status_code == 201
    assert response.json()["request"]["processRequest"]["evalscript"] == "//VERSION=3"


def test_whole_lifecycle_over_http(api: Api) -> None:
    task = api.create()
    for action in ("analyse", "start"):
        if action == "start":
            assert wait_for(api, task["id"], "ANALYSIS_DONE")["status"] == "ANALYSIS_DONE"
        response = api.post(f"/process/{task['id']}/{action}")
        assert (response.status_code, response.text) == (204, "")
    done = wait_for(api, task["id"], "DONE")
    assert done["status"] == "DONE" and done["completionPercentage"] == 100.0
    assert done["userAction"] == "START" and float(done["costPU"]) >= 100.0


def test_illegal_action_status_is_configurable(sim: Running, api: Api) -> None:
    task = api.create()
    refused = api.post(f"/process/{task['id']}/stop")
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "COMMON_BAD_PAYLOAD"
    sim.configure(illegal_action_status=409)
    assert api.post(f"/process/{task['id']}/stop").status_code == 409


def test_update_changes_description_and_409_while_processing(sim: Running, api: Api) -> None:
    sim.configure(speed=50.0)  # keep it processing for a while
    task = api.create()
    updated = api.put(f"/process/{task['id']}", json={"description": "new words"})
    assert updated.status_code == 200 and updated.json()["request"]["description"] == "new words"
    api.post(f"/process/{task['id']}/start")
    assert api.put(f"/process/{task['id']}", json={"description": "x"}).status_code == 409


def test_unknown_id_and_transient_404_after_create(sim: Running, api: Api) -> None:
    assert api.get(f"/process/{uuid.uuid4()}").json()["error"]["code"] == "COMMON_NOT_FOUND"
    sim.configure(not_found_after_create=0.3)
    task = api.create()
    assert api.get(f"/process/{task['id']}").status_code == 404
    assert api.post(f"/process/{task['id']}/start").status_code == 404
    time.sleep(0.35)  # the read-after-create window passes
    assert api.get(f"/process/{task['id']}").status_code == 200


def test_both_path_spellings_and_trailing_slash(sim: Running) -> None:
    api = Api(sim, prefix="/batch/v2")
    task = api.create()
    assert api.get(f"/process/{task['id']}").status_code == 200
    assert api.get("/process/").status_code == 200
    assert api.get("/tilinggrids/").status_code == 200
    assert api.session.delete(f"{api.base}/process/{task['id']}").status_code == 405


def test_tiling_grids_as_the_live_api_lists_them(api: Api) -> None:
    grids = api.get("/tilinggrids").json()["data"]
    assert [g["id"] for g in grids] == [0, 1, 2, 3, 6, 7]
    assert api.get("/tilinggrids/6").json()["properties"]["tileWidth"] == 100000.0
    assert api.get("/tilinggrids/5").status_code == 404
    assert api.get("/tilinggrids/x").status_code == 400
    first = api.get("/tilinggrids", params={"count": 4}).json()
    rest = api.get(
        "/tilinggrids", params={"count": 4, "viewtoken": first["links"]["nextToken"]}
    ).json()
    assert len(first["data"]) == 4 and len(rest["data"]) == 2 and "nextToken" not in rest["links"]


def test_injected_429_carries_retry_after_in_ms(sim: Running, api: Api) -> None:
    sim.configure(rate_429=1.0, retry_after_ms=2500)
    response = api.get("/tilinggrids")
    assert response.status_code == 429 and response.headers["Retry-After"] == "2500"
    assert response.json()["code"] == "RATE_LIMIT_EXCEEDED"  # bare body, as documented
    sim.configure(rate_limit_body_wrapped=True)
    assert api.get("/tilinggrids").json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"


def test_throttled_routes_answer_429_for_the_next_calls_only(sim: Running, api: Api) -> None:
    sim.configure(throttle_routes="grids,start", throttle_calls=2, retry_after_ms=300)
    assert api.get("/tilinggrids/1").status_code == 200  # route "grid": not throttled
    answers = [api.get("/tilinggrids") for _ in range(3)]
    assert [r.status_code for r in answers] == [429, 429, 200]
    assert answers[0].headers["Retry-After"] == "300"
    assert sim.simulator.config.throttle_calls == 0


def test_injected_5xx(sim: Running, api: Api) -> None:
    sim.configure(rate_5xx=1.0)
    response = api.get("/tilinggrids")
    assert response.status_code in {500, 502, 503}
    assert response.json()["error"]["code"] == "COMMON_EXCEPTION"


def test_account_limit_per_minute(sim: Running, api: Api) -> None:
    sim.configure(requests_per_minute=60)  # bursts of 10 requests, then one a second
    codes = [api.get("/tilinggrids/0").status_code for _ in range(12)]
    assert codes[:10] == [200] * 10 and codes[-1] == 429
    limited = api.get("/tilinggrids/0")
    assert 0 < int(limited.headers["Retry-After"]) <= 1000


def test_latency_is_added(sim: Running, api: Api) -> None:
    sim.configure(latency=0.2)
    began = time.monotonic()
    api.get("/tilinggrids/0")
    assert time.monotonic() - began >= 0.2


def test_admin_endpoint_reads_and_changes_settings(sim: Running, api: Api) -> None:
    changed = requests.patch(sim.url + "/admin/config", json={"page_size_max": 7})
    assert changed.status_code == 200 and changed.json()["page_size_max"] == 7
    assert len(api.get("/process").json()["data"]) == 3  # the history
    refused = requests.patch(sim.url + "/admin/config", json={"page_size_max": 0})
    assert refused.status_code == 400
    assert requests.get(sim.url + "/admin/config").json()["page_size_max"] == 7
    stats = requests.get(sim.url + "/admin/stats").json()
    assert stats["requests"]["list 200"] == 1
