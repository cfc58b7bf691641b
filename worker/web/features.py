"""A batch request's features as GeoJSON, each with its status, from the delivery bucket.

The feature manifest (batch-v2-api.md §8.2) holds each feature's geometry, in the CRS of
its ``feature_<crs>`` table, once per output; the execution database (§8.3) each feature's
``status``. A feature the execution database does not list (processing has not reached
it, or not begun) is ``PENDING``; ``DONE`` and ``FATAL`` are taken as written, any other
status is ``PENDING`` too. Geometries are reprojected to WGS 84 for the map (pyproj) from
their WKB (shapely).

Both files are the producer's, read as hostile input through the daemon's bounded readers
(``worker.daemon.bucket_files``): size-capped downloads, read-only SQLite, the schema
checked before any query, every query bounded in time. The manifest never changes once
written and is kept per request; the execution database is read again only when its
ETag changes.
"""

from __future__ import annotations

import functools
import sqlite3
import threading
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass
from typing import Any

from worker.api import geopackage
from worker.api.artifacts import artifact_keys, delivery_base, delivery_url
from worker.api.geopackage import quote_identifier
from worker.daemon.bucket_files import (
    Absent,
    BucketReader,
    File,
    NotModified,
    Unreadable,
    bounded,
    columns,
    plain_tables,
)

STATUSES = ("DONE", "FATAL", "PENDING")
# Enough for a country-sized job on the 10 km grid; past it the answer says it is cut.
MAX_FEATURES = 50_000
MAX_BYTES = 256 * 2**20
_CACHED_REQUESTS = 16


@dataclass(frozen=True)
class _Feature:
    identifier: str
    geometry: dict[str, Any]
    paths: dict[str, str]  # outputId -> where that output of the feature is delivered


@dataclass(frozen=True)
class _Statuses:
    etag: str | None
    by_name: dict[str, str]


class FeatureReader:
    """Reads and caches features of batch requests; safe to share between threads."""

    def __init__(self, *, s3_client: Any | None = None, max_bytes: int = MAX_BYTES) -> None:
        self._bucket = BucketReader(s3_client=s3_client, max_bytes=max_bytes)
        self._lock = threading.Lock()
        self._manifests: OrderedDict[str, tuple[list[_Feature], bool]] = OrderedDict()
        self._statuses: OrderedDict[str, _Statuses] = OrderedDict()

    def collection(self, request: dict[str, Any] | None, request_id: str) -> dict[str, Any]:
        """A GeoJSON FeatureCollection; ``counts``, ``delivery`` and ``problems`` are
        foreign members (RFC 7946 §6.1) a map or a script reads beside the features."""
        url = delivery_url(request) if request else None
        problems: list[str] = []
        if url is None or not url.startswith("s3://"):
            return _collection([], {}, None, ["the request has no s3:// delivery url"], False)
        bucket, manifest_key, execution_key = artifact_keys(url, request_id)
        delivery = {
            "base": delivery_base(url, request_id),
            "url": url,
            "feature_manifest": f"s3://{bucket}/{manifest_key}",
            "execution_db": f"s3://{bucket}/{execution_key}",
        }
        features: list[_Feature] = []
        truncated = False
        try:
            features, truncated = self._manifest(bucket, manifest_key, request_id)
        except Unreadable as exc:
            problems.append(f"feature manifest: {exc}")
        statuses: dict[str, str] = {}
        if features:
            try:
                statuses = self._execution(bucket, execution_key, request_id)
            except Unreadable as exc:
                problems.append(f"execution database: {exc}")
        return _collection(features, statuses, delivery, problems, truncated)

    # --- the two files -------------------------------------------------------------------

    def _manifest(self, bucket: str, key: str, request_id: str) -> tuple[list[_Feature], bool]:
        with self._lock:
            cached = self._manifests.get(request_id)
        if cached is not None:
            return cached
        _, file = self._bucket.download(bucket, key)
        with file:
            read = _read_manifest(file)
        with self._lock:
            _remember(self._manifests, request_id, read)
        return read

    def _execution(self, bucket: str, key: str, request_id: str) -> dict[str, str]:
        with self._lock:
            previous = self._statuses.get(request_id)
        try:
            etag, file = self._bucket.download(
                bucket, key, etag=previous.etag if previous else None
            )
        except NotModified:
            assert previous is not None
            return previous.by_name
        except Absent:
            return {}  # processing has not written one yet: every feature is PENDING
        with file:
            by_name = _read_statuses(file)
        with self._lock:
            _remember(self._statuses, request_id, _Statuses(etag, by_name))
        return by_name


def _remember(cache: OrderedDict[str, Any], key: str, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHED_REQUESTS:
        cache.popitem(last=False)


def _collection(
    features: list[_Feature],
    statuses: dict[str, str],
    delivery: dict[str, str] | None,
    problems: list[str],
    truncated: bool,
) -> dict[str, Any]:
    counts = dict.fromkeys(STATUSES, 0)
    out = []
    for feature in features:
        status = statuses.get(feature.identifier, "PENDING")
        status = status if status in STATUSES else "PENDING"
        counts[status] += 1
        out.append(
            {
                "type": "Feature",
                "id": feature.identifier,
                "geometry": feature.geometry,
                "properties": {
                    "identifier": feature.identifier,
                    "status": status,
                    "paths": feature.paths,
                },
            }
        )
    return {
        "type": "FeatureCollection",
        "features": out,
        "counts": counts,
        "truncated": truncated,
        "delivery": delivery,
        "problems": problems,
    }


def _read_manifest(file: File) -> tuple[list[_Feature], bool]:
    try:
        with closing(bounded(file.open())) as conn:
            tables = plain_tables(conn, "name LIKE 'feature\\_%' ESCAPE '\\'")
            if not tables:
                raise Unreadable("no feature_* tables: not a feature manifest")
            geometry_columns = _geometry_columns(conn)
            by_id: dict[str, _Feature] = {}
            truncated = False
            for table in tables:
                present = columns(conn, table)
                geom, srs_id = geometry_columns.get(table, ("geom", None))
                if not {"identifier", geom} <= present:
                    raise Unreadable(f"table {table} has no identifier or geometry column")
                srs = srs_id if srs_id is not None else _srs_from_name(table)
                output = "outputId" if "outputId" in present else "NULL"
                path = "path" if "path" in present else "NULL"
                rows = conn.execute(
                    f"SELECT identifier, {quote_identifier(geom)},"
                    f" {quote_identifier(output) if output != 'NULL' else output},"
                    f" {quote_identifier(path) if path != 'NULL' else path}"
                    f" FROM {quote_identifier(table)} WHERE identifier IS NOT NULL"
                )
                for identifier, blob, output_id, where in rows:
                    name = str(identifier)
                    known = by_id.get(name)
                    if known is None:
                        if len(by_id) >= MAX_FEATURES:
                            truncated = True
                            continue
                        known = _Feature(name, _geojson(blob, srs), {})
                        by_id[name] = known
                    if output_id is not None and where is not None:
                        known.paths[str(output_id)] = str(where)
    except sqlite3.Error as exc:
        raise Unreadable(f"not a readable GeoPackage ({exc})") from None
    return list(by_id.values()), truncated


def _geometry_columns(conn: sqlite3.Connection) -> dict[str, tuple[str, int | None]]:
    if not plain_tables(conn, "name = ?", "gpkg_geometry_columns"):
        return {}
    if not {"table_name", "column_name", "srs_id"} <= columns(conn, "gpkg_geometry_columns"):
        return {}
    return {
        str(table): (str(column), int(srs) if isinstance(srs, int) else None)
        for table, column, srs in conn.execute(
            "SELECT table_name, column_name, srs_id FROM gpkg_geometry_columns"
        )
    }


def _srs_from_name(table: str) -> int | None:
    suffix = table.removeprefix("feature_")
    return int(suffix) if suffix.isdigit() else None


def _read_statuses(file: File) -> dict[str, str]:
    try:
        with closing(bounded(file.open())) as conn:
            if not plain_tables(conn, "name = ?", "features"):
                raise Unreadable("no features table (a view or a virtual table is not read)")
            if not {"name", "status"} <= columns(conn, "features"):
                raise Unreadable("the features table has no name or status column")
            return {
                str(name): str(status)
                for name, status in conn.execute(
                    "SELECT name, status FROM features WHERE name IS NOT NULL"
                )
            }
    except sqlite3.Error as exc:
        raise Unreadable(f"not a readable execution database ({exc})") from None


def _geojson(blob: object, srs_id: int | None) -> dict[str, Any]:
    """A GeoPackage geometry blob as a GeoJSON geometry in WGS 84."""
    import shapely
    from shapely.geometry import mapping

    try:
        parts = geopackage.decode(blob)
    except ValueError as exc:
        raise Unreadable(str(exc)) from None
    try:
        geometry = shapely.from_wkb(parts.wkb)
    except shapely.errors.GEOSException as exc:
        raise Unreadable(f"a geometry is not WKB ({exc})") from None
    epsg = srs_id if srs_id is not None else parts.srs_id
    if epsg not in (4326, 0, -1):
        transform = _to_wgs84(epsg)
        geometry = shapely.transform(geometry, transform, interleaved=False)
    result: dict[str, Any] = mapping(geometry)
    return result


@functools.lru_cache(maxsize=64)
def _to_wgs84(epsg: int) -> Any:
    from pyproj import Transformer
    from pyproj.exceptions import CRSError

    try:
        transformer = Transformer.from_crs(epsg, 4326, always_xy=True)
    except CRSError:
        raise Unreadable(f"EPSG:{epsg} is not a CRS this reader knows") from None
    return transformer.transform
