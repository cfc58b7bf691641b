"""The follow-up's input: a GeoPackage of a request's FATAL features, written beside its
feature manifest (docs/lifecycle.md "Re-runs of FATAL features").

The FATAL identifiers come from the request's execution database (``features.name`` where
``status = 'FATAL'``, batch-v2-api.md §8.3), their rows from its feature manifest (one per
feature: the manifest has one per feature *and output*, §8.2), geometry, width and height
as the manifest has them, so each feature is processed again at the size it had and
``<tileName>`` takes the same identifier. Both files are the producer's bucket's, read as
hostile input like the tile counts' (bounded, read-only, schema checked before a query,
worker/daemon/bucket_files.py); the GeoPackage is made fresh in memory, never by editing a
copy of theirs (a trigger of theirs would run). Written with the worker's own S3 identity,
as ``failedFeatures-<request id>.gpkg``: the same key and rows however often it is written.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from typing import Any, Protocol

from worker.api import geopackage
from worker.api.artifacts import artifact_keys, delivery_url
from worker.api.geopackage import quote_identifier
from worker.daemon.bucket_files import (
    SQLITE_SECONDS,
    File,
    bounded,
    columns,
    interrupted,
    plain_tables,
)
from worker.lifecycle import JobError, RetryInputFailed, RetryInputWritten
from worker.lifecycle.followups import RETRY_INPUT_NOT_WRITTEN

log = logging.getLogger(__name__)

FAILED_FEATURES = "failedFeatures-{id}.gpkg"
_GEOMETRY_TYPES = frozenset(
    {"GEOMETRY", "POLYGON", "MULTIPOLYGON", "CURVEPOLYGON", "MULTISURFACE", "SURFACE"}
)


class BucketFiles(Protocol):
    """What the tile reader (worker/daemon/tiles.py) lends: bounded reads, plain writes."""

    def fetch(self, bucket: str, key: str) -> File: ...
    def put(self, bucket: str, key: str, body: bytes) -> None: ...


class _Refused(Exception):
    """The input cannot be made; the message says why (never a file's content)."""


class RetryInputWriter:
    def __init__(self, files: BucketFiles) -> None:
        self._files = files

    def write(
        self, request: dict[str, Any], source_id: str
    ) -> RetryInputWritten | RetryInputFailed:
        """Write the GeoPackage of ``source_id``'s FATAL features (``request``: the payload
        whose delivery it wrote to)."""
        url = delivery_url(request)
        try:
            if url is None or not url.startswith("s3://"):
                raise _Refused("the request has no s3:// delivery")
            bucket, manifest_key, execution_key = artifact_keys(url, source_id)
            names = self._fatal_names(bucket, execution_key)
            if not names:
                raise _Refused("the execution database holds no FATAL feature")
            body, count = self._geopackage(bucket, manifest_key, names)
            folder = manifest_key.rpartition("/")[0]
            key = (folder + "/" if folder else "") + FAILED_FEATURES.format(id=source_id)
            try:
                self._files.put(bucket, key, body)
            except ValueError as exc:
                raise _Refused(f"cannot write the follow-up's input: {exc}") from None
        except _Refused as exc:
            log.warning(
                "batch request %s: no follow-up: %s",
                source_id,
                exc,
                extra={"batch_request_id": source_id},
            )
            return RetryInputFailed(
                JobError(source="worker", code=RETRY_INPUT_NOT_WRITTEN, message=str(exc))
            )
        log.info(
            "batch request %s: %d FATAL features written to s3://%s/%s",
            source_id,
            count,
            bucket,
            key,
            extra={"batch_request_id": source_id},
        )
        return RetryInputWritten(url=f"s3://{bucket}/{key}", features=count)

    def _fetch(self, bucket: str, key: str) -> File:
        try:
            return self._files.fetch(bucket, key)
        except (LookupError, ValueError) as exc:
            raise _Refused(str(exc)) from None

    def _fatal_names(self, bucket: str, key: str) -> set[str]:
        with self._fetch(bucket, key) as file:
            try:
                with closing(bounded(file.open())) as conn:
                    if not plain_tables(conn, "name = ?", "features"):
                        raise _Refused("the execution database has no features table")
                    if not {"name", "status"} <= columns(conn, "features"):
                        raise _Refused("the execution database's features have no name/status")
                    rows = conn.execute(
                        "SELECT DISTINCT name FROM features WHERE status = 'FATAL'"
                    ).fetchall()
            except sqlite3.Error as exc:
                raise _Refused(_sqlite_reason("execution database", exc)) from None
        return {str(name) for (name,) in rows if name is not None}

    def _geopackage(self, bucket: str, key: str, names: set[str]) -> tuple[bytes, int]:
        with self._fetch(bucket, key) as file:
            try:
                with closing(bounded(file.open())) as source:
                    return _copy_features(source, names)
            except sqlite3.Error as exc:
                raise _Refused(_sqlite_reason("feature manifest", exc)) from None


def _sqlite_reason(what: str, exc: sqlite3.Error) -> str:
    if interrupted(exc):
        return f"reading the {what} took longer than {SQLITE_SECONDS:g} s"
    return f"the {what} is not readable ({exc})"


def _copy_features(source: sqlite3.Connection, names: set[str]) -> tuple[bytes, int]:
    """A new GeoPackage with one row per named feature, table by table as the manifest has
    them (one per CRS); the features found."""
    tables = plain_tables(source, "name LIKE 'feature\\_%' ESCAPE '\\'")
    if not tables or not plain_tables(source, "name = 'gpkg_geometry_columns'"):
        raise _Refused("not a feature manifest")
    geometry = {
        str(t): (str(c), str(g), int(srs))
        for t, c, g, srs in source.execute(
            "SELECT table_name, column_name, geometry_type_name, srs_id FROM gpkg_geometry_columns"
        )
    }
    out = sqlite3.connect(":memory:")
    try:
        geopackage.init(out)
        found: set[str] = set()
        srs_used: set[int] = set()
        for table in tables:
            if table not in geometry:
                continue
            column, kind, srs = geometry[table]
            have = columns(source, table)
            if not {"identifier", column} <= have:
                raise _Refused(f"table {table} has no identifier or geometry column")
            sizes: list[str] = [c for c in ("width", "height") if c in have]
            rows = _rows_of(source, table, column, sizes, names - found)
            if not rows:
                continue
            found.update(str(row[0]) for row in rows)
            srs_used.add(srs)
            _feature_table(out, table, column=column, kind=kind, srs=srs, sizes=sizes, rows=rows)
        _spatial_refs(source, out, srs_used)
        out.commit()
        return out.serialize(), len(found)
    finally:
        out.close()


def _rows_of(
    source: sqlite3.Connection, table: str, column: str, sizes: list[str], wanted: set[str]
) -> list[tuple[Any, ...]]:
    """(identifier, geometry, *sizes) of the wanted features, the first row of each."""
    picked = ", ".join(quote_identifier(c) for c in ("identifier", column, *sizes))
    rows: dict[str, tuple[Any, ...]] = {}
    query = f"SELECT {picked} FROM {quote_identifier(table)} ORDER BY rowid"
    for row in source.execute(query):
        identifier = row[0]
        if identifier is not None and str(identifier) in wanted:
            rows.setdefault(str(identifier), (str(identifier), *row[1:]))
    return list(rows.values())


def _feature_table(
    out: sqlite3.Connection,
    table: str,
    *,
    column: str,
    kind: str,
    srs: int,
    sizes: list[str],
    rows: Iterable[tuple[Any, ...]],
) -> None:
    # §5.2's columns: an integer id, a unique identifier, the geometry, width and height.
    kind = kind.upper() if kind.upper() in _GEOMETRY_TYPES else "GEOMETRY"
    geometry = geopackage.Column(column, kind)
    geopackage.feature_table(
        out,
        table,
        srs_id=srs,
        geometry=geometry,
        columns=[
            geopackage.Column("identifier", "TEXT NOT NULL UNIQUE"),
            geometry,
            *(geopackage.Column(c, "INTEGER") for c in sizes),
        ],
        rows=rows,
        primary_key="id",
    )


def _spatial_refs(source: sqlite3.Connection, out: sqlite3.Connection, used: set[int]) -> None:
    """The manifest's definitions of the CRSs used (and 4326), the two undefined ones."""
    wanted = sorted(used | {4326})
    known: dict[int, tuple[Any, ...]] = {}
    if plain_tables(source, "name = 'gpkg_spatial_ref_sys'"):
        marks = ", ".join("?" for _ in wanted)
        query = (
            "SELECT srs_name, srs_id, organization, organization_coordsys_id, definition,"
            f" description FROM gpkg_spatial_ref_sys WHERE srs_id IN ({marks})"
        )
        known = {int(row[1]): tuple(row) for row in source.execute(query, wanted)}
    rows: list[tuple[Any, ...]] = [*geopackage.UNDEFINED_SRS]
    for srs in wanted:
        rows.append(known.get(srs, (f"EPSG:{srs}", srs, "EPSG", srs, "undefined", "")))
    out.executemany("INSERT OR IGNORE INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)", rows)
