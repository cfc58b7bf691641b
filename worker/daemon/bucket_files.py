"""Files from a producer's bucket, read as hostile input: bounded in size, memory, disk and time.

A downloaded object is held in memory up to ``IN_MEMORY_BYTES``, past that in a temporary file
of this process's folder (``TEMP_PREFIX``), which the next start sweeps if the process was
killed. SQLite opens it read-only; ``bounded`` interrupts any query past ``SQLITE_SECONDS``,
and ``plain_tables``/``columns`` let a reader check the schema before it queries (a view or
a virtual table is not read: an endlessly recursive view would otherwise run forever).
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from worker.api.geopackage import quote_identifier

# Files up to this size are read in memory (most execution databases: ~100 bytes a feature);
# larger ones go through a temporary file, so memory stays bounded whatever the job.
IN_MEMORY_BYTES = 8 * 2**20
# One file's queries; the bound holds whatever the file's tables make SQLite do.
SQLITE_SECONDS = 10.0
# This process's folder for the larger files: <tmp>/batch-worker-tiles-<pid>-<random>.
TEMP_PREFIX = "batch-worker-tiles-"


class File:
    """A downloaded object: bytes in memory, or past ``IN_MEMORY_BYTES`` a temporary file in
    this process's folder, deleted when closed."""

    def __init__(self, temp_dir: Path) -> None:
        self._temp_dir = temp_dir
        self._buffer: io.BytesIO | None = io.BytesIO()
        self.path: Path | None = None
        self._out: io.BufferedWriter | None = None
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._buffer is not None and self.size > IN_MEMORY_BYTES:
            self._temp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.path = self._temp_dir / uuid.uuid4().hex
            self._out = self.path.open("wb")
            self._out.write(self._buffer.getbuffer())
            self._buffer = None
        if self._out is not None:
            self._out.write(chunk)
        elif self._buffer is not None:
            self._buffer.write(chunk)

    def open(self) -> sqlite3.Connection:
        """A read-only connection on the file's database."""
        if self._out is not None:
            self._out.close()
            self._out = None
        if self.path is not None:
            # immutable=1: a private snapshot; SQLite neither locks it nor looks for a
            # journal, and nothing is ever written next to it.
            uri = f"file:{quote(str(self.path))}?mode=ro&immutable=1"
            return sqlite3.connect(uri, uri=True)
        conn = sqlite3.connect(":memory:")
        assert self._buffer is not None
        conn.deserialize(self._buffer.getvalue())
        conn.execute("PRAGMA query_only = ON")
        return conn

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self._buffer = None

    def __enter__(self) -> File:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def sweep_stale_temp_dirs(root: Path) -> list[Path]:
    """Remove the temporary folders of tile readers whose process is gone (a SIGKILL or an
    OOM kill skips every cleanup); those of live processes are left alone."""
    removed = []
    for folder in root.glob(f"{TEMP_PREFIX}*"):
        pid_text = folder.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: not ours to judge
    return True


def bounded(conn: sqlite3.Connection, seconds: float = SQLITE_SECONDS) -> sqlite3.Connection:
    """Queries on ``conn`` that run past ``seconds`` are interrupted (sqlite3.OperationalError)."""
    deadline = time.monotonic() + seconds
    # Called every 10,000 virtual-machine steps; a non-zero answer interrupts the query.
    conn.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
    # Views and triggers of a producer's file may not call functions with side effects.
    conn.execute("PRAGMA trusted_schema = OFF")
    return conn


def plain_tables(conn: sqlite3.Connection, where: str, *args: str) -> list[str]:
    """Names of real tables (not views, not virtual tables) matching ``where``."""
    return [
        str(name)
        for name, sql in conn.execute(
            f"SELECT name, sql FROM sqlite_master WHERE type = 'table' AND {where}", args
        )
        if not str(sql or "").lstrip().upper().startswith("CREATE VIRTUAL")
    ]


def columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(row[1]) for row in conn.execute(f"PRAGMA table_info({quote_identifier(table)})")}


def interrupted(exc: sqlite3.Error) -> bool:
    return "interrupted" in str(exc)
