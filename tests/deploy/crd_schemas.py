"""The subset of the custom resources the chart renders that kubernetes-validate has no schema
for: KEDA's ScaledObject and TriggerAuthentication (keda.sh docs: ScaledObject spec,
TriggerAuthentication secretTargetRef, the postgresql scaler) and prometheus-operator's
ServiceMonitor and PrometheusRule (its API reference). Strict like kubernetes-validate
--strict: an unknown or misspelt field fails.
"""

from __future__ import annotations

from typing import Any

_OBJ = {"type": "object"}
_STR = {"type": "string"}
_STRING_MAP = {"type": "object", "additionalProperties": _STR}
_DURATION = {"type": "string", "pattern": r"^(0|([0-9]+(ms|s|m|h|d|w|y))+)$"}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "labels": _STRING_MAP, "annotations": _STRING_MAP},
}


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


_RULE = {
    **_strict(
        {
            "alert": _STR,
            "record": _STR,
            "expr": {"type": ["string", "integer"], "minLength": 1},
            "for": _DURATION,
            "keep_firing_for": _DURATION,
            "labels": _STRING_MAP,
            "annotations": _STRING_MAP,
        },
        ["expr"],
    ),
    # A rule is an alerting rule or a recording rule, never both.
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
}

CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": _resource(
        "keda.sh/v1alpha1",
        "ScaledObject",
        _strict(
            {
                "scaleTargetRef": _strict({"name": _STR}, ["name"]),
                "minReplicaCount": {"type": "integer", "minimum": 1},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer"},
                "cooldownPeriod": {"type": "integer"},
                "advanced": _strict(
                    {
                        "horizontalPodAutoscalerConfig": _strict(
                            {"behavior": _OBJ, "name": _STR}, []
                        )
                    },
                    [],
                ),
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "type": _STR,
                            "name": _STR,
                            "metadata": _STRING_MAP,
                            "authenticationRef": _strict({"name": _STR}, ["name"]),
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
                        {"parameter": _STR, "name": _STR, "key": _STR},
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
                            "port": _STR,
                            "path": _STR,
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                        },
                        ["port"],
                    ),
                },
            },
            ["selector", "endpoints"],
        ),
    ),
    "PrometheusRule": _resource(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _strict(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "query_offset": _DURATION,
                            "limit": {"type": "integer", "minimum": 0},
                            "labels": _STRING_MAP,
                            "partial_response_strategy": {"enum": ["warn", "abort", ""]},
                            "rules": {"type": "array", "items": _RULE},
                        },
                        ["name", "rules"],
                    ),
                }
            },
            ["groups"],
        ),
    ),
}
