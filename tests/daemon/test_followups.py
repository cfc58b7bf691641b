"""The follow-up's input (worker/daemon/followups.py), from files the simulator writes."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from worker.api import geopackage
from worker.api.artifacts import artifact_keys
from worker.daemon.bucket_files import File
from worker.daemon.followups import RetryInputWriter
from worker.lifecycle import RetryInputFailed, RetryInputWritten
from worker.simulator import delivery
from worker.simulator.grids import Feature

RID = "0f3c5d0e-1111-4222-8333-944445555666"
URL = "s3://bucket/out"
REQUEST: dict[str, Any] = {
    "processRequest": {
        "output": {
            "responses": [
                {"identifier": "default", "format": {"type": "image/tiff"}},
                {"identifier": "ndvi", "format": {"type": "image/tiff"}},
            ]
        }
    },
    "output": {"type": "raster", "delivery": {"s3": {"url": URL}}},
}
FEATURES = [
    Feature(f"32T_{i:03d}", 32632 if i % 2 else 32633, (i, 0.0, i + 1.0, 1.0)) for i in range(8)
]


class Bucket:
    """Objects by key; ``denied`` refuses every write like S3 without the permission."""

    def __init__(self, tmp: Path, *, denied: bool = False) -> None:
        self.objects: dict[tuple[str, str], bytes] = {}
        self.tmp = tmp
        self.denied = denied

    def fetch(self, bucket: str, key: str) -> File:
        body = self.objects.get((bucket, key))
        if body is None:
            raise LookupError(f"s3://{bucket}/{key} is not there")
        file = File(self.tmp)
        file.write(body)
        return file

    def put(self, bucket: str, key: str, body: bytes) -> None:
        if self.denied:
            raise ValueError(f"s3://{bucket}/{key}: AccessDenied")
        self.objects[(bucket, key)] = body


def bucket_with_artifacts(tmp: Path, fatal: set[str], **kw: Any) -> Bucket:
    bucket = Bucket(tmp, **kw)
    _, manifest_key, execution_key = artifact_keys(URL, RID)
    bucket.objects[("bucket", manifest_key)] = delivery.manifest_bytes(REQUEST, RID, FEATURES, 512)
    rows = [
        (i + 1, f.name, "FATAL" if f.name in fatal else "DONE", None, f.name not in fatal)
        for i, f in enumerate(FEATURES)
    ]
    bucket.objects[("bucket", execution_key)] = delivery.execution_db_bytes(rows)
    return bucket


def test_the_fatal_features_rows_are_written_beside_the_manifest(tmp_path: Path) -> None:
    fatal = {"32T_001", "32T_004", "32T_007"}
    bucket = bucket_with_artifacts(tmp_path, fatal)
    answer = RetryInputWriter(bucket).write(REQUEST, RID)
    key = f"out/{RID}/failedFeatures-{RID}.gpkg"
    assert answer == RetryInputWritten(url=f"s3://bucket/{key}", features=3)
    path = tmp_path / "retry.gpkg"
    path.write_bytes(bucket.objects[("bucket", key)])
    # Readable as a GeoPackage input by the service's rules (one row per feature, §5.2).
    read = geopackage.read_features(path)
    assert sorted(f.identifier for f in read) == sorted(fatal)
    assert {f.identifier: f.extent for f in read} == {
        f.name: f.extent for f in FEATURES if f.name in fatal
    }
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47
    tables = dict(conn.execute("SELECT table_name, srs_id FROM gpkg_contents").fetchall())
    assert tables == {"feature_32632": 32632, "feature_32633": 32633}
    sizes = conn.execute("SELECT DISTINCT width, height FROM feature_32632").fetchall()
    assert sizes == [(512, 512)]
    srs = {row[0] for row in conn.execute("SELECT srs_id FROM gpkg_spatial_ref_sys")}
    assert {-1, 0, 4326, 32632, 32633} <= srs
    # Written again after a crash: the same key, the same rows.
    assert RetryInputWriter(bucket).write(REQUEST, RID) == answer


def test_without_write_access_the_reason_is_told_and_nothing_else(tmp_path: Path) -> None:
    bucket = bucket_with_artifacts(tmp_path, {"32T_002"}, denied=True)
    answer = RetryInputWriter(bucket).write(REQUEST, RID)
    assert isinstance(answer, RetryInputFailed)
    assert answer.error.code == "RETRY_INPUT_NOT_WRITTEN"
    assert "AccessDenied" in answer.error.message


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("execution_db", "is not there"),
        ("no_fatal", "no FATAL feature"),
        ("view", "not a feature manifest"),
    ],
)
def test_files_it_cannot_use_give_a_reason(tmp_path: Path, change: str, reason: str) -> None:
    bucket = bucket_with_artifacts(tmp_path, set() if change == "no_fatal" else {"32T_003"})
    _, manifest_key, execution_key = artifact_keys(URL, RID)
    if change == "execution_db":
        del bucket.objects[("bucket", execution_key)]
    if change == "view":
        # A producer's file whose feature "tables" are views: never queried.
        path = tmp_path / "hostile.gpkg"
        conn = geopackage.create(path)
        conn.execute("CREATE VIEW feature_4326 AS SELECT 1 AS identifier, 2 AS geom")
        conn.commit()
        conn.close()
        bucket.objects[("bucket", manifest_key)] = path.read_bytes()
    answer = RetryInputWriter(bucket).write(REQUEST, RID)
    assert isinstance(answer, RetryInputFailed) and reason in answer.error.message
