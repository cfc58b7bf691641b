"""Connections: heartbeat, TLS options, names per purpose; the definitions command."""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest

from worker import broker
from worker.settings import Settings
from worker.topology import definitions, topology


def test_connection_sets_heartbeat_and_names_its_purpose() -> None:
    settings = Settings(heartbeat=7, worker_name="w-1")
    conn = broker.connection(settings, purpose="publish")
    assert conn.heartbeat == 7
    props = conn.transport_options["client_properties"]
    assert props["connection_name"] == "batch-worker w-1 publish"
    assert props["purpose"] == "publish"
    assert not conn.ssl


def test_amqps_uses_tls_with_the_configured_files(tmp_path: Path) -> None:
    files = {}
    for name in ("ca", "cert", "key"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("-", encoding="utf-8")
    settings = Settings(
        broker_url="amqps://u:p@rabbit.example:5671/vh",
        broker_ca_file=files["ca"],
        broker_cert_file=files["cert"],
        broker_key_file=files["key"],
    )
    conn = broker.connection(settings, purpose="consume")
    assert conn.ssl["ca_certs"] == str(files["ca"])
    assert conn.ssl["certfile"] == str(files["cert"])
    assert conn.ssl["keyfile"] == str(files["key"])
    assert conn.ssl["cert_reqs"] == ssl.CERT_REQUIRED
    assert "p@" not in conn.as_uri()  # kombu masks the password when showing the URL


@pytest.mark.integration
def test_negotiated_heartbeat_and_client_properties(broker_url: str) -> None:
    settings = Settings(broker_url=broker_url, heartbeat=9, worker_name="w-hb")
    conn = broker.ensure_connected(broker.connection(settings, purpose="consume"))
    try:
        assert conn.connection.heartbeat == 9
        assert conn.connection.client_properties["connection_name"] == "batch-worker w-hb consume"
    finally:
        conn.release()


def test_render_definitions_command_writes_the_topology(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCH_WORKER_JOBS_QUEUE", "other.jobs")
    target = tmp_path / "defs.json"
    assert broker.main(["render-definitions", str(target)]) == 0
    written = json.loads(target.read_text(encoding="utf-8"))
    expected = definitions(topology(Settings(jobs_queue="other.jobs")))
    assert written == expected
    assert "other.jobs" in {queue["name"] for queue in written["queues"]}


def test_render_definitions_reports_bad_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BATCH_WORKER_HEARTBEAT", "-1")
    assert broker.main(["render-definitions", str(tmp_path / "x.json")]) == 2
    assert "BATCH_WORKER_HEARTBEAT" in capsys.readouterr().err
