"""worker.daemon.bucket_files: the bounds on reading a producer's files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from worker.daemon.bucket_files import TEMP_PREFIX, File, bounded, sweep_stale_temp_dirs

ENDLESS = (
    "WITH RECURSIVE r(status) AS (SELECT 'DONE' UNION ALL SELECT status FROM r) SELECT * FROM r"
)


def test_a_query_past_its_time_is_interrupted(tmp_path: Path) -> None:
    # The bound itself, on whatever a file makes SQLite do.
    conn = bounded(sqlite3.connect(":memory:"), seconds=0.2)
    with pytest.raises(sqlite3.OperationalError, match="interrupted"):
        conn.execute(f"SELECT COUNT(*) FROM ({ENDLESS})").fetchone()


def test_a_file_past_the_memory_bound_goes_to_disk_and_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.daemon.bucket_files as files

    monkeypatch.setattr(files, "IN_MEMORY_BYTES", 1024)
    source = tmp_path / "source.db"
    conn = sqlite3.connect(source)
    conn.execute("CREATE TABLE t (data BLOB)")
    conn.execute("INSERT INTO t VALUES (zeroblob(4096))")
    conn.commit()
    conn.close()
    folder = tmp_path / "process"
    with File(folder) as file:
        data = source.read_bytes()
        file.write(data[:512])
        assert file.path is None  # still in memory
        file.write(data[512:])
        assert file.path is not None and file.path.parent == folder
        with file.open() as read:
            assert read.execute("SELECT length(data) FROM t").fetchone() == (4096,)
    assert list(folder.iterdir()) == []


def test_what_a_killed_reader_left_is_swept_at_start(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    stale = tmp_path / f"{TEMP_PREFIX}{dead.pid}-0a1b2c3d"
    stale.mkdir()
    (stale / "left-behind").write_bytes(b"x" * 1024)
    live = tmp_path / f"{TEMP_PREFIX}{os.getpid()}-9f8e7d6c"
    live.mkdir()
    assert sweep_stale_temp_dirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists()
