"""The worker package of another commit, for side-by-side runs (``--baseline REF``)."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def export(ref: str, into: Path) -> Path:
    """``worker/`` as it was at ``ref``, unpacked under ``into``; the tree's root (put it
    first on a child's PYTHONPATH to run that commit's code)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "worker"], check=True, capture_output=True
    ).stdout
    path = into / "baseline.tar"
    path.write_bytes(archive)
    with tarfile.open(path) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"
