"""The chart's status API (web.enabled): a Deployment, a Service and an Ingress of its own,
apart from the workers: no selector of one takes the other's pods, and the pod is what
`batch-worker web` needs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from deploy_support import SCENARIOS, SECRETS, kinds, render, selects

from worker.settings import ENV_PREFIX, Settings, load_settings

WEB = SCENARIOS["web"]
SETTINGS_ENV = {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def _web(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [
        m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == "bw-batch-worker-web"
    ]
    return found


def _worker(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [
        m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == "bw-batch-worker"
    ]
    return found


def _settings_of_the_web_pod(
    manifests: list[dict[str, Any]],
    secret: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """What the web pod's process loads: its rendered env, and the Secret as mounted files
    (nothing of this test process's own environment)."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    for key, value in secret.items():
        (secrets_dir / key).write_text(value + "\n")
    (container,) = _web(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    for entry in container["env"]:
        monkeypatch.setenv(entry["name"], entry.get("value", "web-7c9f-x2k"))
    monkeypatch.setenv(f"{ENV_PREFIX}SECRETS_DIR", str(secrets_dir))
    return load_settings()


def test_off_by_default_and_on_with_its_own_deployment_service_and_ingress(chart: Any) -> None:
    assert not [m for m in render(chart) if m["metadata"]["name"].endswith("-web")]
    manifests = render(chart, WEB)
    ours = {m["kind"] for m in manifests if m["metadata"]["name"].endswith("-web")}
    assert ours == {"Deployment", "Service", "Ingress"}
    no_ingress = render(chart, {"web": {"enabled": True}})
    assert "Ingress" not in kinds(no_ingress)


def test_no_selector_of_the_workers_takes_the_web_pods_nor_the_other_way(chart: Any) -> None:
    manifests = render(chart, {**WEB, "networkPolicy": {"enabled": True}})
    web_pods = _web(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    worker_pods = _worker(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    worker_selectors = [
        _worker(manifests, "Deployment")["spec"]["selector"]["matchLabels"],
        _worker(manifests, "Service")["spec"]["selector"],
        _worker(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        _worker(manifests, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    ]
    assert all(not selects(selector, web_pods) for selector in worker_selectors)
    web_selectors = [
        _web(manifests, "Deployment")["spec"]["selector"]["matchLabels"],
        _web(manifests, "Service")["spec"]["selector"],
    ]
    assert all(selects(selector, web_pods) for selector in web_selectors)
    assert all(not selects(selector, worker_pods) for selector in web_selectors)


def test_the_web_pod_serves_on_its_port_and_is_probed_there(chart: Any) -> None:
    manifests = render(chart, {"web": {"enabled": True, "port": 8181}})
    pod = _web(manifests, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == ["web"]
    assert container["ports"] == [{"name": "http", "containerPort": 8181, "protocol": "TCP"}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env[f"{ENV_PREFIX}WEB_PORT"] == "8181" and env[f"{ENV_PREFIX}WEB_HOST"] == "0.0.0.0"
    assert set(env) - {f"{ENV_PREFIX}SECRETS_DIR"} <= SETTINGS_ENV
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    service = _web(manifests, "Service")["spec"]["ports"]
    assert service == [{"name": "http", "port": 8181, "targetPort": "http", "protocol": "TCP"}]


def test_the_ingress_routes_its_hosts_to_the_web_service(chart: Any) -> None:
    spec = _web(render(chart, WEB), "Ingress")["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"secretName": "bw-tls", "hosts": ["bw.example.com"]}]
    (rule,) = spec["rules"]
    (path,) = rule["http"]["paths"]
    assert rule["host"] == "bw.example.com"
    assert path["backend"] == {"service": {"name": "bw-batch-worker-web", "port": {"name": "http"}}}
    every_host = _web(
        render(chart, {"web": {"enabled": True, "ingress": {"enabled": True}}}), "Ingress"
    )
    assert every_host["spec"]["defaultBackend"]["service"]["name"] == "bw-batch-worker-web"


def test_a_mistake_in_web_values_is_refused(chart: Any) -> None:
    for wrong in (
        {"web": {"enabled": True, "port": 0}},
        {
            "web": {
                "ingress": {
                    "hosts": [{"host": "a", "paths": [{"path": "x", "pathType": "Prefix"}]}]
                }
            }
        },
        {"web": {"colour": "blue"}},
        {"config": {"WEB_PORT": "1"}},
        {"secrets": {"webBasicAuth": "no-colon"}},
    ):
        with pytest.raises(Exception):  # noqa: B017 - helm's own error type
            render(chart, wrong)


def test_the_web_process_reads_its_rendered_env_and_secret_files(
    chart: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {
        **WEB,
        "secrets": {**SECRETS, "webToken": "t0ken-value-123456", "webBasicAuth": "ops:pw"},
    }
    manifests = render(chart, values)
    secret = _worker(manifests, "Secret")["stringData"]
    assert secret[f"{ENV_PREFIX}WEB_TOKEN"] == "t0ken-value-123456"
    spec = json.dumps(_web(manifests, "Deployment"))
    assert "t0ken-value-123456" not in spec and "ops:pw" not in spec
    loaded = _settings_of_the_web_pod(manifests, secret, tmp_path, monkeypatch)

    assert str(loaded.web_host) == "0.0.0.0" and loaded.web_port == 8080
    assert loaded.web_token.get_secret_value() == "t0ken-value-123456"
    assert loaded.web_basic_auth.get_secret_value() == "ops:pw"
    assert loaded.web_basemap_url == "https://tiles.example/{z}/{x}/{y}.png"
    assert loaded.database_url.get_secret_value() == SECRETS["databaseUrl"]


def test_tenant_tokens_go_in_the_secret_and_the_proxy_header_in_the_web_env(
    chart: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = {"team-a": "token-of-team-a-0001", "team-b": "token-of-team-b-0002"}
    values = {
        **WEB,
        "config": {**WEB.get("config", {}), "TENANTS": '{"team-a": {}, "team-b": {}}'},
        "web": {**WEB["web"], "tenantHeader": "X-Auth-Request-User"},
        "secrets": {**SECRETS, "webTenantTokens": tokens},
    }
    manifests = render(chart, values)
    secret = _worker(manifests, "Secret")["stringData"]
    assert json.loads(secret[f"{ENV_PREFIX}WEB_TENANT_TOKENS"]) == tokens
    spec = json.dumps(_web(manifests, "Deployment"))
    assert not any(token in spec for token in tokens.values())
    # The workers need neither: the header is the web pods' alone.
    assert f"{ENV_PREFIX}WEB_TENANT_HEADER" not in json.dumps(_worker(manifests, "Deployment"))

    loaded = _settings_of_the_web_pod(manifests, secret, tmp_path, monkeypatch)

    assert loaded.web_tenant_header == "X-Auth-Request-User"
    assert {t: s.get_secret_value() for t, s in loaded.web_tenant_tokens.items()} == tokens
    for wrong in (
        {"web": {"tenantHeader": "X Bad"}},
        {"secrets": {"webTenantTokens": {"team-a": "short"}}},
        {"secrets": {"webTenantTokens": {"bad name!": "token-of-team-a-0001"}}},
    ):
        with pytest.raises(Exception):  # noqa: B017 - helm's own error type
            render(chart, wrong)
