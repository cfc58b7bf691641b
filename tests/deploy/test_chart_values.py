"""values.schema.json: every key of values.yaml, so a mistake stops `helm install` with the
schema's message; and the chart README generated from both."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from deploy_support import CHART, NEWEST_KUBE, ROOT, SCHEMA, VALUES, render

from worker.settings import ENV_PREFIX, Settings

# Settings the chart sets itself: config (values) may not, values.schema.json refuses them.
CHART_MANAGED = {
    "API_BUDGET_PER_MINUTE",
    "GRACE_PERIOD",
    "METRICS_PORT",
    "WORKER_NAME",
    "CLIENT_SECRET",
    "BROKER_URL",
    "DATABASE_URL",
    # on the status API's pods (web.*), and its secrets (secrets.webToken, webBasicAuth,
    # webTenantTokens)
    "WEB_HOST",
    "WEB_PORT",
    "WEB_TOKEN",
    "WEB_BASIC_AUTH",
    "WEB_TENANT_TOKENS",
    "WEB_TENANT_HEADER",
}
SETTINGS_ENV = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
SCHEMA_ERROR = "values don't meet the specifications of the schema(s)"


def _resolve(node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = SCHEMA["definitions"][node["$ref"].rsplit("/", 1)[1]]
    return node


def _at(path: str) -> dict[str, Any]:
    """The schema of a dotted path; `[]` steps into a list's items, `#name` a definition."""
    node: dict[str, Any] = SCHEMA
    for part in path.split("."):
        node = _resolve(node)
        if part == "[]":
            node = node["items"]
        elif part.startswith("#"):
            node = SCHEMA["definitions"][part[1:]]
        else:
            node = node["properties"][part]
    return _resolve(node)


# --- mistakes are refused at install ----------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCout": 3}, "at '': additional properties 'replicaCout' not allowed"),
        ({"resources": "big"}, "at '/resources': got string, want object"),
        # YAML reads 1.10 as the float 1.1: the tag would be wrong whatever the template did.
        ({"image": {"tag": 1.10}}, "at '/image/tag': got number, want string"),
        ({"image": {"tag": 2}}, "at '/image/tag': got number, want string"),
        (
            {"networkPolicy": {"enabled": True, "egres": {}}},
            "at '/networkPolicy': additional properties 'egres' not allowed",
        ),
        (
            {"networkPolicy": {"egress": {"database": {"port": 5432}}}},
            "at '/networkPolicy/egress/database': additional properties 'port' not allowed",
        ),
        # An egress rule without ports would open every port.
        (
            {"networkPolicy": {"egress": {"broker": {"ports": []}}}},
            "at '/networkPolicy/egress/broker/ports': minItems: got 0, want 1",
        ),
        (
            {"resources": {"limit": {"memory": "1Gi"}}},
            "at '/resources': additional properties 'limit' not allowed",
        ),
        ({"resources": {"limits": {"memory": "1GB"}}}, "'1GB' does not match pattern"),
        (
            {"metrics": {"grafanaDashboard": {"labelValue": 1}}},
            "at '/metrics/grafanaDashboard/labelValue': got number, want string",
        ),
        (
            {"metrics": {"prometheusRule": {"enable": True}}},
            "at '/metrics/prometheusRule': additional properties 'enable' not allowed",
        ),
        (
            {"startupProbe": {"periodSecond": 2}},
            "at '/startupProbe': additional properties 'periodSecond' not allowed",
        ),
        (
            {"livenessProbe": {"successThreshold": 2}},
            "at '/livenessProbe/successThreshold': maximum: got 2, want 1",
        ),
        ({"podAnnotations": {"prometheus.io/port": 9400}}, "got number, want string"),
        ({"image": {"repository": "batch-worker:1.0"}}, "'batch-worker:1.0' does not match"),
        ({"image": {"digest": "sha256:abc"}}, "at '/image/digest'"),
        (
            {"tolerations": [{"key": "spot", "operator": "Equals"}]},
            "at '/tolerations/0/operator': value must be one of 'Exists', 'Equal'",
        ),
        ({"tests": {"enabled": "yes"}}, "at '/tests/enabled': got string, want boolean"),
        (
            {"extraEnv": [{"name": f"{ENV_PREFIX}POLL_INTERVAL", "value": "5"}]},
            "at '/extraEnv/0/name'",
        ),
        ({"config": {"POLL_INTERVALL": "10"}}, "invalid propertyName 'POLL_INTERVALL'"),
    ],
)
def test_a_mistake_in_values_stops_the_install_with_the_schemas_message(
    chart: Any, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(Exception, match=re.escape(SCHEMA_ERROR)) as caught:
        render(chart, values)
    assert message in str(caught.value)


def test_the_defaults_and_a_parents_globals_are_valid(chart: Any) -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.Draft7Validator(SCHEMA).validate(VALUES)
    # As a dependency of another chart, Helm hands this one the parent's `global` values.
    render(chart, {"global": {"imageRegistry": "registry.example.com"}})


def _own_objects(
    values: dict[str, Any], node: dict[str, Any], path: str
) -> list[tuple[str, set[str], set[str]]]:
    """(path, keys in values.yaml, keys in the schema) of every closed object the chart
    defines itself, at every level."""
    node = _resolve(node)
    found = [(path, set(values), set(node["properties"]))]
    for key, value in values.items():
        child = _resolve(node["properties"][key])
        where = f"{path}.{key}".lstrip(".")
        closed = child.get("additionalProperties") is False
        if isinstance(value, dict) and closed and where not in PASSED_THROUGH:
            found += _own_objects(value, child, where)
    return found


def test_every_key_of_the_charts_own_objects_is_in_values_yaml() -> None:
    """So the README lists each with its default. (Kubernetes objects are in values.yaml
    only with the fields the chart sets.)"""
    objects = _own_objects(VALUES, SCHEMA, "")
    assert len(objects) > 20
    for path, in_values, in_schema in objects:
        missing = in_schema - in_values - ({"global"} if path == "" else set())
        assert not missing, f"{path or 'top level'}: {sorted(missing)} have no default"
        assert in_values <= in_schema, path


# The values passed to Kubernetes as they are, and the Kubernetes type each one is.
KUBERNETES_SHAPES = {
    "resources": "core.v1.ResourceRequirements",
    "resources.claims.[]": "core.v1.ResourceClaim",
    "web.resources": "core.v1.ResourceRequirements",
    "web.resources.claims.[]": "core.v1.ResourceClaim",
    "web.ingress.tls.[]": "api.networking.v1.IngressTLS",
    "podSecurityContext": "core.v1.PodSecurityContext",
    "securityContext": "core.v1.SecurityContext",
    "securityContext.capabilities": "core.v1.Capabilities",
    "affinity": "core.v1.Affinity",
    "tolerations.[]": "core.v1.Toleration",
    "topologySpreadConstraints.[]": "core.v1.TopologySpreadConstraint",
    "imagePullSecrets.[]": "core.v1.LocalObjectReference",
    "extraEnv.[]": "core.v1.EnvVar",
    "extraEnvFrom.[]": "core.v1.EnvFromSource",
    "extraEnvFrom.[].configMapRef": "core.v1.ConfigMapEnvSource",
    "extraEnvFrom.[].secretRef": "core.v1.SecretEnvSource",
    "extraVolumeMounts.[]": "core.v1.VolumeMount",
    "updateStrategy": "apps.v1.DeploymentStrategy",
    "updateStrategy.rollingUpdate": "apps.v1.RollingUpdateDeployment",
    "#labelSelector": "apimachinery.pkg.apis.meta.v1.LabelSelector",
    "#labelSelector.matchExpressions.[]": "apimachinery.pkg.apis.meta.v1.LabelSelectorRequirement",
    "#networkPolicyPeer": "api.networking.v1.NetworkPolicyPeer",
    "#networkPolicyPeer.ipBlock": "api.networking.v1.IPBlock",
    "#networkPolicyPort": "api.networking.v1.NetworkPolicyPort",
    "networkPolicy.extraIngress.[]": "api.networking.v1.NetworkPolicyIngressRule",
    "networkPolicy.extraEgress.[]": "api.networking.v1.NetworkPolicyEgressRule",
}

PASSED_THROUGH = set(KUBERNETES_SHAPES) | {"livenessProbe", "readinessProbe", "startupProbe"}


@pytest.fixture(scope="module")
def kubernetes_types(kubernetes_validate: types.ModuleType) -> dict[str, Any]:
    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    path = schemas / f"v{NEWEST_KUBE}-local-strict" / "_definitions.json"
    return dict(json.loads(path.read_text())["$defs"])


@pytest.mark.parametrize("path", sorted(KUBERNETES_SHAPES))
def test_kubernetes_objects_take_exactly_the_fields_kubernetes_has(
    kubernetes_types: dict[str, Any], path: str
) -> None:
    name = KUBERNETES_SHAPES[path]
    name = f"io.k8s.{name}" if name.startswith(("api.", "apimachinery.")) else f"io.k8s.api.{name}"
    theirs = kubernetes_types[name]
    ours = _at(path)
    assert ours["additionalProperties"] is False
    assert set(ours["properties"]) == set(theirs["properties"]), path
    # Ours may require more (a port in a policy rule: without one, the rule opens all ports).
    assert set(theirs.get("required", [])) <= set(ours.get("required", [])), path


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe", "startupProbe"])
def test_probe_values_are_kubernetes_probe_fields_the_chart_does_not_set(
    kubernetes_types: dict[str, Any], probe: str
) -> None:
    fields = set(kubernetes_types["io.k8s.api.core.v1.Probe"]["properties"])
    handlers = {"httpGet", "exec", "grpc", "tcpSocket"}  # the chart's: /healthz or /readyz
    assert set(_at(probe)["properties"]) - {"enabled"} == fields - handlers


# --- config ---------------------------------------------------------------------------------


def test_values_schema_allows_exactly_the_settings_the_chart_leaves_to_config() -> None:
    allowed = set(SCHEMA["properties"]["config"]["propertyNames"]["enum"])
    assert {ENV_PREFIX + key for key in allowed} == SETTINGS_ENV - {
        ENV_PREFIX + key for key in CHART_MANAGED
    }


@pytest.mark.parametrize("key", sorted(CHART_MANAGED))
def test_config_may_not_set_what_the_chart_sets(chart: Any, key: str) -> None:
    with pytest.raises(Exception, match=key):
        render(chart, {"config": {key: "1"}})


# --- the chart's README ------------------------------------------------------------------------


def _readme_tool() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("chart_readme", ROOT / "scripts/chart_readme.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("chart_readme", module)
    spec.loader.exec_module(module)
    return module


def test_the_chart_readme_is_up_to_date() -> None:
    tool = _readme_tool()
    assert tool.main(["--check"]) == 0, "run: python scripts/chart_readme.py"


def test_the_readme_check_fails_on_a_stale_table(tmp_path: Path) -> None:
    tool = _readme_tool()
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    values = chart / "values.yaml"
    values.write_text(values.read_text().replace("replicaCount: 2", "replicaCount: 3"))
    assert tool.main(["--check", "--chart", str(chart)]) == 1
    assert tool.main(["--chart", str(chart)]) == 0
    assert "| `replicaCount` | integer (>= 1) | `3` |" in (chart / "README.md").read_text()
    assert tool.main(["--check", "--chart", str(chart)]) == 0


def test_every_key_in_the_readme_has_a_description() -> None:
    tool = _readme_tool()
    text = tool.table(
        (CHART / "values.yaml").read_text(), (CHART / "values.schema.json").read_text()
    )
    rows = [line.split(" | ") for line in text.splitlines()[2:]]
    assert len(rows) > 100
    undescribed = [row[0] for row in rows if not row[3].strip(" |")]
    assert undescribed == []
    keys = {row[0].strip("| `") for row in rows}
    assert {"image.tag", "networkPolicy.egress.https.ports", "startupProbe.enabled"} <= keys


def test_readme_comments_belong_to_the_key_below_them() -> None:
    tool = _readme_tool()
    sample = "\n".join(
        [
            "# a heading, not a key's",
            "",
            "# the object",
            "a:",
            "  # its key",
            "  b: 1",
            "  c:",
            "    - d: 1",
            "      # in a list item: a value, not a key",
            "      e: 2",
            "  # after the list",
            "  g: 3",
            "h: 4",
        ]
    )
    assert tool.comments(sample) == {"a": "the object", "a.b": "its key", "a.g": "after the list"}
