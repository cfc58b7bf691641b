"""Files from a producer's bucket, read as hostile input: bounded in size, memory, disk and time.

``BucketReader`` downloads an object of at most ``max_bytes`` (the tile counts' reader and
the status API's features reader share it); only the S3 error code is ever told, never a
message that may quote the request.

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
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from botocore.exceptions import BotoCoreError, ClientError

from worker.api.geopackage import quote_identifier

# Files up to this size are read in memory (most execution databases: ~100 bytes a feature);
# larger ones go through a temporary file, so memory stays bounded whatever the job.
IN_MEMORY_BYTES = 8 * 2**20
# One file's queries; the bound holds whatever the file's tables make SQLite do.
SQLITE_SECONDS = 10.0
# This process's folder for the larger files: <tmp>/batch-worker-tiles-<pid>-<random>.
TEMP_PREFIX = "batch-worker-tiles-"
# The S3 client's timeouts and tries (worker/daemon/liveness.py derives a step's bound from
# them). Retries are few and short: the next poll is the real retry.
S3_CONNECT_TIMEOUT = 5.0
S3_READ_TIMEOUT = 30.0
S3_MAX_ATTEMPTS = 3
# Codes S3 (and S3-compatible stores) answer for a key that is not there (yet).
_ABSENT_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_CHUNK = 1 << 20


class Unreadable(Exception):
    """An object cannot be read: access, network, size, format. The message says which."""


class Absent(Unreadable):
    """The object does not exist (yet)."""

    def __init__(self) -> None:
        super().__init__("not written yet")


class NotModified(Exception):
    """The object still has the ETag read last time."""


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


class BucketReader:
    """Bounded downloads from S3 (and plain writes) with one client; safe to share between
    threads. ``on_progress`` is called on the reading thread as a download moves on (the
    object's answer, then every MiB)."""

    def __init__(
        self,
        *,
        s3_client: Any | None = None,
        max_bytes: int,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        self._client = s3_client
        self._client_lock = threading.Lock()
        self.max_bytes = max_bytes
        self._progress = on_progress or (lambda: None)
        # Files past IN_MEMORY_BYTES go here: <tmp>/batch-worker-tiles-<pid>-<random>.
        root = Path(tempfile.gettempdir())
        self.temp_dir = root / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def download(
        self, bucket: str, key: str, *, etag: str | None = None
    ) -> tuple[str | None, File]:
        """The object and its ETag (close the file). Raises Absent, NotModified (when
        ``etag`` is still the object's), Unreadable."""
        params: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if etag:
            params["IfNoneMatch"] = etag
        file = File(self.temp_dir)
        try:
            response = self._s3().get_object(**params)
            self._progress()
            body = response["Body"]
            try:
                length = response.get("ContentLength")
                if isinstance(length, int) and length > self.max_bytes:
                    raise Unreadable(f"{length} bytes, more than the {self.max_bytes} allowed")
                for chunk in body.iter_chunks(_CHUNK):
                    if file.size + len(chunk) > self.max_bytes:
                        raise Unreadable(f"more than the {self.max_bytes} bytes allowed")
                    file.write(chunk)
                    self._progress()
            finally:
                body.close()
        except ClientError as exc:
            file.close()
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 304 or code == "304":
                raise NotModified from None
            if code in _ABSENT_CODES:
                raise Absent from None
            # The code only (AccessDenied, NoSuchBucket, ...): messages may quote the request.
            raise Unreadable(code or f"HTTP {status}") from None
        except (BotoCoreError, OSError) as exc:
            file.close()
            raise Unreadable(type(exc).__name__) from None
        except BaseException:
            file.close()
            raise
        tag = response.get("ETag")
        return (tag if isinstance(tag, str) else None), file

    def put(self, bucket: str, key: str, body: bytes, *, content_type: str) -> None:
        """Write an object with the worker's own identity; ``ValueError`` names the code."""
        try:
            self._s3().put_object(Bucket=bucket, Key=key, Body=body, ContentType=content_type)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", "")) or "refused"
            raise ValueError(f"s3://{bucket}/{key}: {code}") from None
        except (BotoCoreError, OSError) as exc:
            raise ValueError(f"s3://{bucket}/{key}: {type(exc).__name__}") from None

    def _s3(self) -> Any:
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                # The standard chain: AWS_ENDPOINT_URL, keys, profile, or the pod's IAM role.
                self._client = boto3.client(
                    "s3",
                    config=Config(
                        connect_timeout=S3_CONNECT_TIMEOUT,
                        read_timeout=S3_READ_TIMEOUT,
                        retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
                    ),
                )
            return self._client


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
