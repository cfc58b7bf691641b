"""Make ``corsica-fields.gpkg``: a handful of field polygons over Corsica (GeoPackage input).

Written with the standard library's sqlite3 through ``worker.api.geopackage`` (GeoPackage
1.3: metadata tables, GP header + WKB polygons). One layer in UTM zone 32N (EPSG:32632),
the columns the service reads (batch-v2-api.md §5.2): ``id`` (primary key), ``identifier``
(unique text) and ``resolution`` (metres). Run from the repository root:

    python scripts/make_corsica_fields.py
"""

from __future__ import annotations

import math
from pathlib import Path

from worker.api import geopackage

OUT = Path(__file__).resolve().parents[1] / "worker" / "examples" / "corsica-fields.gpkg"

# WKT of EPSG:32632 (WGS 84 / UTM zone 32N).
UTM_32N = (
    'PROJCS["WGS 84 / UTM zone 32N",GEOGCS["WGS 84",DATUM["WGS_1984",'
    'SPHEROID["WGS 84",6378137,298.257223563]],PRIMEM["Greenwich",0],'
    'UNIT["degree",0.0174532925199433]],PROJECTION["Transverse_Mercator"],'
    'PARAMETER["latitude_of_origin",0],PARAMETER["central_meridian",9],'
    'PARAMETER["scale_factor",0.9996],PARAMETER["false_easting",500000],'
    'PARAMETER["false_northing",0],UNIT["metre",1],AUTHORITY["EPSG","32632"]]'
)

# (identifier, lon, lat, half-size in metres, resolution in metres)
FIELDS = [
    ("ajaccio-gravona", 8.82, 41.95, 900.0, 10.0),
    ("bastia-marana", 9.47, 42.62, 1200.0, 10.0),
    ("corte-tavignano", 9.17, 42.30, 700.0, 10.0),
    ("aleria-plain", 9.50, 42.10, 1500.0, 20.0),
    ("porto-vecchio-stabiacciu", 9.26, 41.61, 800.0, 10.0),
    ("calvi-figarella", 8.79, 42.54, 600.0, 10.0),
]


def utm32n(lon: float, lat: float) -> tuple[float, float]:
    """Transverse Mercator to first order: good to metres across Corsica for a demo file."""
    k0, a, f = 0.9996, 6_378_137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    phi, dlam = math.radians(lat), math.radians(lon - 9.0)
    n = a / math.sqrt(1 - e2 * math.sin(phi) ** 2)
    t, c = math.tan(phi) ** 2, e2 / (1 - e2) * math.cos(phi) ** 2
    big_a = dlam * math.cos(phi)
    m = a * (
        (1 - e2 / 4 - 3 * e2**2 / 64) * phi
        - (3 * e2 / 8 + 3 * e2**2 / 32) * math.sin(2 * phi)
        + (15 * e2**2 / 256) * math.sin(4 * phi)
    )
    x = k0 * n * (big_a + (1 - t + c) * big_a**3 / 6)
    y = k0 * (m + n * math.tan(phi) * (big_a**2 / 2 + (5 - t + 9 * c) * big_a**4 / 24))
    return 500_000.0 + x, y


def field_ring(lon: float, lat: float, half: float) -> list[tuple[float, float]]:
    """A slightly irregular pentagon around the point, like a real field."""
    cx, cy = utm32n(lon, lat)
    shape = [(-1.0, -0.8), (0.9, -1.0), (1.0, 0.6), (0.1, 1.0), (-0.9, 0.7)]
    ring = [(round(cx + dx * half, 2), round(cy + dy * half, 2)) for dx, dy in shape]
    return [*ring, ring[0]]


def main() -> None:
    conn = geopackage.create(OUT)
    try:
        geopackage.add_feature_table(
            conn,
            "fields",
            32632,
            [
                geopackage.Column("identifier", "TEXT NOT NULL UNIQUE"),
                geopackage.Column("resolution", "REAL"),
            ],
            [(field_ring(lon, lat, half), (name, res)) for name, lon, lat, half, res in FIELDS],
            primary_key="id",
            srs_definition=UTM_32N,
        )
        conn.commit()
    finally:
        conn.close()
    print(f"wrote {OUT} ({len(FIELDS)} fields)")


if __name__ == "__main__":
    main()
