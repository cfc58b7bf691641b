"""worker.daemon.bucket_files: the bounds on reading a producer's files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from worker.daemon.bucket_files import (
    TEMP_PREFIX,
    Absent,
    BucketReader,
    File,
    NotModified,
    Unreadable,
    bounded,
    sweep_stale_temp_dirs,
)

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


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    def iter_chunks(self, size: int) -> Iterator[bytes]:
        for start in range(0, len(self.data), size):
            yield self.data[start : start + size]

    def close(self) -> None:
        self.closed = True


class _Client:
    """S3 as the reader sees it: one object, or one error answered to every call."""

    def __init__(
        self, data: bytes = b"", *, error: tuple[str, int] | None = None, length: bool = True
    ) -> None:
        self.data, self.error, self.length = data, error, length
        self.bodies: list[_Body] = []
        self.calls: list[dict[str, Any]] = []

    def _fail(self, operation: str) -> None:
        if self.error is not None:
            code, status = self.error
            raise ClientError(
                {
                    "Error": {"Code": code, "Message": "quotes the request: secret"},
                    "ResponseMetadata": {"HTTPStatusCode": status},
                },
                operation,
            )

    def get_object(self, **params: Any) -> dict[str, Any]:
        self.calls.append(params)
        self._fail("GetObject")
        self.bodies.append(_Body(self.data))
        answer: dict[str, Any] = {"Body": self.bodies[-1], "ETag": '"e1"'}
        if self.length:
            answer["ContentLength"] = len(self.data)
        return answer

    def put_object(self, **params: Any) -> None:
        self.calls.append(params)
        self._fail("PutObject")


def test_a_download_is_the_object_its_etag_and_progress_each_mib() -> None:
    data = b"x" * (2 * 2**20 + 5)
    client = _Client(data)
    marks: list[None] = []
    reader = BucketReader(
        s3_client=client, max_bytes=len(data), on_progress=lambda: marks.append(None)
    )
    etag, file = reader.download("b", "k", etag='"e0"')
    with file:
        assert (etag, file.size) == ('"e1"', len(data))
    assert client.calls == [{"Bucket": "b", "Key": "k", "IfNoneMatch": '"e0"'}]
    assert len(marks) == 1 + 3  # the answer, then each of its three chunks
    assert client.bodies[0].closed


@pytest.mark.parametrize("length", [True, False])
def test_an_object_past_the_bound_is_refused(length: bool) -> None:
    client = _Client(b"x" * 100, length=length)
    with pytest.raises(Unreadable, match="more than the 99"):
        BucketReader(s3_client=client, max_bytes=99).download("b", "k")
    assert client.bodies[0].closed


@pytest.mark.parametrize(
    ("error", "raised", "text"),
    [
        (("NoSuchKey", 404), Absent, "not written yet"),
        (("NotFound", 404), Absent, "not written yet"),
        (("304", 304), NotModified, ""),
        (("", 304), NotModified, ""),
        # A missing bucket is not a file not written yet: the code is told.
        (("NoSuchBucket", 404), Unreadable, "NoSuchBucket"),
        (("AccessDenied", 403), Unreadable, "AccessDenied"),
        (("", 500), Unreadable, "HTTP 500"),
    ],
)
def test_errors_tell_the_code_and_never_the_message(
    error: tuple[str, int], raised: type[Exception], text: str
) -> None:
    reader = BucketReader(s3_client=_Client(error=error), max_bytes=10)
    with pytest.raises(raised) as caught:
        reader.download("b", "k")
    assert str(caught.value) == text and type(caught.value) is raised


def test_a_write_names_the_code_only() -> None:
    client = _Client()
    reader = BucketReader(s3_client=client, max_bytes=10)
    reader.put("b", "k", b"body", content_type="application/geopackage+sqlite3")
    assert client.calls == [
        {
            "Bucket": "b",
            "Key": "k",
            "Body": b"body",
            "ContentType": "application/geopackage+sqlite3",
        }
    ]
    client.error = ("AccessDenied", 403)
    with pytest.raises(ValueError, match=r"^s3://b/k: AccessDenied$"):
        reader.put("b", "k", b"body", content_type="x")
