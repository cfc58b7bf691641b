"""config/prometheus/alerts.yaml: promtool's own checks and unit tests, and the rules' hygiene.

``promtool`` comes from Debian's ``prometheus`` package (``make test`` installs it: the
Makefile's ``tools`` target). Without it the promtool tests skip on a developer's machine
and fail under CI (``CI`` set).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_metrics import (
    ALERTS,
    RABBITMQ_NAME,
    dashboard_queries,
    exposed_sample_names,
    metric_names,
    rabbitmq_metric_names,
)

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "config" / "prometheus"
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yaml"))
OPERATIONS = ROOT / "docs" / "operations.md"
IN_CI = bool(os.environ.get("CI"))


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        message = "promtool is not installed (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(message + "; CI must provide it: the Makefile's tools target")
        pytest.skip(message)
    return subprocess.run(
        [binary, *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    assert RULE_TESTS
    result = promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    fired: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    fired.add(check["alertname"])
    assert {rule["alert"] for rule in alert_rules()} <= fired


def test_alert_rules_query_only_metrics_that_exist() -> None:
    rules = alert_rules()
    referenced = {name for rule in rules for name in metric_names(rule["expr"])}
    assert referenced <= exposed_sample_names(), referenced - exposed_sample_names()
    rabbitmq = {name for rule in rules for name in metric_names(rule["expr"], RABBITMQ_NAME)}
    assert rabbitmq, "the queue rules read RabbitMQ's own metrics"
    assert rabbitmq <= rabbitmq_metric_names(), rabbitmq - rabbitmq_metric_names()


def test_alert_rules_cover_what_operators_page_on() -> None:
    rules = alert_rules()
    expressions = " ".join(rule["expr"] for rule in rules)
    for needed in (
        "absent(batch_worker_build_info)",
        'batch_worker_jobs_finished_total{status="FAILED"}',
        'reason="OUT_OF_PU"',
        "batch_worker_jobs_cost_share_max",
        "batch_worker_api_budget_per_minute",
        'rabbitmq_queue_messages{queue="batch.jobs.dlq"}',
        'rabbitmq_queue_messages_ready{queue="batch.jobs"}',
        "batch_worker_broker_connected",
        "batch_worker_status_lag_seconds",
        "batch_worker_outbox_pending",
        "batch_worker_duplicates_stopped_total",
        'code=~"5.."',
        'code="429"',
    ):
        assert needed in expressions, needed
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", "0s"))), rule["alert"]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_alert_says_what_happened_and_where_its_runbook_is() -> None:
    anchors = _anchors(OPERATIONS.read_text())
    for rule in alert_rules():
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert len(annotations["description"]) > 80, rule["alert"]
        page, _, anchor = annotations["runbook"].partition("#")
        assert page == "docs/operations.md", rule["alert"]
        assert anchor == rule["alert"].lower(), rule["alert"]
        assert anchor in anchors, f"docs/operations.md has no section {rule['alert']}"


# Grafana's variables, as a Prometheus sees them once Grafana has substituted them.
_GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "6h",
    "$instance": "(10\\\\.0\\\\.0\\\\.1:9400|10\\\\.0\\\\.0\\\\.2:9400)",
    "$fleet": "eu",
    "$rabbitmq_cluster": ".*",
    "$jobs_queue": "batch.jobs",
    "$unrouted_queue": "batch.events.unrouted",
    "$dlq": "batch.jobs.dlq",
}


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel's query, as a recording rule (it has no query checker)."""
    rules = []
    for number, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        expr = query
        for name in sorted(_GRAFANA_VARIABLES, key=len, reverse=True):
            expr = expr.replace(name, _GRAFANA_VARIABLES[name])
        assert "$" not in expr, query
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
