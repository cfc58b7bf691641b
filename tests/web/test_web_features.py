"""A batch request's features from the delivery bucket (the S3 emulator, through boto3):
geometries reprojected to WGS 84, statuses from the execution database, hostile files
answered as problems, never raised."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import boto3
import pytest

from worker.api import geopackage
from worker.simulator.delivery import execution_db_bytes
from worker.web.features import FeatureReader

pytestmark = pytest.mark.integration

REQUEST_ID = "0a1b2c3d-0000-4000-8000-000000000001"


def _request(bucket: str) -> dict:
    return {"output": {"delivery": {"s3": {"url": f"s3://{bucket}/out/<requestId>"}}}}


def _manifest(tmp: Path) -> bytes:
    """Two features in UTM 32N (one of them twice, for two outputs), one in WGS 84."""
    path = tmp / "manifest.gpkg"
    conn = geopackage.create(path)
    columns = [geopackage.Column("outputId", "TEXT"), geopackage.Column("identifier", "TEXT"),
               geopackage.Column("path", "TEXT")]  # fmt: skip
    square = geopackage.rectangle((500_000.0, 4_650_000.0, 510_000.0, 4_660_000.0))
    beside = geopackage.rectangle((510_000.0, 4_650_000.0, 520_000.0, 4_660_000.0))
    geopackage.add_feature_table(
        conn,
        "feature_32632",
        32632,
        columns,
        [
            (square, ("b04", "32TNL", "s3://x/32TNL/b04.tif")),
            (square, ("b08", "32TNL", "s3://x/32TNL/b08.tif")),
            (beside, ("b04", "32TPL", "s3://x/32TPL/b04.tif")),
        ],
    )
    geopackage.add_feature_table(
        conn,
        "feature_4326",
        4326,
        columns,
        [(geopackage.rectangle((1, 2, 3, 4)), ("b04", "g", "p"))],
    )
    conn.commit()
    conn.close()
    return path.read_bytes()


def _put(bucket: str, name: str, body: bytes) -> None:
    boto3.client("s3").put_object(Bucket=bucket, Key=f"out/{REQUEST_ID}/{name}", Body=body)


def test_features_with_their_status_in_wgs84(s3_bucket: str, tmp_path: Path) -> None:
    _put(s3_bucket, f"featureManifest-{REQUEST_ID}.gpkg", _manifest(tmp_path))
    reader = FeatureReader()

    before = reader.collection(_request(s3_bucket), REQUEST_ID)
    assert before["counts"] == {"DONE": 0, "FATAL": 0, "PENDING": 3}
    assert before["problems"] == []

    rows = [(1, "32TNL", "DONE", None, True), (2, "g", "FATAL", "boom", False)]
    _put(s3_bucket, f"execution-{REQUEST_ID}.sqlite", execution_db_bytes(rows))
    after = reader.collection(_request(s3_bucket), REQUEST_ID)
    assert after["counts"] == {"DONE": 1, "FATAL": 1, "PENDING": 1}
    by_id = {f["id"]: f for f in after["features"]}
    assert by_id["32TNL"]["properties"]["paths"] == {
        "b04": "s3://x/32TNL/b04.tif",
        "b08": "s3://x/32TNL/b08.tif",
    }
    # UTM 32N easting 500 km is the zone's central meridian, 9 degrees east.
    lon, lat = by_id["32TNL"]["geometry"]["coordinates"][0][0]
    assert lon == pytest.approx(9.0, abs=1e-6)
    assert 41.9 < lat < 42.1
    assert by_id["g"]["geometry"]["coordinates"][0][0] == pytest.approx((1.0, 2.0))
    assert after["delivery"] == {
        "base": f"s3://{s3_bucket}/out/{REQUEST_ID}",
        "url": f"s3://{s3_bucket}/out/<requestId>",
        "feature_manifest": f"s3://{s3_bucket}/out/{REQUEST_ID}/featureManifest-{REQUEST_ID}.gpkg",
        "execution_db": f"s3://{s3_bucket}/out/{REQUEST_ID}/execution-{REQUEST_ID}.sqlite",
    }


def test_missing_and_hostile_files_are_problems(s3_bucket: str, tmp_path: Path) -> None:
    reader = FeatureReader()
    absent = reader.collection(_request(s3_bucket), REQUEST_ID)
    assert absent["features"] == [] and absent["problems"] == ["feature manifest: not written yet"]

    # A "manifest" whose feature table is a view (an endless recursion would hang a reader
    # that queried it): refused before any query.
    path = tmp_path / "hostile.gpkg"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (identifier TEXT, geom BLOB)")
    conn.execute("CREATE VIEW feature_4326 AS SELECT * FROM t")
    conn.commit()
    conn.close()
    _put(s3_bucket, f"featureManifest-{REQUEST_ID}.gpkg", path.read_bytes())
    hostile = reader.collection(_request(s3_bucket), REQUEST_ID)
    assert hostile["features"] == []
    assert hostile["problems"] == ["feature manifest: no feature_* tables: not a feature manifest"]

    no_s3 = reader.collection({"output": {"delivery": {"gs": {"url": "gs://b/x"}}}}, REQUEST_ID)
    assert no_s3["problems"] == ["the request has no s3:// delivery url"]
