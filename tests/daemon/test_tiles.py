"""worker.daemon.tiles against a real S3 endpoint (moto's server) with SQLite files made here."""

from __future__ import annotations

import logging
import math
import sqlite3
import tempfile
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from worker.api.artifacts import artifact_keys
from worker.daemon.bucket_files import IN_MEMORY_BYTES, TEMP_PREFIX
from worker.daemon.tiles import TileReader
from worker.lifecycle import Tiles, manifest_lower_bound
from worker.metrics import Metrics

pytestmark = pytest.mark.integration


def make_manifest(path: Path, tables: dict[str, list[tuple[str, str]]]) -> bytes:
    """A GeoPackage-like feature manifest: table → rows of (identifier, outputId)."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE gpkg_contents (table_name TEXT PRIMARY KEY, data_type TEXT)")
    for table, rows in tables.items():
        conn.execute(
            f'CREATE TABLE "{table}" (fid INTEGER PRIMARY KEY AUTOINCREMENT, outputId TEXT, '
            "identifier TEXT, path TEXT, width INTEGER, height INTEGER, geometry BLOB)"
        )
        conn.execute("INSERT INTO gpkg_contents VALUES (?, 'features')", (table,))
        conn.executemany(
            f'INSERT INTO "{table}" (outputId, identifier, path, width, height) '
            "VALUES (?, ?, 's3://b/x', 1000, 1000)",
            [(output, identifier) for identifier, output in rows],
        )
    # The R-tree index tables of a real GeoPackage must not be taken for feature tables.
    conn.execute("CREATE TABLE rtree_feature_32633_geometry (id INTEGER, minx REAL)")
    conn.commit()
    conn.close()
    return path.read_bytes()


def make_execution_db(path: Path, statuses: list[str]) -> bytes:
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE features (id INTEGER PRIMARY KEY, name TEXT, status TEXT, "
        "error TEXT, delivered BOOLEAN)"
    )
    conn.executemany(
        "INSERT INTO features (name, status, error, delivered) VALUES (?, ?, NULL, 0)",
        [(f"tile-{i}", status) for i, status in enumerate(statuses)],
    )
    conn.commit()
    conn.close()
    return path.read_bytes()


# Two CRS tables, three outputs: each feature appears once per output (batch-v2-api.md §8.2).
OUTPUTS = ("B04", "B08", "dataMask")
MANIFEST_TABLES = {
    "feature_32633": [(f"33T-{i}", o) for i in range(4) for o in OUTPUTS],
    "feature_32634": [(f"34T-{i}", o) for i in range(3) for o in OUTPUTS],
}
STATUSES = ["DONE"] * 5 + ["FATAL"] * 2 + ["PENDING"] * 3


def payload(bucket: str, url_tail: str = "results") -> dict[str, Any]:
    return {
        "processRequest": {},
        "input": {"type": "tiling-grid", "id": 1, "resolution": 10},
        "output": {"type": "raster", "delivery": {"s3": {"url": f"s3://{bucket}/{url_tail}"}}},
    }


class Bucket:
    def __init__(self, name: str, tmp_path: Path) -> None:
        self.name = name
        self.tmp = tmp_path
        self.s3 = boto3.client("s3")
        self.request_id = str(uuid.uuid4())
        self.request = payload(name)
        _, self.manifest_key, self.execution_key = artifact_keys(
            f"s3://{name}/results", self.request_id
        )

    def put(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.name, Key=key, Body=data)

    def put_manifest(self, tables: dict[str, list[tuple[str, str]]] = MANIFEST_TABLES) -> None:
        self.put(self.manifest_key, make_manifest(self.tmp / f"{uuid.uuid4()}.gpkg", tables))

    def put_execution(self, statuses: list[str] = STATUSES) -> None:
        self.put(self.execution_key, make_execution_db(self.tmp / f"{uuid.uuid4()}.db", statuses))


@pytest.fixture
def bucket(s3_bucket: str, tmp_path: Path) -> Bucket:
    return Bucket(s3_bucket, tmp_path)


def test_total_counts_distinct_identifiers_across_tables_and_outputs(bucket: Bucket) -> None:
    bucket.put_manifest()
    tiles = TileReader().read(bucket.request, bucket.request_id, execution_db=False)
    assert tiles == Tiles(total=7, processed=0, failed=0)


def test_total_counts_distinct_identifiers_in_a_single_table(bucket: Bucket) -> None:
    # One CRS, three outputs (the Zarr example): 3 rows per feature, 4 features.
    bucket.put_manifest({"feature_3035": MANIFEST_TABLES["feature_32633"]})
    tiles = TileReader().read(bucket.request, bucket.request_id, execution_db=False)
    assert tiles == Tiles(total=4, processed=0, failed=0)


def test_the_cost_bound_counts_each_feature_once_at_its_size(bucket: Bucket) -> None:
    # 300 features of 1000 x 1000 px, one output each, then a second output each.
    rows = [(f"f{i}", "default") for i in range(300)]
    reader = TileReader()
    assert reader.cost_bound(bucket.request_id) is None  # nothing read yet
    bucket.put_manifest({"feature_4326": rows + [(f"f{i}", "ndvi") for i in range(300)]})
    assert reader.read(bucket.request, bucket.request_id, execution_db=False) is not None
    # 1000 x 1000 px = 3.81 PU of 3 bands; one band, the batch third: 300 x 0.424 PU.
    assert reader.cost_bound(bucket.request_id) == manifest_lower_bound([1000 * 1000] * 300)
    assert reader.cost_bound(bucket.request_id) == pytest.approx(127.157, abs=1e-3)


def test_a_manifest_without_sizes_has_no_cost_bound(bucket: Bucket) -> None:
    data = _sqlite_bytes(
        bucket.tmp / "sizeless.gpkg",
        "CREATE TABLE feature_4326 (fid INTEGER PRIMARY KEY, identifier TEXT)",
        "INSERT INTO feature_4326 (identifier) VALUES ('a'), ('b')",
    )
    bucket.put(bucket.manifest_key, data)
    reader = TileReader()
    assert reader.read(bucket.request, bucket.request_id, execution_db=False) == Tiles(total=2)
    assert reader.cost_bound(bucket.request_id) is None


def test_processed_and_failed_from_the_execution_db(bucket: Bucket) -> None:
    bucket.put_manifest()
    bucket.put_execution()
    tiles = TileReader().read(bucket.request, bucket.request_id, execution_db=True)
    assert tiles == Tiles(total=7, processed=5, failed=2)


def test_execution_db_not_written_yet_is_zero(bucket: Bucket) -> None:
    bucket.put_manifest()
    tiles = TileReader().read(bucket.request, bucket.request_id, execution_db=True)
    assert tiles == Tiles(total=7, processed=0, failed=0)


def test_files_at_the_root_of_a_templated_delivery_path(bucket: Bucket) -> None:
    request = payload(bucket.name, "data/<tileName>/<outputId>.tiff")
    _, manifest_key, execution_key = artifact_keys(
        f"s3://{bucket.name}/data/<tileName>/<outputId>.tiff", bucket.request_id
    )
    assert manifest_key == f"data/featureManifest-{bucket.request_id}.gpkg"
    bucket.manifest_key, bucket.execution_key = manifest_key, execution_key
    bucket.put_manifest()
    bucket.put_execution(["DONE", "PENDING"])
    tiles = TileReader().read(request, bucket.request_id, execution_db=True)
    assert tiles == Tiles(total=7, processed=1, failed=0)


def test_execution_db_is_re_read_when_it_changes(bucket: Bucket) -> None:
    metrics = Metrics()
    reader = TileReader(metrics=metrics)
    bucket.put_manifest()
    bucket.put_execution(["DONE", "PENDING", "PENDING"])
    assert reader.read(bucket.request, bucket.request_id, execution_db=True) == Tiles(
        total=7, processed=1, failed=0
    )
    # Unchanged: a conditional GET answers 304 and the cached counts stand.
    assert reader.read(bucket.request, bucket.request_id, execution_db=True) == Tiles(
        total=7, processed=1, failed=0
    )
    bucket.put_execution(["DONE", "DONE", "FATAL"])
    assert reader.read(bucket.request, bucket.request_id, execution_db=True) == Tiles(
        total=7, processed=2, failed=1
    )
    reads = "batch_worker_tile_reads_total"
    get = metrics.registry.get_sample_value
    assert get(reads, {"file": "execution_db", "outcome": "ok"}) == 2
    assert get(reads, {"file": "execution_db", "outcome": "not_modified"}) == 1
    # The manifest was read once: its total is cached.
    assert get(reads, {"file": "manifest", "outcome": "ok"}) == 1


def test_manifest_not_written_yet_is_unknown_and_logged_once(
    bucket: Bucket, caplog: pytest.LogCaptureFixture
) -> None:
    reader = TileReader()
    with caplog.at_level(logging.INFO, logger="worker.daemon.tiles"):
        for _ in range(3):
            assert reader.read(bucket.request, bucket.request_id, execution_db=True) is None
    lines = [r for r in caplog.records if r.name == "worker.daemon.tiles"]
    assert len(lines) == 1
    assert lines[0].levelno == logging.INFO
    assert lines[0].batch_request_id == bucket.request_id  # type: ignore[attr-defined]
    # Once written, it is read (a failure is not cached).
    bucket.put_manifest()
    assert reader.read(bucket.request, bucket.request_id, execution_db=False) == Tiles(total=7)


def test_missing_bucket_is_unknown(s3_endpoint: str) -> None:
    request = payload(f"no-such-bucket-{uuid.uuid4().hex[:8]}")
    assert TileReader().read(request, str(uuid.uuid4()), execution_db=True) is None


def test_corrupt_manifest_is_unknown(bucket: Bucket) -> None:
    bucket.put(bucket.manifest_key, b"this is not sqlite at all" * 100)
    assert TileReader().read(bucket.request, bucket.request_id, execution_db=False) is None


def test_sqlite_without_feature_tables_is_unknown(bucket: Bucket) -> None:
    bucket.put_manifest(tables={})
    assert TileReader().read(bucket.request, bucket.request_id, execution_db=False) is None


def test_corrupt_execution_db_is_unknown_not_zero(bucket: Bucket) -> None:
    bucket.put_manifest()
    bucket.put(bucket.execution_key, b"\x00garbage" * 64)
    assert TileReader().read(bucket.request, bucket.request_id, execution_db=True) is None


def test_oversized_file_is_unknown(bucket: Bucket) -> None:
    bucket.put_manifest()
    reader = TileReader(max_bytes=1024)
    assert reader.read(bucket.request, bucket.request_id, execution_db=False) is None


def test_request_without_s3_delivery_is_unknown(bucket: Bucket) -> None:
    request = {"output": {"type": "raster", "createCollection": True}}
    assert TileReader().read(request, bucket.request_id, execution_db=True) is None


def test_access_denied_is_unknown(bucket: Bucket) -> None:
    class DenyingClient:
        """Stands in for S3 answering 403, which moto's server does not do unprompted."""

        def get_object(self, **_: Any) -> Any:
            from botocore.exceptions import ClientError

            raise ClientError(
                {
                    "Error": {"Code": "AccessDenied", "Message": "Access Denied"},
                    "ResponseMetadata": {"HTTPStatusCode": 403},
                },
                "GetObject",
            )

    reader = TileReader(s3_client=DenyingClient())
    assert reader.read(bucket.request, bucket.request_id, execution_db=True) is None


def test_endpoint_down_is_unknown(bucket: Bucket) -> None:
    import socket

    from botocore.config import Config

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there now: connection refused. One attempt, so the test stays quick.
    client = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{port}",
        config=Config(retries={"mode": "standard", "max_attempts": 1}),
    )
    reader = TileReader(s3_client=client)
    assert reader.read(bucket.request, bucket.request_id, execution_db=False) is None


def test_every_mib_of_a_download_counts_as_progress(bucket: Bucket) -> None:
    # An execution database of a few MiB (a large job's) on a slow link is a long read, not a
    # hang: each MiB is progress for the liveness watch of the step reading it.
    path = bucket.tmp / "large.sqlite"
    make_execution_db(path, STATUSES)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE padding (data BLOB)")
    conn.execute("INSERT INTO padding VALUES (zeroblob(3 * 1024 * 1024))")
    conn.commit()
    conn.close()
    bucket.put_manifest()
    bucket.put(bucket.execution_key, path.read_bytes())
    marks: list[None] = []
    reader = TileReader(on_progress=lambda: marks.append(None))
    tiles = reader.read(bucket.request, bucket.request_id, execution_db=True)
    assert tiles == Tiles(total=7, processed=5, failed=2)
    mib_read = math.ceil(path.stat().st_size / 2**20)
    assert mib_read >= 4
    # Each object's answer, then each MiB of it (the manifest is one).
    assert len(marks) >= 2 + 1 + mib_read


# --- hostile files in the producer's bucket (the reads are bounded) ---------------------------


def _sqlite_bytes(path: Path, *statements: str) -> bytes:
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()
    return path.read_bytes()


ENDLESS = (
    "WITH RECURSIVE r(status) AS (SELECT 'DONE' UNION ALL SELECT status FROM r) SELECT * FROM r"
)


def test_a_features_view_that_never_ends_is_refused_not_run(bucket: Bucket) -> None:
    # An endlessly recursive view named `features` stalled the worker until it exited, and
    # the next worker the same way: it is no table, so it is not read.
    bucket.put_manifest()
    bucket.put(
        bucket.execution_key,
        _sqlite_bytes(bucket.tmp / "view.db", f"CREATE VIEW features AS {ENDLESS}"),
    )
    assert TileReader().read(bucket.request, bucket.request_id, execution_db=True) is None


def test_a_manifest_view_is_not_counted(bucket: Bucket) -> None:
    data = _sqlite_bytes(
        bucket.tmp / "m.gpkg",
        "CREATE TABLE gpkg_contents (table_name TEXT)",
        f"CREATE VIEW feature_4326 AS SELECT status AS identifier FROM ({ENDLESS})",
    )
    bucket.put(bucket.manifest_key, data)
    assert TileReader().read(bucket.request, bucket.request_id, execution_db=False) is None


def test_a_table_without_the_counted_column_is_unknown(bucket: Bucket) -> None:
    bucket.put_manifest()
    bucket.put(
        bucket.execution_key,
        _sqlite_bytes(bucket.tmp / "x.db", "CREATE TABLE features (id INTEGER, state TEXT)"),
    )
    assert TileReader().read(bucket.request, bucket.request_id, execution_db=True) is None


def test_small_files_leave_nothing_on_disk_and_large_ones_are_deleted(
    bucket: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    bucket.put_manifest()
    path = bucket.tmp / "large.sqlite"
    make_execution_db(path, STATUSES)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE padding (data BLOB)")
    conn.execute(f"INSERT INTO padding VALUES (zeroblob({IN_MEMORY_BYTES + 2**20}))")
    conn.commit()
    conn.close()
    bucket.put(bucket.execution_key, path.read_bytes())
    reader = TileReader()
    assert reader.read(bucket.request, bucket.request_id, execution_db=True) == Tiles(
        total=7, processed=5, failed=2
    )
    # The large database went through a file of the reader's folder, gone once read.
    folders = list((tmp_path / "tmp").glob(f"{TEMP_PREFIX}*"))
    assert [list(folder.iterdir()) for folder in folders] == [[]]
