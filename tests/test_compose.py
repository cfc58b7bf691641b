"""compose.yaml, checked as far as a machine without a container engine allows.

No engine runs here (and the docker CLI has no compose plugin), so nothing is started: the file
is validated against the Compose Specification's JSON Schema (the copy check-jsonschema
vendors), every setting it gives the worker is loaded by worker/settings.py, every command is
parsed by the CLI, every file it mounts exists, the pieces it wires together agree (broker
credentials and the user preloaded in RabbitMQ, Prometheus' scrape path and rule file,
Grafana's provisioning and the dashboard's path), and its bucket set-up runs against a real S3
emulator.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import jsonschema
import pytest
import yaml

from tests.test_alerts import promtool
from worker.cli import build_parser
from worker.settings import ENV_PREFIX, Settings, load_settings, require_credentials

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
IN_CI = bool(os.environ.get("CI"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves <<: merges
    return document


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def compose_schema() -> dict[str, Any]:
    try:
        vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        message = "check-jsonschema is not installed (pip install -e '.[test]')"
        if IN_CI:
            pytest.fail(message + "; CI must provide it")
        pytest.skip(message)
    schema: dict[str, Any] = json.loads((vendored / "compose-spec.json").read_text())
    return schema


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator.iter_errors(compose)
    ]
    assert errors == []
    # The schema is not a rubber stamp: a misspelt key fails it.
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["depends_onn"] = ["rabbitmq"]
    assert not validator.is_valid(broken)


def test_everything_a_service_depends_on_exists(compose: dict[str, Any]) -> None:
    named_volumes = set(compose.get("volumes", {}))
    for name, service in services(compose).items():
        for needed in service.get("depends_on", []):
            assert needed in services(compose), f"{name} depends on unknown {needed}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith("."):
                assert source in named_volumes, f"{name}: no volume {source}"


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {key: str(value) for key, value in service.get("environment", {}).items()}


def test_every_batch_worker_variable_is_a_setting_and_the_worker_starts_with_them(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    used = {
        key
        for service in services(compose).values()
        for key in _env(service)
        if key.startswith(ENV_PREFIX)
    }
    assert used, "the worker is configured through BATCH_WORKER_* variables"
    assert used <= known, used - known
    # And they make valid settings for the daemon (as `batch-worker run` would load them).
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.chdir(ROOT / "config")  # no stray .env file
    for key, value in _env(services(compose)["worker"]).items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    require_credentials(settings)
    assert settings.batch_url == "http://simulator:8000/api/v2/batch"
    assert urlsplit(settings.broker_url.get_secret_value()).hostname == "rabbitmq"
    assert urlsplit(settings.database_url.get_secret_value()).hostname == "postgres"


def test_every_command_is_one_the_cli_takes(compose: dict[str, Any]) -> None:
    parser = build_parser()
    simulator = services(compose)["simulator"]["command"]
    args = parser.parse_args(simulator)
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    worker_env = _env(services(compose)["worker"])
    # The simulator accepts exactly the client the workers are given.
    assert args.client_id == worker_env["BATCH_WORKER_CLIENT_ID"]
    assert args.client_secret == worker_env["BATCH_WORKER_CLIENT_SECRET"]
    assert urlsplit(worker_env["BATCH_WORKER_API_URL"]).port == args.port
    # The examples service runs `batch-worker submit JOB` for each job file.
    (loop,) = services(compose)["examples"]["command"]
    submit = shlex.split(loop.split(";")[1].strip().removeprefix("do "))
    assert submit[0] == "batch-worker"
    assert parser.parse_args([*submit[1:2], "/examples/x.json"]).command == "submit"


def test_every_mounted_file_exists(compose: dict[str, Any]) -> None:
    mounts = 0
    for name, service in services(compose).items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if not source.startswith("."):
                continue
            mounts += 1
            path = ROOT / source
            assert path.exists(), f"{name} mounts {source}, which does not exist"
            # A file mounted as a file, a folder as a folder (Docker would make a folder).
            looks_like_file = Path(target).suffix != "" or target.endswith("enabled_plugins")
            assert path.is_file() == looks_like_file, f"{name}: {source} -> {target}"
        if "build" in service:
            assert (ROOT / service["build"] / "Dockerfile").is_file()
    assert mounts >= 10


def _mount_source(service: dict[str, Any], target: str) -> Path:
    for volume in service.get("volumes", []):
        source, mounted = volume.split(":")[:2]
        if mounted == target:
            return ROOT / source
    raise AssertionError(f"nothing mounted at {target}")


def test_rabbitmq_boots_with_the_topology_and_the_user_the_workers_log_in_as(
    compose: dict[str, Any],
) -> None:
    rabbitmq = services(compose)["rabbitmq"]
    config = _mount_source(rabbitmq, "/etc/rabbitmq/conf.d/90-batch-worker.conf").read_text()
    assert "load_definitions = /etc/rabbitmq/definitions.d\n" in config
    assert (
        "rabbitmq_prometheus"
        in _mount_source(rabbitmq, "/etc/rabbitmq/enabled_plugins").read_text()
    )
    # Loaded in file-name order: the vhost and user before the queues that need the vhost.
    definitions = sorted(
        v.split(":")[1] for v in rabbitmq["volumes"] if ":/etc/rabbitmq/definitions.d/" in v
    )
    assert [Path(d).name for d in definitions] == ["10-access.json", "20-topology.json"]
    topology = _mount_source(rabbitmq, definitions[1])
    assert topology == ROOT / "config" / "rabbitmq" / "definitions-rabbitmq4.json"
    access = json.loads(_mount_source(rabbitmq, definitions[0]).read_text())
    broker = urlsplit(_env(services(compose)["worker"])["BATCH_WORKER_BROKER_URL"])
    (user,) = (u for u in access["users"] if u["name"] == broker.username)
    # rabbit_password_hashing_sha256: base64(salt ++ sha256(salt ++ password)).
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    raw = base64.b64decode(user["password_hash"])
    salt, digest = raw[:4], raw[4:]
    assert digest == hashlib.sha256(salt + (broker.password or "").encode()).digest()
    assert {"user": broker.username, "vhost": "/"}.items() <= access["permissions"][0].items()
    assert access["vhosts"] == [{"name": "/"}]


def test_prometheus_scrapes_what_the_rules_and_the_dashboard_read(
    compose: dict[str, Any],
) -> None:
    prometheus = services(compose)["prometheus"]
    config_path = _mount_source(prometheus, "/etc/prometheus/prometheus.yml")
    rules = _mount_source(prometheus, "/etc/prometheus/alerts.yaml")
    assert rules == ROOT / "config" / "prometheus" / "alerts.yaml"
    config = yaml.safe_load(config_path.read_text())
    # Rule files resolve beside the config file, here and in the container alike.
    assert config["rule_files"] == ["alerts.yaml"] and rules.parent == config_path.parent
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["rabbitmq"]["metrics_path"] == "/metrics/per-object"
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    worker_port = Settings.model_fields["metrics_port"].default
    assert jobs["batch-worker"]["dns_sd_configs"][0] == {
        "names": ["worker"],
        "type": "A",
        "port": worker_port,
        "refresh_interval": "15s",
    }
    checked = promtool("check", "config", str(config_path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_grafana_is_provisioned_with_the_dashboard_and_the_stacks_prometheus(
    compose: dict[str, Any],
) -> None:
    grafana = services(compose)["grafana"]
    providers = _mount_source(grafana, "/etc/grafana/provisioning/dashboards")
    (provider,) = yaml.safe_load((providers / "batch-worker.yaml").read_text())["providers"]
    dashboard = _mount_source(grafana, f"{provider['options']['path']}/batch-worker.json")
    assert dashboard == ROOT / "config" / "grafana" / "batch-worker-dashboard.json"
    assert json.loads(dashboard.read_text())["uid"] == "batch-worker"
    sources = _mount_source(grafana, "/etc/grafana/provisioning/datasources")
    (source,) = yaml.safe_load((sources / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and source["isDefault"]


def test_the_bucket_set_up_makes_the_bucket_the_examples_read(
    compose: dict[str, Any], s3_endpoint: str
) -> None:
    setup = services(compose)["s3-setup"]
    assert setup["entrypoint"] == ["python", "-c"]
    (script,) = setup["command"]
    examples = _mount_source(setup, "/examples")
    script = script.replace("/examples/", f"{examples}/")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({k: v for k, v in _env(setup).items() if k.startswith("AWS_")})
    env["AWS_ENDPOINT_URL"] = s3_endpoint  # the emulator here, not the stack's s3:5000
    for _ in range(2):  # a second `up` finds the bucket there
        run = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert run.returncode == 0, run.stderr
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    head = s3.head_object(Bucket="demo-bucket", Key="inputs/corsica-fields.gpkg")
    assert head["ContentLength"] == (examples / "corsica-fields.gpkg").stat().st_size
    job = json.loads((examples / "geopackage-fields.json").read_text())
    assert "s3://demo-bucket/inputs/corsica-fields.gpkg" in json.dumps(job)
