"""What the chart adds around the worker: scraping, alert rules, the dashboard, the network
policy and the `helm test` pod."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_support import (
    CHART,
    FULL,
    MONITORING,
    NETWORK_POLICY,
    ROOT,
    container,
    pod_labels,
    render,
    selects,
    the,
)

from worker.daemon.health import Health, ProbeServer
from worker.metrics import Metrics

ALERTS = ROOT / "config" / "prometheus" / "alerts.yaml"
DASHBOARD = ROOT / "config" / "grafana" / "batch-worker-dashboard.json"
PROMETHEUS_RULE = {"metrics": {"prometheusRule": {"enabled": True}}}
DASHBOARD_ON = {"metrics": {"grafanaDashboard": {"enabled": True}}}


# --- Prometheus ------------------------------------------------------------------------------


def test_service_monitor_scrapes_the_services_metrics_port(chart: Any) -> None:
    manifests = render(chart, FULL)
    monitor = the(manifests, "ServiceMonitor")
    service = the(manifests, "Service")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])


def test_the_charts_alert_rules_are_the_projects_file() -> None:
    """Byte for byte: after a change of config/prometheus/alerts.yaml, copy it to files/."""
    assert (CHART / "files" / "alerts.yaml").read_bytes() == ALERTS.read_bytes(), (
        "cp config/prometheus/alerts.yaml helm/batch-worker/files/alerts.yaml"
    )


def test_the_prometheus_rule_holds_every_group_of_the_file_unchanged(chart: Any) -> None:
    manifests = render(chart, {"metrics": {"prometheusRule": {"enabled": True, "labels": {}}}})
    rule = the(manifests, "PrometheusRule")
    groups = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    assert groups
    assert rule["spec"]["groups"] == groups
    # Prometheus's own templates pass through Helm untouched.
    assert "{{ $labels.instance }}" in json.dumps(rule)


def test_the_prometheus_rule_is_labelled_for_the_operators_rule_selector(chart: Any) -> None:
    values = {
        "metrics": {
            "prometheusRule": {
                "enabled": True,
                "labels": {"release": "prometheus"},
                "additionalAlertLabels": {"team": "data-platform", "severity": "page"},
            }
        }
    }
    rule = the(render(chart, values), "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    original = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    for group, before in zip(rule["spec"]["groups"], original, strict=True):
        for alert, was in zip(group["rules"], before["rules"], strict=True):
            assert alert["labels"]["team"] == "data-platform"
            # The file's own labels win: severity routes the alert.
            assert alert["labels"]["severity"] == was["labels"].get("severity", "page")
            assert {k: v for k, v in alert.items() if k != "labels"} == {
                k: v for k, v in was.items() if k != "labels"
            }


@pytest.fixture
def chart_with_rules(helm: types.ModuleType, tmp_path: Path) -> Iterator[Any]:
    """A copy of the chart whose alerts file has other groups, a recording rule among them."""
    copy = tmp_path / "batch-worker"
    shutil.copytree(CHART, copy)
    rules = {
        "groups": [
            {
                "name": "batch-worker-recording",
                "interval": "1m",
                "rules": [{"record": "job:batch_worker_jobs:max", "expr": "max(x) by (job)"}],
            },
            {
                "name": "batch-worker-slo",
                "rules": [
                    {"alert": "A", "expr": "up == 0", "for": "5m", "labels": {"severity": "info"}},
                    {"alert": "B", "expr": "vector(1)"},
                ],
            },
        ]
    }
    (copy / "files" / "alerts.yaml").write_text("# other rules\n" + yaml.safe_dump(rules))
    with helm.Chart.load(str(copy)) as loaded:
        yield loaded, rules["groups"]


def test_the_prometheus_rule_takes_whatever_groups_the_file_has(
    chart_with_rules: tuple[Any, list[dict[str, Any]]],
) -> None:
    chart, groups = chart_with_rules
    rule = the(render(chart, PROMETHEUS_RULE), "PrometheusRule")
    assert rule["spec"]["groups"] == groups
    labelled = {
        "metrics": {"prometheusRule": {"enabled": True, "additionalAlertLabels": {"team": "t"}}}
    }
    recording, alerts = the(render(chart, labelled), "PrometheusRule")["spec"]["groups"]
    assert recording == groups[0]  # a recording rule's labels would change its series
    assert [rule["labels"] for rule in alerts["rules"]] == [
        {"severity": "info", "team": "t"},
        {"team": "t"},
    ]


# --- Grafana ------------------------------------------------------------------------------------


def test_the_charts_dashboard_is_the_projects_file() -> None:
    copy = CHART / "files" / "batch-worker-dashboard.json"
    assert copy.read_bytes() == DASHBOARD.read_bytes(), (
        "cp config/grafana/batch-worker-dashboard.json helm/batch-worker/files/"
    )


def test_the_dashboard_configmap_is_labelled_for_grafanas_sidecar(chart: Any) -> None:
    configmap = the(render(chart, DASHBOARD_ON), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "jobs"
    (data,) = configmap["data"].values()
    assert json.loads(data) == json.loads(DASHBOARD.read_text())


def test_the_dashboards_label_and_namespace_are_the_sidecars(chart: Any) -> None:
    values = {
        "metrics": {
            "grafanaDashboard": {
                "enabled": True,
                "label": "grafana.example.com/dashboard",
                "labelValue": "batch",
                "namespace": "grafana",
                "annotations": {"grafana_folder": "Batch"},
            }
        }
    }
    configmap = the(render(chart, values), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana.example.com/dashboard"] == "batch"
    assert "grafana_dashboard" not in configmap["metadata"]["labels"]
    assert configmap["metadata"]["namespace"] == "grafana"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Batch"}


def test_rabbitmq_definitions_configmap_is_the_projects_file(chart: Any) -> None:
    shipped = json.loads((ROOT / "config" / "rabbitmq" / "definitions.json").read_text())
    assert json.loads((CHART / "files" / "rabbitmq-definitions.json").read_text()) == shipped
    configmap = the(render(chart, {"rabbitmqDefinitions": {"enabled": True}}), "ConfigMap")
    assert json.loads(configmap["data"]["definitions.json"]) == shipped
    own = json.dumps({"queues": [{"name": "jobs-eu"}]})
    configmap = the(
        render(chart, {"rabbitmqDefinitions": {"enabled": True, "content": own}}), "ConfigMap"
    )
    assert json.loads(configmap["data"]["definitions.json"]) == json.loads(own)


# --- the network policy ------------------------------------------------------------------------


def _egress_ports(policy: dict[str, Any]) -> list[set[tuple[Any, str]]]:
    return [{(p["port"], p["protocol"]) for p in rule["ports"]} for rule in policy["egress"]]


def test_the_network_policy_is_off_unless_asked_for(chart: Any) -> None:
    assert all(m["kind"] != "NetworkPolicy" for m in render(chart))


def test_by_default_the_policy_opens_only_the_workers_ports(chart: Any) -> None:
    manifests = render(chart, {"networkPolicy": {"enabled": True}})
    policy = the(manifests, "NetworkPolicy")["spec"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels(manifests))
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["ingress"]
    assert ingress == {"ports": [{"port": "metrics", "protocol": "TCP"}]}  # from anywhere
    assert {p["name"] for p in container(manifests)["ports"]} == {"metrics"}
    assert _egress_ports(policy) == [
        {(53, "UDP"), (53, "TCP")},
        {(5672, "TCP"), (5671, "TCP")},
        {(5432, "TCP")},
        {(443, "TCP")},
    ]
    dns, *others = policy["egress"]
    (kube_dns,) = dns["to"]
    assert kube_dns["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert all("to" not in rule for rule in others)  # any address, on those ports only


def test_the_policy_takes_the_peers_and_ports_given(chart: Any) -> None:
    manifests = render(chart, {"networkPolicy": NETWORK_POLICY})
    policy = the(manifests, "NetworkPolicy")["spec"]
    (ingress,) = policy["ingress"]
    scraper, test_pod = ingress["from"]
    assert scraper == {"namespaceSelector": {"matchLabels": MONITORING}}
    dns, broker, database, https, extra = policy["egress"]
    assert broker == {
        "ports": [{"port": 5671, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.9.0/24"]}}],
    }
    assert database["to"][0]["podSelector"] == {"matchLabels": {"app": "postgres"}}
    assert https == {"ports": [{"port": 443, "protocol": "TCP"}]}  # the default kept
    assert extra == {"ports": [{"port": 8080, "protocol": "TCP"}]}
    assert dns["ports"][0]["port"] == 53
    # The test pod is let in when the scrapers are restricted...
    assert selects(
        test_pod["podSelector"]["matchLabels"], the(manifests, "Pod")["metadata"]["labels"]
    )
    # ...and only while there is one.
    values = {"networkPolicy": NETWORK_POLICY, "tests": {"enabled": False}}
    (ingress,) = the(render(chart, values), "NetworkPolicy")["spec"]["ingress"]
    assert ingress["from"] == [scraper]


def test_the_test_pod_is_no_worker_to_any_selector(chart: Any) -> None:
    """The Service must not route to it, nor the PDB count it, nor the policy fence it."""
    manifests = render(chart, {"networkPolicy": {"enabled": True}})
    labels = the(manifests, "Pod")["metadata"]["labels"]
    assert labels["app.kubernetes.io/instance"] == "bw"
    for selector in (
        the(manifests, "Service")["spec"]["selector"],
        the(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        the(manifests, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
        the(manifests, "Deployment")["spec"]["selector"]["matchLabels"],
    ):
        assert selects(selector, pod_labels(manifests))
        assert not selects(selector, labels)


# --- helm test ---------------------------------------------------------------------------------


def test_the_test_pod_is_a_helm_test_hook_asking_the_service(chart: Any) -> None:
    manifests = render(chart, {"metrics": {"port": 9555}})
    pod = the(manifests, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    (test,) = pod["spec"]["containers"]
    assert test["image"] == container(manifests)["image"]
    assert test["securityContext"] == container(manifests)["securityContext"]
    env = {e["name"]: e["value"] for e in test["env"]}
    service = the(manifests, "Service")["metadata"]["name"]
    assert env["BASE_URL"] == f"http://{service}.jobs.svc:9555"


def _run_test_pod(
    chart: Any, base_url: str, *, retries: str | None = None
) -> subprocess.CompletedProcess[str]:
    """The test pod's command, as the pod runs it, against ``base_url``."""
    (test,) = the(render(chart), "Pod")["spec"]["containers"]
    program, flag, script = test["command"]
    assert (program, flag) == ("python", "-c")
    if retries is not None:
        assert "ATTEMPTS, PAUSE = 10, 3" in script
        script = script.replace("ATTEMPTS, PAUSE = 10, 3", f"ATTEMPTS, PAUSE = {retries}")
    return subprocess.run(
        [sys.executable, "-c", script],
        env={"BASE_URL": base_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@dataclass
class Probes:
    """The worker's own probe server on a free loopback port, and the clock its health reads."""

    health: Health
    url: str
    now: list[float]


@pytest.fixture
def probes() -> Iterator[Probes]:
    now = [0.0]
    health = Health(clock=lambda: now[0])
    health.register("engine", 60)
    server = ProbeServer(Metrics(), health, host="127.0.0.1", port=0)
    server.start()
    try:
        yield Probes(health, f"http://127.0.0.1:{server.port}", now)
    finally:
        server.stop()


def test_the_test_pod_passes_against_a_healthy_worker(chart: Any, probes: Probes) -> None:
    result = _run_test_pod(chart, probes.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["ok", "/healthz", "ok", "/metrics"]


def test_the_test_pod_fails_against_a_stalled_worker(chart: Any, probes: Probes) -> None:
    probes.now[0] += 61  # past the engine loop's bound
    result = _run_test_pod(chart, probes.url)
    assert result.returncode == 1
    assert "FAIL /healthz: 503" in result.stderr
    assert "loop engine stalled" in result.stderr


def test_the_test_pod_fails_where_no_worker_answers(chart: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # Nothing listens there now: after its retries, the test fails naming the URL.
    result = _run_test_pod(chart, url, retries="2, 0")
    assert result.returncode == 1
    assert f"FAIL /healthz: no answer from {url}" in result.stderr
    assert "attempt 2 of 2" in result.stdout
