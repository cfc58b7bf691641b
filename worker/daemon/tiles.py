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
import sqlite3
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from worker.api.artifacts import artifact_keys, delivery_url
from worker.api.geopackage import quote_identifier
from worker.daemon.bucket_files import (
    SQLITE_SECONDS,
    Absent,
    BucketReader,
    File,
    NotModified,
    Unreadable,
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
        self._bucket = BucketReader(
            s3_client=s3_client, max_bytes=max_bytes, on_progress=on_progress
        )
        self._metrics = metrics
        self._lock = threading.Lock()
        # The manifest never changes once written: its total (and the least its features'
        # sizes can cost) is read once per request.
        self._totals: _Bounded[str, tuple[int, float | None]] = _Bounded(cache_size)
        # The execution database changes every upload: remember its ETag to skip re-reads.
        self._executions: _Bounded[str, _ExecutionCounts] = _Bounded(cache_size)
        self._reported: _Bounded[tuple[str, str], bool] = _Bounded(cache_size)
        # What a killed process left in the folder of the larger files is swept now.
        sweep_stale_temp_dirs(Path(tempfile.gettempdir()))

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
            return self._bucket.download(bucket, key)[1]
        except Absent:
            raise LookupError(f"s3://{bucket}/{key} is not there") from None
        except (Unreadable, NotModified) as exc:
            raise ValueError(f"s3://{bucket}/{key}: {exc}") from None

    def put(self, bucket: str, key: str, body: bytes) -> None:
        """Write an object with the worker's own identity; ``ValueError`` names the code."""
        self._bucket.put(bucket, key, body, content_type="application/geopackage+sqlite3")

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
            _, data = self._bucket.download(bucket, key)
            with data:
                total, bound = _count_features(data)
        except (Absent, Unreadable) as exc:
            absent = isinstance(exc, Absent)
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
            etag, data = self._bucket.download(
                bucket, key, etag=previous.etag if previous else None
            )
            with data:
                processed, failed = _count_statuses(data)
        except NotModified:
            self._count(EXECUTION_DB, "not_modified")
            return previous
        except Absent:
            # Processing has not uploaded its first database yet (§8.3).
            self._count(EXECUTION_DB, "absent")
            return _ExecutionCounts(etag=None, processed=0, failed=0)
        except Unreadable as exc:
            self._count(EXECUTION_DB, "unreadable")
            self._report(request_id, EXECUTION_DB, f"s3://{bucket}/{key}: {exc}")
            return None
        self._count(EXECUTION_DB, "ok")
        counts = _ExecutionCounts(etag=etag, processed=processed, failed=failed)
        with self._lock:
            self._executions.put(request_id, counts)
        return counts

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
                raise Unreadable("no feature_* tables: not a feature manifest")
            for table in tables:
                if "identifier" not in columns(conn, table):
                    raise Unreadable(f"table {table} has no identifier column")
            # One row per feature *and output*: only DISTINCT de-duplicates within a table.
            rows = " UNION ALL ".join(
                f"SELECT identifier FROM {quote_identifier(t)} WHERE identifier IS NOT NULL"
                for t in tables
            )
            (count,) = conn.execute(f"SELECT COUNT(DISTINCT identifier) FROM ({rows})").fetchone()
            bound = _size_bound(conn, tables)
    except sqlite3.Error as exc:
        if interrupted(exc):
            raise Unreadable(f"reading took longer than {SQLITE_SECONDS:g} s") from None
        raise Unreadable(f"not a readable GeoPackage ({exc})") from None
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
                raise Unreadable("no features table (a view or a virtual table is not read)")
            if "status" not in columns(conn, "features"):
                raise Unreadable("the features table has no status column")
            rows = conn.execute(
                "SELECT status, COUNT(*) FROM features "
                "WHERE status IN ('DONE', 'FATAL') GROUP BY status"
            ).fetchall()
    except sqlite3.Error as exc:
        if interrupted(exc):
            raise Unreadable(f"reading took longer than {SQLITE_SECONDS:g} s") from None
        raise Unreadable(f"not a readable execution database ({exc})") from None
    counts = {str(status): int(n) for status, n in rows}
    return counts.get("DONE", 0), counts.get("FATAL", 0)
