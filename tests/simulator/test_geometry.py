"""Feature counts from grids (batch-v2-api.md §7) and GeoPackage files (§5.2, §8.2)."""

from __future__ import annotations

import sqlite3

import pytest

from tests.simulator.conftest import EXAMPLES, example_request
from worker.api import geopackage
from worker.simulator.grids import GRIDS, bbox_of_bounds, grid_features
from worker.simulator.validation import PayloadError, validate_create

CORSICA = (8.44, 41.31, 9.66, 43.1)


def test_feature_counts_grow_as_cells_shrink() -> None:
    counts = {grid: len(grid_features(GRIDS[grid], CORSICA)) for grid in GRIDS}
    assert counts[2] < counts[0] < counts[1]  # 100 km < 20 km < 10 km cells
    assert counts[6] < counts[7]
    assert counts[3] == 6  # 1-degree cells: 2 x 3
    names = [f.name for f in grid_features(GRIDS[0], CORSICA)]
    assert len(set(names)) == len(names)


def test_bbox_spanning_two_utm_zones_gets_cells_in_both() -> None:
    features = grid_features(GRIDS[2], (11.0, 45.0, 13.0, 46.0))
    assert {f.epsg for f in features} == {32632, 32633}


def test_bounds_from_geometry() -> None:
    polygon = {"type": "Polygon", "coordinates": [[[1, 2], [3, 2], [3, 5], [1, 2]]]}
    assert bbox_of_bounds({"geometry": polygon}) == (1.0, 2.0, 3.0, 5.0)


def test_example_geopackage_is_a_valid_geopackage() -> None:
    path = EXAMPLES / "corsica-fields.gpkg"
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA application_id").fetchone()[0] == 0x47504B47
    assert db.execute(
        "SELECT table_name, geometry_type_name, srs_id FROM gpkg_geometry_columns"
    ).fetchall() == [("fields", "POLYGON", 32632)]
    columns = {r[1] for r in db.execute("PRAGMA table_info(fields)")}
    assert {"id", "identifier", "resolution", "geom"} <= columns
    features = geopackage.read_features(path)
    assert len(features) == 6
    assert all(400_000 < f.extent[0] < 600_000 for f in features)  # UTM 32N over Corsica


@pytest.mark.parametrize(
    "name", ["max-ndvi-geotiff.json", "max-ndvi-zarr.json", "geopackage-fields.json"]
)
def test_examples_validate(name: str) -> None:
    validate_create(example_request(name))


def test_zarr_needs_a_laea_or_wgs84_grid() -> None:
    request = example_request("max-ndvi-zarr.json")
    request["input"].update(id=0, resolution=60.0)
    with pytest.raises(PayloadError, match="grids 3, 6 and 7"):
        validate_create(request)
