"""The GeoPackage writer and reader (worker/api/geopackage.py) shared by the simulator and
the worker: files it writes are GeoPackages by the spec's metadata, and read back whole."""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import pytest

from worker.api import geopackage
from worker.api.geopackage import Column


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    return [(row[1], row[2]) for row in conn.execute(f"PRAGMA table_info({table})")]


def test_a_new_geopackage_has_the_identity_tables_and_required_srs(tmp_path: Path) -> None:
    path = tmp_path / "empty.gpkg"
    path.write_bytes(b"something else")  # replaced, not appended to
    conn = geopackage.create(path)
    conn.commit()
    assert conn.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 10300
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert {"gpkg_spatial_ref_sys", "gpkg_contents", "gpkg_geometry_columns"} <= tables
    srs = {
        row[0]: row[1] for row in conn.execute("SELECT srs_id, srs_name FROM gpkg_spatial_ref_sys")
    }
    assert srs == {
        4326: "WGS 84 geodetic",
        -1: "Undefined cartesian SRS",
        0: "Undefined geographic SRS",
    }
    conn.close()


def test_polygon_tables_read_back_with_their_extents_and_crs(tmp_path: Path) -> None:
    path = tmp_path / "t.gpkg"
    conn = geopackage.create(path)
    geopackage.add_feature_table(
        conn,
        "fields",
        32632,
        [Column("identifier", "TEXT"), Column("width", "INTEGER")],
        [
            (geopackage.rectangle((10.0, 20.0, 30.0, 40.0)), ("a", 64)),
            (geopackage.rectangle((0.0, 5.0, 15.0, 50.0)), ("b", 32)),
        ],
        primary_key="id",
        srs_definition='PROJCS["WGS 84 / UTM zone 32N"]',
    )
    geopackage.add_feature_table(
        conn, "wgs", 4326, [Column("identifier", "TEXT")], [([(1, 2), (3, 2), (3, 4)], ("c",))]
    )
    conn.commit()
    assert _columns(conn, "fields") == [
        ("id", "INTEGER"),
        ("geom", "POLYGON"),
        ("identifier", "TEXT"),
        ("width", "INTEGER"),
    ]
    contents = conn.execute(
        "SELECT table_name, min_x, min_y, max_x, max_y, srs_id FROM gpkg_contents ORDER BY 1"
    ).fetchall()
    assert contents == [("fields", 0.0, 5.0, 30.0, 50.0, 32632), ("wgs", 1.0, 2.0, 3.0, 4.0, 4326)]
    assert conn.execute(
        "SELECT definition FROM gpkg_spatial_ref_sys WHERE srs_id = 32632"
    ).fetchone() == ('PROJCS["WGS 84 / UTM zone 32N"]',)
    assert conn.execute("SELECT * FROM gpkg_geometry_columns ORDER BY 1").fetchall() == [
        ("fields", "geom", "POLYGON", 32632, 0, 0),
        ("wgs", "geom", "POLYGON", 4326, 0, 0),
    ]
    conn.close()
    read = geopackage.read_features(path)
    assert [(f.identifier, f.epsg, f.extent) for f in read] == [
        ("a", 32632, (10.0, 20.0, 30.0, 40.0)),
        ("b", 32632, (0.0, 5.0, 15.0, 50.0)),
        ("c", 4326, (1.0, 2.0, 3.0, 4.0)),  # the ring is closed when written
    ]


def test_an_empty_table_has_no_extent(tmp_path: Path) -> None:
    conn = geopackage.create(tmp_path / "e.gpkg")
    geopackage.add_feature_table(conn, "none", 4326, [Column("identifier", "TEXT")], [])
    row = conn.execute("SELECT min_x, min_y, max_x, max_y FROM gpkg_contents").fetchone()
    assert row == (None, None, None, None)
    conn.close()


def test_a_copied_table_keeps_its_columns_order_and_blobs() -> None:
    conn = sqlite3.connect(":memory:")
    geopackage.init(conn)
    conn.executemany(
        "INSERT INTO gpkg_spatial_ref_sys VALUES (?, ?, ?, ?, ?, ?)", geopackage.UNDEFINED_SRS
    )
    blob = geopackage.encode_polygon(geopackage.rectangle((0, 0, 1, 1)), 0)
    geom = Column('the "shape"', "MULTIPOLYGON")
    geopackage.feature_table(
        conn,
        'odd "table"',
        srs_id=0,
        geometry=geom,
        columns=[Column("identifier", "TEXT NOT NULL UNIQUE"), geom, Column("width", "INTEGER")],
        rows=[("x", blob, 7)],
        primary_key="id",
    )
    assert [name for name, _ in _columns(conn, '"odd ""table"""')] == [
        "id",
        "identifier",
        'the "shape"',
        "width",
    ]
    assert conn.execute('SELECT * FROM "odd ""table"""').fetchall() == [(1, "x", blob, 7)]
    assert conn.execute("SELECT * FROM gpkg_geometry_columns").fetchone() == (
        'odd "table"',
        'the "shape"',
        "MULTIPOLYGON",
        0,
        0,
        0,
    )
    assert conn.execute("SELECT min_x, srs_id FROM gpkg_contents").fetchone() == (None, 0)
    with pytest.raises(ValueError, match="not among the columns"):
        geopackage.feature_table(
            conn, "t", srs_id=0, geometry=geom, columns=[Column("identifier", "TEXT")], rows=[]
        )


def test_geometry_blobs_are_taken_apart() -> None:
    blob = geopackage.encode_polygon([(1.0, 2.0), (5.0, 2.0), (5.0, 9.0)], 32633)
    parts = geopackage.decode(blob)
    assert (parts.srs_id, parts.envelope) == (32633, (1.0, 2.0, 5.0, 9.0))
    assert parts.wkb[:9] == struct.pack("<BII", 1, 3, 1)
    # Big endian, no envelope: the WKB follows the eight bytes of the header.
    bare = b"GP\x00\x00" + struct.pack(">i", 4326) + b"WKB"
    assert geopackage.decode(bare) == geopackage.Geometry(4326, None, b"WKB")
    for bad, reason in [
        (b"XX\x00\x01\x00\x00\x00\x00", "not a GeoPackage geometry blob"),
        (b"GP", "not a GeoPackage geometry blob"),
        ("GP\x00\x01\x00\x00\x00\x00", "not a GeoPackage geometry blob"),
        (b"GP\x00\x0b\x00\x00\x00\x00", "unknown envelope type"),
    ]:
        with pytest.raises(ValueError, match=reason):
            geopackage.decode(bad)


def _one_table(path: Path, rows: list[tuple[str | None]]) -> None:
    conn = geopackage.create(path)
    ring = geopackage.rectangle((0.0, 0.0, 1.0, 2.0))
    geopackage.add_feature_table(
        conn, "a", 4326, [Column("identifier", "TEXT")], [(ring, row) for row in rows]
    )
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("rows", "reason"),
    [
        ([("x",), ("x",)], "not unique"),
        ([], "holds no features"),
        ([(None,)], "Table a has a feature without an identifier"),
    ],
)
def test_inputs_that_break_the_rules_are_refused_with_a_reason(
    tmp_path: Path, rows: list[tuple[str | None]], reason: str
) -> None:
    path = tmp_path / "t.gpkg"
    _one_table(path, rows)
    with pytest.raises(ValueError, match=reason):
        geopackage.read_features(path)


def test_files_that_are_no_geopackage_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "plain.sqlite"
    sqlite3.connect(path).close()
    with pytest.raises(ValueError, match="The GeoPackage is not valid"):
        geopackage.read_features(path)
    path = tmp_path / "blob.gpkg"
    _one_table(path, [("x",)])
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE a SET geom = X'00'")
    conn.close()
    with pytest.raises(ValueError, match="not a GeoPackage geometry blob"):
        geopackage.read_features(path)
