"""The files the service writes to the delivery bucket (batch-v2-api.md §8), via boto3.

``featureManifest-<id>.gpkg`` once analysis is done (one row per feature and output) and
``execution-<id>.sqlite`` re-uploaded while processing (one row per feature, ``PENDING`` /
``DONE`` / ``FATAL``), both in the root folder of the delivery path (§8.4). boto3 reads
``AWS_ENDPOINT_URL`` and the usual credential chain, like the worker does.
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from worker.api import geopackage
from worker.api.artifacts import artifact_keys, delivery_url, split_s3_url
from worker.simulator.grids import Feature

_EXTENSIONS = {"image/tiff": "tif", "application/json": "json", "zarr/array": "zarr"}

ExecutionRow = tuple[int, str, str, str | None, bool]


class S3:
    """One boto3 client, made on first use (boto3 clients are thread-safe once made)."""

    def __init__(self) -> None:
        self._client: Any = None
        self._lock = threading.Lock()

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                import boto3  # only when artifacts are on

                self._client = boto3.client("s3")
            return self._client

    def download(self, url: str, path: Path) -> None:
        bucket, key = split_s3_url(url)
        self.client().download_file(bucket, key, str(path))

    def put(self, bucket: str, key: str, body: bytes, content_type: str) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)


def output_path(
    request: dict[str, Any], request_id: str, feature: str, output_id: str, fmt: str
) -> str:
    """Where one output of one feature lands (§5.3 templating; zarr: the output root)."""
    url = (delivery_url(request) or "").rstrip("/")
    if request["output"]["type"] == "zarr":
        return url.replace("<requestId>", request_id)
    if "<" not in url:
        url += "/<requestId>/<tileName>/<outputId>.<format>"
    return (
        url.replace("<requestId>", request_id)
        .replace("<tileName>", feature)
        .replace("<tileId>", feature)
        .replace("<outputId>", output_id)
        .replace("<format>", _EXTENSIONS.get(fmt, "tif"))
    )


def manifest_bytes(
    request: dict[str, Any], request_id: str, features: Sequence[Feature], pixels: int
) -> bytes:
    """The feature manifest (§8.2): one ``feature_<epsg>`` table per CRS."""
    responses = request["processRequest"]["output"]["responses"]
    by_crs: dict[int, list[Feature]] = {}
    for feature in features:
        by_crs.setdefault(feature.epsg, []).append(feature)
    columns = [
        geopackage.Column("outputId", "TEXT"),
        geopackage.Column("identifier", "TEXT"),
        geopackage.Column("path", "TEXT"),
        geopackage.Column("width", "INTEGER"),
        geopackage.Column("height", "INTEGER"),
    ]
    with tempfile.TemporaryDirectory(prefix="sim-manifest-") as folder:
        path = Path(folder) / "manifest.gpkg"
        conn = geopackage.create(path)
        try:
            for epsg, members in sorted(by_crs.items()):
                rows = [
                    (
                        geopackage.rectangle(feature.extent),
                        (
                            response["identifier"],
                            feature.name,
                            output_path(
                                request,
                                request_id,
                                feature.name,
                                response["identifier"],
                                response["format"]["type"],
                            ),
                            pixels,
                            pixels,
                        ),
                    )
                    for feature in members
                    for response in responses
                ]
                geopackage.add_feature_table(conn, f"feature_{epsg}", epsg, columns, rows)
            conn.commit()
        finally:
            conn.close()
        return path.read_bytes()


def execution_db_bytes(rows: Sequence[ExecutionRow]) -> bytes:
    """The execution database (§8.3): table ``features(id, name, status, error, delivered)``."""
    with tempfile.TemporaryDirectory(prefix="sim-execution-") as folder:
        path = Path(folder) / "execution.sqlite"
        conn = sqlite3.connect(path)
        try:
            conn.execute(
                "CREATE TABLE features (id INTEGER PRIMARY KEY, name TEXT,"
                " status TEXT, error TEXT, delivered BOOLEAN)"
            )
            conn.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?)", rows)
            conn.commit()
        finally:
            conn.close()
        return path.read_bytes()


def keys(request: dict[str, Any], request_id: str) -> tuple[str, str, str] | None:
    """(bucket, manifest key, execution db key), or None for a non-S3 delivery."""
    url = delivery_url(request)
    if url is None or not url.startswith("s3://"):
        return None
    return artifact_keys(url, request_id)
