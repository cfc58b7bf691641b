"""scripts/rabbitmq4.sh refuses a ROOT that is not a folder of its own before doing
anything: it deletes and writes under ROOT, and an earlier attempt at such a script wrote
the host's /etc/rabbitmq/rabbitmq.conf (the shared broker's)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rabbitmq4.sh"


def _run(root: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "RABBITMQ4_ROOT": root},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("root", "said"),
    [
        ("", "is empty"),
        ("/", "host's root"),
        ("//", "host's root"),
        ("/./", "host's root"),
        ("/etc/..", "host's root"),
        ("/etc", "top-level folder"),
        ("/var/", "top-level folder"),
        ("var/cache/x", "absolute path"),
    ],
)
def test_a_root_that_is_not_a_folder_of_its_own_is_refused(root: str, said: str) -> None:
    for command in ("stop", "prepare", "start", "url"):
        result = _run(root, command)
        assert result.returncode == 1, (root, command, result.stdout)
        assert said in result.stderr
        assert result.stdout == ""


def test_a_root_to_the_host_root_through_a_symlink_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "root"
    link.symlink_to("/")
    result = _run(str(link), "stop")
    assert result.returncode == 1
    assert "host's root" in result.stderr


def test_an_existing_folder_it_did_not_prepare_is_never_taken_or_removed(
    tmp_path: Path,
) -> None:
    keep = tmp_path / "someone-elses" / "file"
    keep.parent.mkdir()
    keep.write_text("mine")
    result = _run(str(keep.parent), "prepare")
    assert result.returncode == 1
    assert "was not prepared by this script" in result.stderr
    assert keep.read_text() == "mine"
