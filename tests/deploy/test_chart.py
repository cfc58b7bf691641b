"""The Helm chart: it lints, every combination of switches renders manifests that Kubernetes
(and the CRDs' schemas) accept, and the pod is what the worker needs."""

from __future__ import annotations

import json
import os
import re
import types
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from crd_schemas import CRD_SCHEMAS
from deploy_support import (
    CHART,
    FULL,
    KUBE_VERSIONS,
    SCENARIOS,
    SECRETS,
    budget,
    container,
    dockerfile_uid,
    env_of,
    kinds,
    notes,
    pod_labels,
    pod_spec,
    render,
    selects,
    the,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.daemon import liveness
from worker.settings import ENV_PREFIX, Settings, load_settings

SECRET_KEYS = {f"{ENV_PREFIX}CLIENT_SECRET", f"{ENV_PREFIX}BROKER_URL", f"{ENV_PREFIX}DATABASE_URL"}
SETTINGS_ENV = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
ALWAYS = {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "Pod"}


# --- the chart as a whole --------------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["defaults", "everything"])
def test_chart_lints_without_findings(helm: types.ModuleType, scenario: str) -> None:
    report = helm.lint(str(CHART), SCENARIOS[scenario], strict=True, kube_version="v1.33.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_manifest_is_valid(
    chart: Any, kubernetes_validate: types.ModuleType, scenario: str, kube_version: str
) -> None:
    manifests = render(chart, SCENARIOS[scenario])
    assert manifests
    for manifest in manifests:
        if manifest["kind"] in CRD_SCHEMAS:
            jsonschema.validate(manifest, CRD_SCHEMAS[manifest["kind"]])
        else:
            kubernetes_validate.validate(manifest, kube_version, strict=True)


def test_the_manifests_do_not_depend_on_the_clusters_version() -> None:
    """The same manifests for every Kubernetes version (so one render, validated against each
    version above, covers them all), and `helm template` with no cluster renders what an
    install does: no template asks .Capabilities or looks the cluster up."""
    templates = [p for p in (CHART / "templates").rglob("*") if p.is_file()]
    assert len(templates) > 10
    for path in templates:
        text = path.read_text()
        assert ".Capabilities" not in text, path
        assert not re.search(r"\blookup\b", text), path


@pytest.mark.parametrize(
    ("values", "extra"),
    [
        ({}, {"Secret"}),
        ({"secrets": {"existingSecret": "creds"}}, set()),
        ({"keda": {"enabled": True}}, {"Secret", "ScaledObject", "TriggerAuthentication"}),
        ({"metrics": {"serviceMonitor": {"enabled": True}}}, {"Secret", "ServiceMonitor"}),
        ({"metrics": {"prometheusRule": {"enabled": True}}}, {"Secret", "PrometheusRule"}),
        ({"metrics": {"grafanaDashboard": {"enabled": True}}}, {"Secret", "ConfigMap"}),
        ({"rabbitmqDefinitions": {"enabled": True}}, {"Secret", "ConfigMap"}),
        ({"networkPolicy": {"enabled": True}}, {"Secret", "NetworkPolicy"}),
        ({"podDisruptionBudget": {"enabled": False}}, {"Secret", "-PodDisruptionBudget"}),
        ({"tests": {"enabled": False}}, {"Secret", "-Pod"}),
        ({"serviceAccount": {"create": False}}, {"Secret", "-ServiceAccount"}),
    ],
)
def test_optional_resources_follow_their_switches(
    chart: Any, values: dict[str, Any], extra: set[str]
) -> None:
    added = {k for k in extra if not k.startswith("-")}
    removed = {k[1:] for k in extra if k.startswith("-")}
    assert kinds(render(chart, values)) == (ALWAYS | added) - removed


# --- the pod -----------------------------------------------------------------------------------


def test_probes_hit_the_workers_endpoints_on_the_metrics_port(chart: Any) -> None:
    worker = container(render(chart))
    (port,) = worker["ports"]
    assert port == {"name": "metrics", "containerPort": 9400, "protocol": "TCP"}
    assert port["containerPort"] == Settings.model_fields["metrics_port"].default
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert worker["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}


def test_the_startup_probe_gives_the_process_a_minute_to_serve_its_probes(chart: Any) -> None:
    """/healthz, not /readyz: a broker down at start must not restart the pod in a loop."""
    worker = container(render(chart))
    probe = worker["startupProbe"]
    assert "enabled" not in probe
    assert probe["periodSeconds"] * probe["failureThreshold"] == 60
    # It holds the others back, so they need no delay of their own.
    assert worker["livenessProbe"]["initialDelaySeconds"] == 0
    assert worker["readinessProbe"]["initialDelaySeconds"] == 0
    longer = container(render(chart, {"startupProbe": {"failureThreshold": 90}}))
    assert longer["startupProbe"]["failureThreshold"] == 90
    assert "startupProbe" not in container(render(chart, {"startupProbe": {"enabled": False}}))


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
        assert float(env_of(manifests)[f"{ENV_PREFIX}GRACE_PERIOD"]) == grace
        assert pod_spec(manifests)["terminationGracePeriodSeconds"] > grace
    pod = pod_spec(render(chart, {"terminationGracePeriodSeconds": 90}))
    assert pod["terminationGracePeriodSeconds"] == 90


def test_a_termination_grace_not_above_the_workers_is_refused(chart: Any) -> None:
    with pytest.raises(Exception, match="must exceed gracePeriodSeconds"):
        render(chart, {"gracePeriodSeconds": 30, "terminationGracePeriodSeconds": 30})


def test_the_pod_runs_non_root_on_a_read_only_root(chart: Any) -> None:
    manifests = render(chart)
    pod = pod_spec(manifests)
    worker = container(manifests)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == dockerfile_uid()
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
    pod = pod_spec(manifests)
    labels = pod_labels(manifests)
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert selects(term["podAffinityTerm"]["labelSelector"]["matchLabels"], labels)
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["topologyKey"] == "topology.kubernetes.io/zone"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    custom = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}}
    assert pod_spec(render(chart, {"affinity": custom}))["affinity"] == custom


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ({}, "batch-worker:0.1.0"),  # the chart's appVersion
        ({"tag": "1.10"}, "batch-worker:1.10"),
        ({"tag": "v2.0.0-rc.1"}, "batch-worker:v2.0.0-rc.1"),
        (
            {"repository": "registry.example.com:5000/team/bw", "tag": "2"},
            "registry.example.com:5000/team/bw:2",
        ),
        ({"tag": "1.10", "digest": "sha256:" + "ab" * 32}, "batch-worker@sha256:" + "ab" * 32),
    ],
)
def test_the_image_is_the_tag_given_as_a_string(
    chart: Any, image: dict[str, str], expected: str
) -> None:
    manifests = render(chart, {"image": image})
    assert container(manifests)["image"] == expected
    assert the(manifests, "Pod")["spec"]["containers"][0]["image"] == expected


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
    # What the downward API gives the pod for metadata.name.
    env[f"{ENV_PREFIX}WORKER_NAME"] = "batch-worker-7c9f-x2k"
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
    assert (
        loaded.api_budget_per_minute == 600
    )  # the fleet's: the account's limit, not divided by the pods
    assert loaded.metrics_port == 9400
    assert loaded.worker_name == "batch-worker-7c9f-x2k"


def test_each_pod_names_its_worker_after_itself(chart: Any) -> None:
    """Pods of one node share nothing that tells them apart but their names."""
    (entry,) = [
        e for e in container(render(chart, {}))["env"] if e["name"] == f"{ENV_PREFIX}WORKER_NAME"
    ]
    assert entry == {
        "name": f"{ENV_PREFIX}WORKER_NAME",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }


def test_secrets_never_reach_the_environment_or_the_pod_spec(chart: Any) -> None:
    manifests = render(chart, {"secrets": SECRETS, "config": {"CLIENT_ID": "c"}})
    for kind in ("Deployment", "Pod"):
        spec = json.dumps(the(manifests, kind))
        for secret in SECRETS.values():
            assert secret not in spec


def test_an_existing_secret_replaces_the_charts(chart: Any) -> None:
    manifests = render(chart, FULL)
    assert "Secret" not in kinds(manifests)
    volumes = {v["name"]: v for v in pod_spec(manifests)["volumes"]}
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
    items = {v["name"]: v for v in pod_spec(manifests)["volumes"]}["broker-tls"]["secret"]["items"]
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
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    assert pdb["maxUnavailable"] == 1
    assert selects(pdb["selector"]["matchLabels"], pod_labels(manifests))


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
    """The query runs against the worker's own schema (worker/store/db.py) on a real PostgreSQL."""
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
    ("values", "fleet"),
    [
        ({}, 600),
        ({"replicaCount": 7}, 600),  # not divided: the pods share one bucket in PostgreSQL
        ({"apiBudget": {"accountLimitPerMinute": 600, "reservedPerMinute": 100}}, 500),
        ({"keda": {"enabled": True, "maxReplicaCount": 10}, "replicaCount": 2}, 600),
    ],
)
def test_budget_is_the_accounts_limit_less_the_reserve_for_every_pod(
    chart: Any, values: dict[str, Any], fleet: int
) -> None:
    assert budget(chart, values) == fleet


@settings(max_examples=25, deadline=None)
@given(
    limit=st.integers(1, 100_000),
    reserved=st.integers(0, 1000),
    pods=st.integers(1, 200),
    keda=st.booleans(),
)
def test_the_fleet_budget_is_the_accounts_limit_at_any_size(
    chart: Any, limit: int, reserved: int, pods: int, keda: bool
) -> None:
    values: dict[str, Any] = {
        "apiBudget": {"accountLimitPerMinute": limit, "reservedPerMinute": reserved},
        "replicaCount": pods,
        "keda": {"enabled": keda, "maxReplicaCount": pods},
    }
    if limit - reserved < 1:
        with pytest.raises(Exception, match="requests/min for the fleet"):
            render(chart, values)
        return
    assert budget(chart, values) == limit - reserved


def test_a_reserve_that_leaves_nothing_is_refused(chart: Any) -> None:
    values = {"apiBudget": {"accountLimitPerMinute": 100, "reservedPerMinute": 100}}
    with pytest.raises(Exception, match="leaves 0 requests/min"):
        render(chart, values)
