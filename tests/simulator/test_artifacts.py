"""Artifacts in the delivery bucket (batch-v2-api.md §8), written through boto3 to moto's S3."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from tests.simulator.conftest import EXAMPLES, FAST, Api, example_request
from worker.api.artifacts import artifact_keys
from worker.simulator import Running, SimulatorConfig, delivery, start_background

pytestmark = pytest.mark.integration


@pytest.fixture
def s3_sim(s3_bucket: str) -> Iterator[Running]:
    config = SimulatorConfig(**{**FAST, "write_artifacts": True, "speed": 1000.0})
    with start_background(config) as running:
        yield running


def in_bucket(request: dict[str, Any], bucket: str) -> dict[str, Any]:
    request["output"]["delivery"]["s3"]["url"] = request["output"]["delivery"]["s3"]["url"].replace(
        "demo-bucket", bucket
    )
    if request["input"]["type"] == "geopackage":
        request["input"]["features"]["s3"]["url"] = f"s3://{bucket}/inputs/corsica-fields.gpkg"
    return request


def run_to(api: Api, job_id: str, statuses: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 20  # a bound on the wait, not a speed assertion
    while time.monotonic() < deadline:
        body: dict[str, Any] = api.get(f"/process/{job_id}").json()
        if body["status"] in statuses:
            return body
        time.sleep(0.05)
    raise AssertionError(f"{job_id} never reached {statuses}")


def fetch(bucket: str, key: str, tmp_path: Path) -> sqlite3.Connection:
    local = tmp_path / key.replace("/", "_")
    boto3.client("s3").download_file(bucket, key, str(local))
    return sqlite3.connect(local)


def test_zarr_manifest_has_a_row_per_feature_and_output(
    s3_sim: Running, s3_bucket: str, tmp_path: Path
) -> None:
    api = Api(s3_sim)
    task = api.create(in_bucket(example_request("max-ndvi-zarr.json"), s3_bucket))
    api.post(f"/process/{task['id']}/analyse")
    run_to(api, task["id"], {"ANALYSIS_DONE"})
    # The manifest is up before the status says ANALYSIS_DONE (no wait here).
    url = task["request"]["output"]["delivery"]["s3"]["url"]
    bucket, manifest_key, _ = artifact_keys(url, task["id"])
    assert manifest_key == f"{task['id']}/featureManifest-{task['id']}.gpkg"
    db = fetch(bucket, manifest_key, tmp_path)
    tables = [r[0] for r in db.execute("SELECT table_name FROM gpkg_contents")]
    assert tables == ["feature_3035"]
    rows = db.execute("SELECT outputId, identifier, path FROM feature_3035").fetchall()
    features = {identifier for _, identifier, _ in rows}
    assert len(rows) == 3 * len(features) and len(features) == 6
    assert {output for output, _, _ in rows} == {"band04", "band08", "maxNDVI"}
    assert rows[0][2] == f"s3://{s3_bucket}/{task['id']}"


def test_execution_db_ends_with_done_and_fatal_rows(
    s3_sim: Running, s3_bucket: str, tmp_path: Path
) -> None:
    api = Api(s3_sim)
    request = in_bucket(example_request("max-ndvi-geotiff.json"), s3_bucket)
    request["description"] += " [sim:fatal=3]"
    task = api.create(request)
    api.post(f"/process/{task['id']}/start")
    done = run_to(api, task["id"], {"DONE"})
    assert done["completionPercentage"] == 100.0
    _, manifest_key, execution_key = artifact_keys(f"s3://{s3_bucket}", task["id"])
    manifest = fetch(s3_bucket, manifest_key, tmp_path)
    features = manifest.execute("SELECT COUNT(DISTINCT identifier) FROM feature_32632").fetchone()
    db = fetch(s3_bucket, execution_key, tmp_path)
    counts = dict(db.execute("SELECT status, COUNT(*) FROM features GROUP BY status").fetchall())
    assert counts == {"DONE": features[0] - 3, "FATAL": 3}
    assert db.execute("SELECT error FROM features WHERE status = 'FATAL'").fetchone()[0]


def test_geopackage_input_is_read_for_its_features(
    s3_sim: Running, s3_bucket: str, tmp_path: Path
) -> None:
    boto3.client("s3").upload_file(
        str(EXAMPLES / "corsica-fields.gpkg"), s3_bucket, "inputs/corsica-fields.gpkg"
    )
    api = Api(s3_sim)
    task = api.create(in_bucket(example_request("geopackage-fields.json"), s3_bucket))
    api.post(f"/process/{task['id']}/analyse")
    run_to(api, task["id"], {"ANALYSIS_DONE"})
    _, manifest_key, _ = artifact_keys(f"s3://{s3_bucket}", task["id"])
    db = fetch(s3_bucket, manifest_key, tmp_path)
    names = {r[0] for r in db.execute("SELECT identifier FROM feature_32632")}
    assert len(names) == 6 and "bastia-marana" in names


def test_unreadable_geopackage_fails_the_analysis(s3_sim: Running, s3_bucket: str) -> None:
    api = Api(s3_sim)
    task = api.create(in_bucket(example_request("geopackage-fields.json"), s3_bucket))
    api.post(f"/process/{task['id']}/analyse")
    failed = run_to(api, task["id"], {"FAILED", "ANALYSIS_DONE"})
    assert failed["status"] == "FAILED" and "GeoPackage" in failed["error"]


def test_stopped_job_leaves_pending_rows(s3_sim: Running, s3_bucket: str, tmp_path: Path) -> None:
    s3_sim.configure(speed=100.0)
    api = Api(s3_sim)
    task = api.create(in_bucket(example_request("max-ndvi-geotiff.json"), s3_bucket))
    api.post(f"/process/{task['id']}/start")
    run_to(api, task["id"], {"PROCESSING"})
    api.post(f"/process/{task['id']}/stop")
    stopped = run_to(api, task["id"], {"STOPPED"})
    assert stopped["stoppedStatusReason"] == "USER_ACTION"
    _, _, execution_key = artifact_keys(f"s3://{s3_bucket}", task["id"])
    deadline = time.monotonic() + 5  # the last upload follows the stop
    while True:
        db = fetch(s3_bucket, execution_key, tmp_path)
        statuses = {r[0] for r in db.execute("SELECT status FROM features")}
        if "PENDING" in statuses or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert "PENDING" in statuses


def follow_up_input(
    bucket: str, manifest: sqlite3.Connection, names: set[str], tmp_path: Path
) -> str:
    """A GeoPackage over ``names`` (rows of the manifest), uploaded; its s3:// url."""
    from worker.api import geopackage

    (table,) = manifest.execute("SELECT table_name FROM gpkg_contents").fetchone()
    (epsg,) = manifest.execute("SELECT srs_id FROM gpkg_contents").fetchone()
    rows = {
        identifier: (
            geopackage.rectangle((0.0, 0.0, 1.0, 1.0)),
            (identifier, width, height),
        )
        for identifier, width, height in manifest.execute(
            f'SELECT identifier, width, height FROM "{table}"'
        )
        if identifier in names
    }
    path = tmp_path / "retry.gpkg"
    conn = geopackage.create(path)
    columns = [
        geopackage.Column("identifier", "TEXT"),
        geopackage.Column("width", "INTEGER"),
        geopackage.Column("height", "INTEGER"),
    ]
    geopackage.add_feature_table(conn, table, epsg, columns, rows.values(), primary_key="id")
    conn.commit()
    conn.close()
    boto3.client("s3").upload_file(str(path), bucket, "retry/retry.gpkg")
    return f"s3://{bucket}/retry/retry.gpkg"


@pytest.mark.parametrize(("markers", "fatal_again"), [("", 0), (" [sim:fatal-attempts=2]", 3)])
def test_a_follow_up_over_fatal_features_runs_them_again_at_their_paths(
    s3_sim: Running, s3_bucket: str, tmp_path: Path, markers: str, fatal_again: int
) -> None:
    api = Api(s3_sim)
    request = in_bucket(example_request("max-ndvi-geotiff.json"), s3_bucket)
    request["description"] += " [sim:fatal=3]" + markers
    first = api.create(request)
    api.post(f"/process/{first['id']}/start")
    run_to(api, first["id"], {"DONE"})
    _, manifest_key, execution_key = artifact_keys(f"s3://{s3_bucket}", first["id"])
    manifest = fetch(s3_bucket, manifest_key, tmp_path)
    db = fetch(s3_bucket, execution_key, tmp_path)
    fatal = {r[0] for r in db.execute("SELECT name FROM features WHERE status = 'FATAL'")}
    assert len(fatal) == 3

    # The same request over just those features, to the first request's own paths.
    retry = in_bucket(example_request("max-ndvi-geotiff.json"), s3_bucket)
    retry["description"] = request["description"]
    credentials = {k: v for k, v in retry["output"]["delivery"]["s3"].items() if k != "url"}
    retry["input"] = {
        "type": "geopackage",
        "features": {
            "s3": {**credentials, "url": follow_up_input(s3_bucket, manifest, fatal, tmp_path)}
        },
    }
    url = f"s3://{s3_bucket}/{first['id']}/<tileName>/<outputId>.<format>"
    retry["output"]["delivery"]["s3"]["url"] = url
    retry["output"]["overwrite"] = True
    second = api.create(retry)
    api.post(f"/process/{second['id']}/start")
    run_to(api, second["id"], {"DONE"})
    _, manifest_key, execution_key = artifact_keys(url, second["id"])
    assert manifest_key == f"{first['id']}/featureManifest-{second['id']}.gpkg"
    rerun = fetch(s3_bucket, manifest_key, tmp_path)
    paths = {r[0] for r in rerun.execute("SELECT path FROM feature_32632")}
    originals = {r[0] for r in manifest.execute("SELECT path FROM feature_32632")}
    assert len(paths) == 3 and paths <= originals
    db = fetch(s3_bucket, execution_key, tmp_path)
    counts = dict(db.execute("SELECT status, COUNT(*) FROM features GROUP BY status").fetchall())
    assert counts == {k: v for k, v in {"DONE": 3 - fatal_again, "FATAL": fatal_again}.items() if v}


@pytest.mark.parametrize("restart_mode", ["continue", "reprocess"])
def test_a_restart_after_a_stop_uploads_the_execution_db_to_the_end(
    s3_sim: Running, s3_bucket: str, tmp_path: Path, restart_mode: str
) -> None:
    """START after an UNHEALTHY stop: the request shows STOPPED for the status lag, and the
    databases of the run that follows (to all DONE) are uploaded all the same."""
    # A status lag (0.2 s) longer than an upload to the emulator, a short restart block.
    s3_sim.configure(status_lag=200.0, restart_block=100.0, restart_mode=restart_mode)
    api = Api(s3_sim)
    request = in_bucket(example_request("max-ndvi-geotiff.json"), s3_bucket)
    request["description"] += " [sim:unhealthy] [sim:features=8]"
    task = api.create(request)
    api.post(f"/process/{task['id']}/start")
    stopped = run_to(api, task["id"], {"STOPPED"})
    assert stopped["stoppedStatusReason"] == "UNHEALTHY"
    _, _, execution_key = artifact_keys(f"s3://{s3_bucket}", task["id"])
    deadline = time.monotonic() + 5
    while api.post(f"/process/{task['id']}/start").status_code != 204:
        assert time.monotonic() < deadline, "START stayed refused past the restart block"
        time.sleep(0.05)
    done = run_to(api, task["id"], {"DONE"})
    assert done["completionPercentage"] == 100.0
    db = fetch(s3_bucket, execution_key, tmp_path)
    counts = dict(db.execute("SELECT status, COUNT(*) FROM features GROUP BY status").fetchall())
    assert counts == {"DONE": 8}


def test_api_answers_while_a_manifest_is_being_made(
    s3_sim: Running, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The manifest's making holds until the API has answered a GET: made on the
    # simulator's loop, it would hold that answer too and give up at its bound instead.
    entered, answered = threading.Event(), threading.Event()
    released: list[bool] = []
    make = delivery.manifest_bytes

    def slow_manifest(*args: Any) -> bytes:
        entered.set()
        released.append(answered.wait(timeout=5))  # a bound on the wait, not a speed check
        return make(*args)

    monkeypatch.setattr(delivery, "manifest_bytes", slow_manifest)
    api = Api(s3_sim)
    task = api.create(in_bucket(example_request("max-ndvi-zarr.json"), s3_bucket))
    api.post(f"/process/{task['id']}/analyse")
    assert entered.wait(timeout=20)
    assert api.get(f"/process/{task['id']}").status_code == 200
    answered.set()
    run_to(api, task["id"], {"ANALYSIS_DONE"})
    assert released == [True]
