"""The package carries what it needs at run time: ``pip install 'batch-worker[demo]'`` then
``batch-worker demo`` works outside a checkout, and without the extra the demo says what to
install in one line."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.cli_support import REPO, clean_env

EXAMPLE_JOBS = {
    "cost-forecast-stop.json",
    "fatal-features-retry.json",
    "geopackage-fields.json",
    "max-ndvi-geotiff.json",
    "max-ndvi-zarr.json",
    "resume-unhealthy.json",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("batch_worker-*.whl")
    return built


def test_the_wheel_carries_the_example_jobs_and_the_schemas(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"worker/examples/{name}" for name in EXAMPLE_JOBS} <= names
    assert "worker/examples/corsica-fields.gpkg" in names
    assert "worker/wire/schemas/job-request.schema.json" in names
    # The status API's document and pages, the vendored map library with its licence.
    assert {
        "worker/web/openapi.json",
        "worker/web/static/index.html",
        "worker/web/static/job.js",
        "worker/web/static/vendor/leaflet/leaflet.js",
        "worker/web/static/vendor/leaflet/LICENSE",
        "worker/web/static/vendor/leaflet/images/layers.png",
        "worker/web/static/vendor/world-atlas/countries-110m.json",
    } <= names
    assert "worker/py.typed" in names


def test_an_installed_demo_reads_its_jobs_from_the_package(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    probe = (
        "import worker; from worker.commands.demo import _example_jobs, EXAMPLES;"
        "print(worker.__file__); print(sorted(job['job_id'] for job in _example_jobs()));"
        "print((EXAMPLES / 'corsica-fields.gpkg').read_bytes()[:16])"
    )
    env = clean_env() | {"PYTHONPATH": str(site)}
    # Run from an empty folder: nothing of the checkout is in reach.
    out = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    location, job_ids, gpkg_head = out.stdout.splitlines()
    assert Path(location).is_relative_to(site)
    assert len(eval(job_ids)) == len(EXAMPLE_JOBS)
    assert "SQLite format 3" in gpkg_head


def test_the_demo_without_its_extra_names_what_to_install(tmp_path: Path) -> None:
    # A moto that cannot be imported stands where the extra would be installed.
    blocker = tmp_path / "blocker"
    (blocker / "moto").mkdir(parents=True)
    (blocker / "moto" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'moto'\", name='moto')\n"
    )
    env = clean_env() | {"PYTHONPATH": f"{blocker}:{REPO}"}
    out = subprocess.run(
        [sys.executable, "-m", "worker", "demo"],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "batch-worker: the demo needs moto: pip install 'batch-worker[demo]'"
    ]
    assert "Traceback" not in out.stderr
