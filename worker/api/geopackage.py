"""GeoPackage files with the standard library's sqlite3 (OGC 12-128r18).

Enough of the spec for the service's artifacts and inputs: the required metadata tables
(``gpkg_spatial_ref_sys``, ``gpkg_contents``, ``gpkg_geometry_columns``), feature tables,
and geometries as a GeoPackage binary header followed by little-endian WKB polygons. The
one writer and reader of both the simulator (its manifests, the service's input rules) and
the worker (a follow-up's input, copied from a manifest's rows).
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

APPLICATION_ID = 0x47504B47  # "GPKG"
USER_VERSION = 10300  # GeoPackage 1.3
_WKB_POLYGON = 3
# Bytes of the header's envelope by its type, flags bits 1-3 (§2.1.3): none, xy, xyz, xym, xyzm.
_ENVELOPE_BYTES = {0: 0, 1: 32, 2: 48, 3: 48, 4: 64}

SrsRow = tuple[str, int, str, int, str, str]
WGS84_SRS: SrsRow = (
    "WGS 84 geodetic",
    4326,
    "EPSG",
    4326,
    'GEOGCS["WGS 84",DATUM["WGS_1984",SPHEROID["WGS 84",6378137,298.257223563]],'
    'PRIMEM["Greenwich",0],UNIT["degree",0.0174532925199433]]',
    "longitude/latitude coordinates in decimal degrees on the WGS 84 spheroid",
)
# The two undefined systems every GeoPackage holds (§1.1.2.1.2), whatever else it defines.
UNDEFINED_SRS: list[SrsRow] = [
    ("Undefined cartesian SRS", -1, "NONE", -1, "undefined", "undefined cartesian coordinate"),
    ("Undefined geographic SRS", 0, "NONE", 0, "undefined", "undefined geographic coordinate"),
]
# Spatial reference systems the spec requires in every GeoPackage.
REQUIRED_SRS: list[SrsRow] = [WGS84_SRS, *UNDEFINED_SRS]

Ring = Sequence[tuple[float, float]]
Extent = tuple[float, float, float, float]  # min_x, min_y, max_x, max_y


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str  # INTEGER | TEXT | REAL | BOOLEAN, or a geometry type name


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def create(path: Path) -> sqlite3.Connection:
    """A new, empty GeoPackage at ``path`` (replacing any file there)."""
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    init(conn)
    conn.executemany("INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)", REQUIRED_SRS)
    return conn


def init(conn: sqlite3.Connection) -> None:
    """The GeoPackage's identity and metadata tables on an empty database; the spatial
    reference systems are the caller's to insert (``REQUIRED_SRS`` at the least)."""
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {USER_VERSION}")
    conn.executescript(
        """
        CREATE TABLE gpkg_spatial_ref_sys (
            srs_name TEXT NOT NULL, srs_id INTEGER PRIMARY KEY, organization TEXT NOT NULL,
            organization_coordsys_id INTEGER NOT NULL, definition TEXT NOT NULL,
            description TEXT);
        CREATE TABLE gpkg_contents (
            table_name TEXT NOT NULL PRIMARY KEY, data_type TEXT NOT NULL,
            identifier TEXT UNIQUE, description TEXT DEFAULT '',
            last_change DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ','now')),
            min_x DOUBLE, min_y DOUBLE, max_x DOUBLE, max_y DOUBLE,
            srs_id INTEGER REFERENCES gpkg_spatial_ref_sys(srs_id));
        CREATE TABLE gpkg_geometry_columns (
            table_name TEXT NOT NULL, column_name TEXT NOT NULL,
            geometry_type_name TEXT NOT NULL, srs_id INTEGER NOT NULL, z TINYINT NOT NULL,
            m TINYINT NOT NULL, PRIMARY KEY (table_name, column_name));
        """
    )


def feature_table(
    conn: sqlite3.Connection,
    table: str,
    *,
    srs_id: int,
    geometry: Column,
    columns: Sequence[Column],
    rows: Iterable[Sequence[Any]],
    primary_key: str = "fid",
    extent: Extent | None = None,
) -> None:
    """A feature table registered in the metadata tables: an autoincrement ``primary_key``,
    then ``columns`` in their order (``geometry`` one of them, its values geometry blobs);
    each row has a value for each column."""
    if geometry not in columns:
        raise ValueError(f"the geometry column {geometry.name} is not among the columns")
    name = quote_identifier(table)
    defined = "".join(f", {quote_identifier(c.name)} {c.sql_type}" for c in columns)
    conn.execute(
        f"CREATE TABLE {name} ({quote_identifier(primary_key)} INTEGER PRIMARY KEY AUTOINCREMENT"
        f"{defined})"
    )
    names = ", ".join(quote_identifier(c.name) for c in columns)
    marks = ", ".join("?" for _ in columns)
    conn.executemany(f"INSERT INTO {name} ({names}) VALUES ({marks})", rows)
    conn.execute(
        "INSERT INTO gpkg_contents (table_name, data_type, identifier, min_x, min_y, max_x,"
        " max_y, srs_id) VALUES (?, 'features', ?, ?, ?, ?, ?, ?)",
        (table, table, *(extent or (None,) * 4), srs_id),
    )
    conn.execute(
        "INSERT INTO gpkg_geometry_columns VALUES (?, ?, ?, ?, 0, 0)",
        (table, geometry.name, geometry.sql_type, srs_id),
    )


def add_feature_table(
    conn: sqlite3.Connection,
    table: str,
    epsg: int,
    columns: Sequence[Column],
    rows: Iterable[tuple[Ring, Sequence[Any]]],
    *,
    primary_key: str = "fid",
    srs_definition: str = "undefined",
) -> None:
    """A polygon feature table ``table`` in EPSG:``epsg``; each row is (ring, values).

    ``srs_definition`` is the CRS's WKT, when known (the spec asks for it; readers that
    only need the EPSG code, like the service's, do without).
    """
    if epsg not in {-1, 0, 4326}:
        conn.execute(
            "INSERT OR IGNORE INTO gpkg_spatial_ref_sys VALUES (?, ?, 'EPSG', ?, ?, '')",
            (f"EPSG:{epsg}", epsg, epsg, srs_definition),
        )
    geom = Column("geom", "POLYGON")
    extent = [float("inf"), float("inf"), float("-inf"), float("-inf")]
    values: list[tuple[Any, ...]] = []
    for ring, row in rows:
        xs = [x for x, _ in ring]
        ys = [y for _, y in ring]
        extent = [
            min(extent[0], *xs),
            min(extent[1], *ys),
            max(extent[2], *xs),
            max(extent[3], *ys),
        ]
        values.append((encode_polygon(ring, epsg), *row))
    feature_table(
        conn,
        table,
        srs_id=epsg,
        geometry=geom,
        columns=[geom, *columns],
        rows=values,
        primary_key=primary_key,
        extent=(extent[0], extent[1], extent[2], extent[3]) if values else None,
    )


def encode_polygon(ring: Ring, srs_id: int) -> bytes:
    """GeoPackage geometry blob: header with an xy envelope, then WKB (little endian)."""
    closed = list(ring) if ring[0] == ring[-1] else [*ring, ring[0]]
    xs = [x for x, _ in closed]
    ys = [y for _, y in closed]
    # Flags: bit 0 = little endian, bits 1-3 = envelope type 1 (minx, maxx, miny, maxy).
    header = b"GP" + struct.pack(
        "<BBi4d", 0, 0b0000_0011, srs_id, min(xs), max(xs), min(ys), max(ys)
    )
    wkb = struct.pack("<BII", 1, _WKB_POLYGON, 1) + struct.pack("<I", len(closed))
    wkb += b"".join(struct.pack("<2d", x, y) for x, y in closed)
    return header + wkb


def rectangle(extent: Extent) -> Ring:
    min_x, min_y, max_x, max_y = extent
    return [(min_x, min_y), (max_x, min_y), (max_x, max_y), (min_x, max_y), (min_x, min_y)]


@dataclass(frozen=True)
class Geometry:
    """A geometry blob taken apart: the header's srs id and xy envelope (None when the
    header has none), and the WKB after the header."""

    srs_id: int
    envelope: Extent | None
    wkb: bytes


def decode(blob: object) -> Geometry:
    """The parts of a GeoPackage geometry blob (§2.1.3); ``ValueError`` when it is none."""
    if not isinstance(blob, bytes) or len(blob) < 8 or blob[:2] != b"GP":
        raise ValueError("a geometry is not a GeoPackage geometry blob")
    flags = blob[3]
    size = _ENVELOPE_BYTES.get((flags >> 1) & 0b111)
    if size is None:
        raise ValueError("a geometry has an unknown envelope type")
    endian = "<" if flags & 1 else ">"
    (srs_id,) = struct.unpack_from(f"{endian}i", blob, 4)
    envelope: Extent | None = None
    if size:
        min_x, max_x, min_y, max_y = struct.unpack_from(f"{endian}4d", blob, 8)
        envelope = (min_x, min_y, max_x, max_y)
    return Geometry(srs_id, envelope, blob[8 + size :])


@dataclass(frozen=True)
class InputFeature:
    identifier: str
    epsg: int
    extent: Extent


def read_features(path: Path) -> list[InputFeature]:
    """The features of every table registered in ``gpkg_geometry_columns`` (§5.2 rules).

    Raises ``ValueError`` with a user-facing message when the file breaks the rules.
    """
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ValueError(f"The GeoPackage cannot be opened: {exc}") from exc
    try:
        tables = conn.execute(
            "SELECT table_name, column_name, srs_id FROM gpkg_geometry_columns ORDER BY table_name"
        ).fetchall()
        features: list[InputFeature] = []
        for table, column, srs_id in tables:
            rows = conn.execute(f'SELECT identifier, "{column}" FROM "{table}" ORDER BY rowid')
            for identifier, blob in rows:
                if identifier is None:
                    raise ValueError(f"Table {table} has a feature without an identifier.")
                features.append(InputFeature(str(identifier), int(srs_id), _envelope(blob)))
    except sqlite3.Error as exc:
        raise ValueError(f"The GeoPackage is not valid: {exc}") from exc
    finally:
        conn.close()
    if not features:
        raise ValueError("The GeoPackage holds no features.")
    if len({f.identifier for f in features}) != len(features):
        raise ValueError("Feature identifiers in the GeoPackage are not unique.")
    return features


def _envelope(blob: object) -> Extent:
    try:
        envelope = decode(blob).envelope
    except ValueError:
        raise ValueError("A geometry is not a GeoPackage geometry blob.") from None
    return envelope or (0.0, 0.0, 0.0, 0.0)
