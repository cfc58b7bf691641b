"""Tiling grids (batch-v2-api.md §7) and the features a bbox covers on them.

The real grids are derived from MGRS (UTM grids) or are projected in EPSG:3035 (LAEA
grids). The simulator does not ship those geometries; it lays square cells of the
documented size over the area, which gives feature counts of the right order and stable,
readable feature names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Metres per degree of latitude (mean), and of longitude at the equator.
_M_PER_DEG_LAT = 110_574.0
_M_PER_DEG_LON = 111_320.0


@dataclass(frozen=True)
class Grid:
    id: int
    name: str
    tile_size: float
    resolutions: tuple[float, ...]
    unit: str  # METRE | DEGREE
    single_crs: bool
    chunk: int
    kind: str  # utm | wgs84 | laea

    def descriptor(self) -> dict[str, Any]:
        """The grid as ``GET /tilinggrids`` shows it (§7.2, recorded live response)."""
        return {
            "id": self.id,
            "name": self.name,
            "properties": {
                "tileWidth": self.tile_size,
                "tileHeight": self.tile_size,
                "chunkWidth": self.chunk,
                "chunkHeight": self.chunk,
                "resolutions": list(self.resolutions),
                "singleCrs": self.single_crs,
                "unit": self.unit,
            },
        }

    def tile_pixels(self, resolution: float) -> int:
        """Width (= height) of one feature in pixels."""
        return max(1, round(self.tile_size / resolution))


# §7.1 (documented sizes) and §7.2 (the resolutions the live API lists).
GRIDS: dict[int, Grid] = {
    grid.id: grid
    for grid in (
        Grid(0, "20km grid", 20040.0, (10.0, 20.0, 60.0), "METRE", False, 334, "utm"),
        Grid(1, "10km grid", 10000.0, (1.0, 10.0, 20.0, 1.4999), "METRE", False, 500, "utm"),
        Grid(2, "100km grid", 100080.0, (360.0, 60.0, 120.0, 240.0), "METRE", False, 278, "utm"),
        Grid(
            3,
            "WGS84 1 degree grid",
            1.0,
            (0.0005, 0.001, 0.002, 0.005, 0.008, 0.0001, 0.0002, 0.0008),
            "DEGREE",
            True,
            500,
            "wgs84",
        ),
        Grid(6, "LAEA 100km grid", 100000.0, (40.0, 50.0, 100.0), "METRE", True, 0, "laea"),
        Grid(7, "LAEA 20km grid", 20000.0, (10.0, 20.0), "METRE", True, 0, "laea"),
    )
}

BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class Feature:
    """One feature (a grid cell or a GeoPackage row): its name, CRS and extent there."""

    name: str
    epsg: int
    extent: BBox


def grid_features(grid: Grid, bbox: BBox) -> list[Feature]:
    """The grid cells a WGS84 bbox (lon/lat) touches, in a stable order."""
    min_lon, min_lat, max_lon, max_lat = bbox
    if grid.kind == "wgs84":
        return [
            Feature(
                f"{_hemi(lat, 'N', 'S')}{abs(lat):02d}{_hemi(lon, 'E', 'W')}{abs(lon):03d}",
                4326,
                (float(lon), float(lat), lon + 1.0, lat + 1.0),
            )
            for lat in range(math.floor(min_lat), _ceil_exclusive(max_lat))
            for lon in range(math.floor(min_lon), _ceil_exclusive(max_lon))
        ]
    if grid.kind == "laea":
        xs, ys = zip(
            *(_laea(lon, lat) for lon in (min_lon, max_lon) for lat in (min_lat, max_lat)),
            strict=True,
        )
        return _cells("E", 3035, grid.tile_size, (min(xs), min(ys), max(xs), max(ys)))
    names: list[Feature] = []
    for zone in range(_utm_zone(min_lon), _utm_zone(max_lon) + 1):
        west = max(min_lon, -180.0 + (zone - 1) * 6.0)
        east = min(max_lon, -180.0 + zone * 6.0)
        central = -183.0 + zone * 6.0
        corners = [_utm(lon, lat, central) for lon in (west, east) for lat in (min_lat, max_lat)]
        xs, ys = zip(*corners, strict=True)
        hemisphere = "N" if max_lat >= 0 else "S"
        epsg = (32600 if hemisphere == "N" else 32700) + zone
        names += _cells(
            f"{zone:02d}{hemisphere}", epsg, grid.tile_size, (min(xs), min(ys), max(xs), max(ys))
        )
    return names


def _cells(prefix: str, epsg: int, size: float, extent: BBox) -> list[Feature]:
    min_x, min_y, max_x, max_y = extent
    return [
        Feature(
            f"{prefix}_{col}_{row}",
            epsg,
            (col * size, row * size, (col + 1) * size, (row + 1) * size),
        )
        for row in range(math.floor(min_y / size), _ceil_exclusive(max_y / size))
        for col in range(math.floor(min_x / size), _ceil_exclusive(max_x / size))
    ]


def _ceil_exclusive(value: float) -> int:
    """The stop of a range over the cells touching ``value`` (a cell edge counts once)."""
    return max(math.floor(value) + 1, math.ceil(value))


def _hemi(value: int, positive: str, negative: str) -> str:
    return positive if value >= 0 else negative


def _utm_zone(lon: float) -> int:
    return min(60, max(1, math.floor((lon + 180.0) / 6.0) + 1))


def _utm(lon: float, lat: float, central: float) -> tuple[float, float]:
    """Approximate UTM easting/northing (good to a few hundred metres near the centre)."""
    x = 500_000.0 + (lon - central) * _M_PER_DEG_LON * math.cos(math.radians(lat))
    y = lat * _M_PER_DEG_LAT + (10_000_000.0 if lat < 0 else 0.0)
    return x, y


def _laea(lon: float, lat: float) -> tuple[float, float]:
    """EPSG:3035 on a sphere (centre 52N 10E, false origin 4321000/3210000)."""
    radius = 6_371_007.0
    lam, phi = math.radians(lon - 10.0), math.radians(lat)
    phi0 = math.radians(52.0)
    k = math.sqrt(
        2.0
        / (1.0 + math.sin(phi0) * math.sin(phi) + math.cos(phi0) * math.cos(phi) * math.cos(lam))
    )
    x = radius * k * math.cos(phi) * math.sin(lam)
    y = (
        radius
        * k
        * (math.cos(phi0) * math.sin(phi) - math.sin(phi0) * math.cos(phi) * math.cos(lam))
    )
    return 4_321_000.0 + x, 3_210_000.0 + y


def bbox_of_bounds(bounds: dict[str, Any]) -> BBox | None:
    """The lon/lat bbox of ``processRequest.input.bounds`` (bbox, else the geometry's)."""
    bbox = bounds.get("bbox")
    if isinstance(bbox, list) and len(bbox) == 4:
        return (float(bbox[0]), float(bbox[1]), float(bbox[2]), float(bbox[3]))
    geometry = bounds.get("geometry")
    if not isinstance(geometry, dict):
        return None
    points = list(_points(geometry.get("coordinates")))
    if not points:
        return None
    lons, lats = zip(*points, strict=True)
    return (min(lons), min(lats), max(lons), max(lats))


def _points(coordinates: Any) -> Any:
    if (
        isinstance(coordinates, list)
        and len(coordinates) >= 2
        and all(isinstance(c, int | float) for c in coordinates[:2])
    ):
        yield float(coordinates[0]), float(coordinates[1])
    elif isinstance(coordinates, list):
        for item in coordinates:
            yield from _points(item)
