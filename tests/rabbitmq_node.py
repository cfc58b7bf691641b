"""A RabbitMQ node of a test's own, on ports of its own, to stop and start at will.

The shared broker on 5672 must never be restarted while other tests use it; a test that
needs a broker restart starts one of these instead (a node name, AMQP and distribution
ports, and data, log and config files under a temporary directory, all its own), so it
needs no ``serial`` mark. Needs ``rabbitmq-server`` (scripts/ensure-services.sh installs
it) and root or the ``rabbitmq`` user: Debian's wrapper runs the node as ``rabbitmq``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI
from tests.e2e.conftest import free_port

BOOT_TIMEOUT = 90.0


class RabbitNode:
    """One node; ``url`` reaches it as guest from loopback."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.name = f"bw-follow-{uuid.uuid4().hex[:8]}@localhost"
        self.port = free_port()
        dist_port = free_port()
        # The packaged /etc/rabbitmq/rabbitmq.conf names 5672: this node reads its own, and
        # loads no plugin (the management plugin would want 15672).
        config = base / "rabbitmq.conf"
        config.write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        plugins = base / "enabled_plugins"
        plugins.write_text("[].\n")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_CONFIG_FILE": str(config),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _listening(self) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1):
            return True
        return False

    def _running(self) -> bool:
        check = subprocess.run(
            ["rabbitmq-diagnostics", "-n", self.name, "-q", "check_running"],
            env=self.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        return check.returncode == 0

    def start(self) -> float:
        """Start the node and wait until it takes connections; the seconds that took."""
        began = time.monotonic()
        # Returns at once, even when the boot fails later: hence the polling.
        subprocess.run(
            ["rabbitmq-server", "-detached"],
            env=self.env,
            capture_output=True,
            timeout=60,
            check=True,
        )
        deadline = began + BOOT_TIMEOUT
        while not (self._listening() and self._running()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} did not start: {self.log_tail()}")
            time.sleep(0.3)
        return time.monotonic() - began

    def stop(self) -> None:
        subprocess.run(
            ["rabbitmqctl", "-n", self.name, "shutdown"],
            env=self.env,
            capture_output=True,
            timeout=120,
            check=False,
        )

    def log_tail(self) -> str:
        logs = sorted((self.base / "log").glob("*.log"))
        return logs[-1].read_text(errors="replace")[-3000:] if logs else "(no log)"


def _usable() -> str | None:
    """Why a node of our own cannot run here, or None."""
    if shutil.which("rabbitmq-server") is None:
        return "rabbitmq-server is not installed (scripts/ensure-services.sh installs it)"
    try:
        rabbitmq = pwd.getpwnam("rabbitmq").pw_uid
    except KeyError:
        return "there is no rabbitmq user"
    if os.geteuid() not in (0, rabbitmq):
        return "a node of our own needs root or the rabbitmq user"
    return None


@pytest.fixture
def rabbit_node() -> Iterator[RabbitNode]:
    problem = _usable()
    if problem is not None:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)
    # Not under pytest's tmp_path: its parents are private to us, and the node runs as
    # the rabbitmq user.
    base = Path(tempfile.mkdtemp(prefix="bw-follow-rabbit-"))
    if os.geteuid() == 0:
        shutil.chown(base, "rabbitmq", "rabbitmq")
    node = RabbitNode(base)
    try:
        node.start()
        yield node
    finally:
        node.stop()
        shutil.rmtree(base, ignore_errors=True)
