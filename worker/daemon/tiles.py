"""Tile counts of a batch request, read from its delivery bucket (batch-v2-api.md §8).

The API's task carries no tile counts (§2: V2 dropped the tiles endpoints). Two files the
service writes next to the outputs hold them:

- the feature manifest ``featureManifest-<id>.gpkg`` (§8.2), written by the analysis: a
  GeoPackage with one ``feature_<crs>`` table per CRS and one row per feature *and output*,
  so ``total`` counts distinct ``identifier`` values across all those tables;
- the execution database ``execution-<id>.sqlite`` (§8.3), re-uploaded while processing:
  table ``features`` with a ``status`` per feature; ``DONE`` rows are processed, ``FATAL``
  rows failed for good.

Both are SQLite files in the producer's own bucket, so both are read as hostile input: at
most ``max_bytes`` of them, held in memory up to ``IN_MEMORY_BYTES`` (a temporary file past
that, in a folder of this process's that the next start sweeps if the process was killed),
opened read-only with the schema checked before any query (the counted tables must be
tables, not views or virtual tables, with the columns counted), and every query bounded in
time (``SQLITE_SECONDS``): a recursive view named ``features`` is refused, not run forever.
Reading is best effort: whatever goes wrong (no bucket, access denied, a file not written
yet, a corrupt, oversized, hostile or slow file) makes the part unknown, is logged once per
request, and never raises into the engine.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from worker.api.artifacts import artifact_keys, delivery_url
from worker.api.geopackage import quote_identifier
from worker.daemon.bucket_files import (
    SQLITE_SECONDS,
    TEMP_PREFIX,
    File,
    bounded,
    columns,
    interrupted,
    plain_tables,
    sweep_stale_temp_dirs,
)
from worker.lifecycle import Tiles, manifest_lower_bound

if TYPE_CHECKING:
    from worker.metrics import Metrics

logger = logging.getLogger(__name__)

MANIFEST = "manifest"
EXECUTION_DB = "execution_db"

_CHUNK = 1 << 20
# The S3 client's timeouts and tries (worker/liveness.py derives a step's bound from them).
# Retries are few and short: the next poll is the real retry.
S3_CONNECT_TIMEOUT = 5.0
S3_READ_TIMEOUT = 30.0
S3_MAX_ATTEMPTS = 3
# Codes S3 (and S3-compatible stores) answer for a key that is not there (yet).
_ABSENT_CODES = frozenset({"NoSuchKey", "404", "NotFound"})

K = TypeVar("K")
V = TypeVar("V")


class _Bounded(Generic[K, V]):
    """A small least-recently-used map: per-request memory must not grow with history."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


class _Absent(Exception):
    """The object does not exist (yet)."""


class _NotModified(Exception):
    """The object still has the ETag we read last time."""


class _Unreadable(Exception):
    """Anything else: access, network, size, format. The message says which."""


@dataclass(frozen=True)
class _ExecutionCounts:
    etag: str | None
    processed: int
    failed: int


class TileReader:
    """Reads (and caches) tile counts of batch requests. Safe to share between threads."""

    def __init__(
        self,
        *,
        s3_client: Any | None = None,
        max_bytes: int = 512 * 2**20,
        metrics: Metrics | None = None,
        cache_size: int = 4096,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        """``on_progress`` is called on the reading thread as a download moves on (the
        object's answer, then every MiB): a large file on a slow link is progress, not a
        hang (the daemon's liveness watch, worker/daemon/health.py)."""
        self._client = s3_client
        self._client_lock = threading.Lock()
        self._max_bytes = max_bytes
        self._metrics = metrics
        self._progress = on_progress or (lambda: None)
        self._lock = threading.Lock()
        # The manifest never changes once written: its total (and the least its features'
        # sizes can cost) is read once per request.
        self._totals: _Bounded[str, tuple[int, float | None]] = _Bounded(cache_size)
        # The execution database changes every upload: remember its ETag to skip re-reads.
        self._executions: _Bounded[str, _ExecutionCounts] = _Bounded(cache_size)
        self._reported: _Bounded[tuple[str, str], bool] = _Bounded(cache_size)
        # Files past IN_MEMORY_BYTES go here; what a killed process left is swept now.
        root = Path(tempfile.gettempdir())
        sweep_stale_temp_dirs(root)
        self._temp_dir = root / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def read(self, request: dict[str, Any], request_id: str, *, execution_db: bool) -> Tiles | None:
        """Tile counts of batch request ``request_id`` (``request``: its create payload).

        ``None`` when nothing can be known: the manifest cannot be read, or
        ``execution_db`` is asked for and that file exists but cannot be read (counts are
        never made up, so the tile counters never double-count). Before processing has
        written an execution database, processed and failed are 0.
        """
        url = delivery_url(request)
        if url is None:
            self._report(request_id, MANIFEST, "the request has no output.delivery.s3.url")
            return None
        try:
            bucket, manifest_key, execution_key = artifact_keys(url, request_id)
        except ValueError:
            self._report(request_id, MANIFEST, "the delivery url is not an s3:// url")
            return None

        total = self._manifest_total(bucket, manifest_key, request_id)
        if total is None or not execution_db:
            return None if total is None else Tiles(total=total)
        counts = self._execution_counts(bucket, execution_key, request_id)
        if counts is None:
            return None
        return Tiles(total=total, processed=counts.processed, failed=counts.failed)

    def fetch(self, bucket: str, key: str) -> File:
        """An object of a producer's bucket, bounded as the counts' files are (close it).

        Raises ``LookupError`` when it is not there, ``ValueError`` (the reason, never the
        object's content) when it cannot be read."""
        try:
            return self._download(bucket, key, etag=None)[1]
        except _Absent:
            raise LookupError(f"s3://{bucket}/{key} is not there") from None
        except (_Unreadable, _NotModified) as exc:
            raise ValueError(f"s3://{bucket}/{key}: {exc}") from None

    def put(self, bucket: str, key: str, body: bytes) -> None:
        """Write an object with the worker's own identity; ``ValueError`` names the code."""
        try:
            self._s3().put_object(
                Bucket=bucket, Key=key, Body=body, ContentType="application/geopackage+sqlite3"
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "")) or "refused"
            raise ValueError(f"s3://{bucket}/{key}: {code}") from None
        except (BotoCoreError, OSError) as exc:
            raise ValueError(f"s3://{bucket}/{key}: {type(exc).__name__}") from None

    def cost_bound(self, request_id: str) -> float | None:
        """The least the PU rules can charge for the features of the manifest last read for
        ``request_id`` (lifecycle/cost.py), if it was read and names their sizes."""
        with self._lock:
            cached = self._totals.get(request_id)
        return None if cached is None else cached[1]

    # --- the two files -------------------------------------------------------------------

    def _manifest_total(self, bucket: str, key: str, request_id: str) -> int | None:
        with self._lock:
            cached = self._totals.get(request_id)
        if cached is not None:
            return cached[0]
        try:
            _, data = self._download(bucket, key, etag=None)
            with data:
                total, bound = _count_features(data)
        except (_Absent, _Unreadable) as exc:
            absent = isinstance(exc, _Absent)
            self._count(MANIFEST, "absent" if absent else "unreadable")
            reason = "not written yet" if absent else str(exc)
            self._report(request_id, MANIFEST, f"s3://{bucket}/{key}: {reason}")
            return None
        self._count(MANIFEST, "ok")
        with self._lock:
            self._totals.put(request_id, (total, bound))
        return total

    def _execution_counts(self, bucket: str, key: str, request_id: str) -> _ExecutionCounts | None:
        with self._lock:
            previous = self._executions.get(request_id)
        try:
            etag, data = self._download(bucket, key, etag=previous.etag if previous else None)
            with data:
                processed, failed = _count_statuses(data)
        except _NotModified:
            self._count(EXECUTION_DB, "not_modified")
            return previous
        except _Absent:
            # Processing has not uploaded its first database yet (§8.3).
            self._count(EXECUTION_DB, "absent")
            return _ExecutionCounts(etag=None, processed=0, failed=0)
        except _Unreadable as exc:
            self._count(EXECUTION_DB, "unreadable")
            self._report(request_id, EXECUTION_DB, f"s3://{bucket}/{key}: {exc}")
            return None
        self._count(EXECUTION_DB, "ok")
        counts = _ExecutionCounts(etag=etag, processed=processed, failed=failed)
        with self._lock:
            self._executions.put(request_id, counts)
        return counts

    # --- S3 --------------------------------------------------------------------------------

    def _s3(self) -> Any:
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                # The standard chain: AWS_ENDPOINT_URL, keys, profile, or the pod's IAM role.
                self._client = boto3.client(
                    "s3",
                    config=Config(
                        connect_timeout=S3_CONNECT_TIMEOUT,
                        read_timeout=S3_READ_TIMEOUT,
                        retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
                    ),
                )
            return self._client

    def _download(self, bucket: str, key: str, *, etag: str | None) -> tuple[str | None, File]:
        """The object and its ETag. Raises _Absent, _NotModified, _Unreadable."""
        params: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if etag:
            params["IfNoneMatch"] = etag
        file = File(self._temp_dir)
        try:
            response = self._s3().get_object(**params)
            self._progress()
            body = response["Body"]
            try:
                length = response.get("ContentLength")
                if isinstance(length, int) and length > self._max_bytes:
                    raise _Unreadable(f"{length} bytes, more than the {self._max_bytes} allowed")
                for chunk in body.iter_chunks(_CHUNK):
                    if file.size + len(chunk) > self._max_bytes:
                        raise _Unreadable(f"more than the {self._max_bytes} bytes allowed")
                    file.write(chunk)
                    self._progress()
            finally:
                body.close()
        except ClientError as exc:
            file.close()
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 304 or code == "304":
                raise _NotModified from None
            if code in _ABSENT_CODES:
                raise _Absent from None
            # The code only (AccessDenied, NoSuchBucket, ...): messages may quote the request.
            raise _Unreadable(code or f"HTTP {status}") from None
        except (BotoCoreError, OSError) as exc:
            file.close()
            raise _Unreadable(type(exc).__name__) from None
        except BaseException:
            file.close()
            raise
        tag = response.get("ETag")
        return (tag if isinstance(tag, str) else None), file

    # --- bookkeeping -----------------------------------------------------------------------

    def _count(self, file: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.tile_read(file, outcome)

    def _report(self, request_id: str, file: str, reason: str) -> None:
        """Log why a part is unknown, once per request and file (the engine asks every poll)."""
        with self._lock:
            if self._reported.get((request_id, file)):
                return
            self._reported.put((request_id, file), True)
        logger.info(
            "tile counts unknown: cannot read the %s: %s",
            file.replace("_", " "),
            reason,
            extra={"batch_request_id": request_id},
        )


def _count_features(file: File) -> tuple[int, float | None]:
    """Distinct feature identifiers across every ``feature_*`` table of a manifest, and the
    least the PU rules charge for them by their sizes (None without width and height)."""
    try:
        with closing(bounded(file.open())) as conn:
            tables = plain_tables(conn, "name LIKE 'feature\\_%' ESCAPE '\\'")
            if not tables:
                raise _Unreadable("no feature_* tables: not a feature manifest")
            for table in tables:
                if "identifier" not in columns(conn, table):
                    raise _Unreadable(f"table {table} has no identifier column")
            # One row per feature *and output*: only DISTINCT de-duplicates within a table.
            rows = " UNION ALL ".join(
                f"SELECT identifier FROM {quote_identifier(t)} WHERE identifier IS NOT NULL"
                for t in tables
            )
            (count,) = conn.execute(f"SELECT COUNT(DISTINCT identifier) FROM ({rows})").fetchone()
            bound = _size_bound(conn, tables)
    except sqlite3.Error as exc:
        if interrupted(exc):
            raise _Unreadable(f"reading took longer than {SQLITE_SECONDS:g} s") from None
        raise _Unreadable(f"not a readable GeoPackage ({exc})") from None
    return int(count), bound


def _size_bound(conn: sqlite3.Connection, tables: list[str]) -> float | None:
    """The manifest's cost lower bound: each distinct feature once, at its largest output
    (the outputs of one feature may differ in size; counting each would not be a bound)."""
    if not all({"width", "height"} <= set(columns(conn, t)) for t in tables):
        return None
    sizes = " UNION ALL ".join(
        f"SELECT identifier, CAST(width AS INTEGER) * CAST(height AS INTEGER) AS pixels"
        f" FROM {quote_identifier(t)} WHERE identifier IS NOT NULL"
        for t in tables
    )
    rows = conn.execute(f"SELECT MAX(pixels) FROM ({sizes}) GROUP BY identifier")
    return manifest_lower_bound(int(pixels) for (pixels,) in rows if pixels is not None)


def _count_statuses(file: File) -> tuple[int, int]:
    """(DONE rows, FATAL rows) of the execution database's ``features`` table."""
    try:
        with closing(bounded(file.open())) as conn:
            if not plain_tables(conn, "name = ?", "features"):
                raise _Unreadable("no features table (a view or a virtual table is not read)")
            if "status" not in columns(conn, "features"):
                raise _Unreadable("the features table has no status column")
            rows = conn.execute(
                "SELECT status, COUNT(*) FROM features "
                "WHERE status IN ('DONE', 'FATAL') GROUP BY status"
            ).fetchall()
    except sqlite3.Error as exc:
        if interrupted(exc):
            raise _Unreadable(f"reading took longer than {SQLITE_SECONDS:g} s") from None
        raise _Unreadable(f"not a readable execution database ({exc})") from None
    counts = {str(status): int(n) for status, n in rows}
    return counts.get("DONE", 0), counts.get("FATAL", 0)
