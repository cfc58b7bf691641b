"""worker.metrics: names and labels of the contract, and what each method moves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import JOB_DURATION_BUCKETS, Metrics

# CONTRACT.md "Metrics and health": name → (type, labels).
CONTRACT = {
    "batch_worker_commands_total": ("counter", {"action", "outcome", "tenant"}),
    "batch_worker_jobs_finished_total": ("counter", {"status", "reason", "tenant"}),
    "batch_worker_jobs_in_flight": ("gauge", {"status"}),
    "batch_worker_job_duration_seconds": ("histogram", {"status"}),
    "batch_worker_tiles_processed_total": ("counter", set()),
    "batch_worker_tiles_failed_total": ("counter", set()),
    "batch_worker_api_requests_total": ("counter", {"endpoint", "code"}),
    "batch_worker_api_request_duration_seconds": ("histogram", {"endpoint"}),
    "batch_worker_api_budget_wait_seconds_total": ("counter", set()),
    "batch_worker_status_lag_seconds": ("gauge", set()),
    "batch_worker_events_published_total": ("counter", {"type"}),
    "batch_worker_broker_connected": ("gauge", set()),
    "batch_worker_duplicates_stopped_total": ("counter", set()),
    "batch_worker_follow_ups_total": ("counter", set()),
    "batch_worker_features_recovered_total": ("counter", set()),
    "batch_worker_jobs_paused_total": ("counter", {"reason"}),
    "batch_worker_starts_withheld_total": ("counter", set()),
}


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


def exercise(metrics: Metrics) -> None:
    """Touch every labelled metric once, so every family has samples to look at."""
    metrics.command("submit", "accepted")
    metrics.job_finished("DONE", None, 600.0)
    metrics.api_request("get", "200", 0.1)
    metrics.event_published("batchworker.job.status")
    metrics.tile_read("manifest", "ok")
    metrics.watch_loop("engine", lambda: 1.5, 60.0)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def families(metrics: Metrics) -> dict[str, tuple[str, set[str]]]:
    """Exposition-format view: family name (as scraped) → (type, label names)."""
    text = generate_latest(metrics.registry).decode()
    found: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels: set[str] = set()
        for s in family.samples:
            labels |= set(s.labels) - {"le"}
        found[name] = (family.type, labels)
    return found


def test_every_contract_metric_is_exposed_with_its_type_and_labels(metrics: Metrics) -> None:
    exercise(metrics)
    exposed = families(metrics)
    for name, (kind, labels) in CONTRACT.items():
        assert name in exposed, name
        assert exposed[name] == (kind, labels), name


def test_every_worker_metric_carries_the_prefix(metrics: Metrics) -> None:
    exercise(metrics)
    names = families(metrics)
    # The process/platform/GC collectors keep their standard names (every dashboard knows them).
    standard = re.compile(r"^(process_|python_)")
    assert all(n.startswith("batch_worker_") or standard.match(n) for n in names), names
    assert "batch_worker_outbox_pending" in names
    assert "process_resident_memory_bytes" in names


def test_fresh_instances_do_not_share_state() -> None:
    first, second = Metrics(), Metrics()
    first.duplicate_stopped()
    assert sample(first, "batch_worker_duplicates_stopped_total") == 1
    assert sample(second, "batch_worker_duplicates_stopped_total") == 0


def test_series_exist_before_anything_happens(metrics: Metrics) -> None:
    # Alerts such as "broker down" must see a 0, not an absent series.
    assert sample(metrics, "batch_worker_broker_connected") == 0
    assert sample(metrics, "batch_worker_outbox_pending") == 0
    assert sample(metrics, "batch_worker_outbox_parked") == 0
    assert sample(metrics, "batch_worker_jobs_in_flight", status="PROCESSING") == 0
    assert sample(metrics, "batch_worker_jobs_in_flight", status="PENDING_CREATE") == 0
    # Counters alerts take the increase() of: born at 0, so their first step is seen.
    finished = "batch_worker_jobs_finished_total"
    assert sample(metrics, finished, status="STOPPED", reason="OUT_OF_PU", tenant="") == 0
    assert sample(metrics, finished, status="STOPPED", reason="COST_LIMIT", tenant="") == 0
    assert sample(metrics, finished, status="STOPPED", reason="COST_FORECAST", tenant="") == 0
    assert sample(metrics, "batch_worker_starts_withheld_total") == 0
    assert sample(metrics, finished, status="DONE", reason="", tenant="") == 0


def test_commands_fold_unknown_actions(metrics: Metrics) -> None:
    metrics.command("submit", "accepted")
    metrics.command("submit", "accepted")
    metrics.command("drop-table", "rejected")
    assert (
        sample(
            metrics, "batch_worker_commands_total", action="submit", outcome="accepted", tenant=""
        )
        == 2
    )
    assert (
        sample(
            metrics, "batch_worker_commands_total", action="OTHER", outcome="rejected", tenant=""
        )
        == 1
    )
    assert (
        sample(
            metrics,
            "batch_worker_commands_total",
            action="drop-table",
            outcome="rejected",
            tenant="",
        )
        is None
    )


def test_job_finished_counts_and_observes_duration(metrics: Metrics) -> None:
    metrics.job_finished("STOPPED", "DEADLINE", 7200.0)
    metrics.job_finished("DONE", None, 900.0)
    metrics.job_finished("FAILED", "UPSTREAM_NOT_FOUND", None)
    name = "batch_worker_jobs_finished_total"
    assert sample(metrics, name, status="STOPPED", reason="DEADLINE", tenant="") == 1
    assert sample(metrics, name, status="DONE", reason="", tenant="") == 1
    assert sample(metrics, name, status="FAILED", reason="UPSTREAM_NOT_FOUND", tenant="") == 1
    hist = "batch_worker_job_duration_seconds"
    assert sample(metrics, hist + "_count", status="STOPPED") == 1
    assert sample(metrics, hist + "_sum", status="DONE") == 900.0
    assert sample(metrics, hist + "_bucket", status="DONE", le="600.0") == 0
    assert sample(metrics, hist + "_bucket", status="DONE", le="1200.0") == 1
    # No duration given: counted as finished, not observed.
    assert sample(metrics, hist + "_count", status="FAILED") is None


def test_job_duration_buckets_span_minutes_to_hours() -> None:
    assert min(JOB_DURATION_BUCKETS) <= 60
    assert max(JOB_DURATION_BUCKETS) >= 24 * 3600
    assert list(JOB_DURATION_BUCKETS) == sorted(JOB_DURATION_BUCKETS)


def test_free_text_reasons_cannot_explode_labels(metrics: Metrics) -> None:
    metrics.job_finished("FAILED", "the service said: <html> nope", 1.0)
    assert (
        sample(
            metrics, "batch_worker_jobs_finished_total", status="FAILED", reason="OTHER", tenant=""
        )
        == 1
    )


def test_set_in_flight_replaces_and_zeroes_the_rest(metrics: Metrics) -> None:
    metrics.set_in_flight({"PROCESSING": 7, "ANALYSING": 2, "SOMETHING_NEW": 1})
    assert sample(metrics, "batch_worker_jobs_in_flight", status="PROCESSING") == 7
    assert sample(metrics, "batch_worker_jobs_in_flight", status="SOMETHING_NEW") == 1
    metrics.set_in_flight({"PROCESSING": 3})
    assert sample(metrics, "batch_worker_jobs_in_flight", status="PROCESSING") == 3
    assert sample(metrics, "batch_worker_jobs_in_flight", status="ANALYSING") == 0
    assert sample(metrics, "batch_worker_jobs_in_flight", status="SOMETHING_NEW") == 0


def test_tiles_ignore_negative_deltas(metrics: Metrics) -> None:
    metrics.tiles(5, 1)
    metrics.tiles(-3, 0)
    metrics.tiles(2, -1)
    assert sample(metrics, "batch_worker_tiles_processed_total") == 7
    assert sample(metrics, "batch_worker_tiles_failed_total") == 1


def test_api_request_and_budget_wait(metrics: Metrics) -> None:
    metrics.api_request("list", "200", 0.2)
    metrics.api_request("list", "429", 0.05)
    metrics.api_budget_wait(1.5)
    metrics.api_budget_wait(0.0)
    metrics.api_budget_wait(-2.0)
    name = "batch_worker_api_requests_total"
    assert sample(metrics, name, endpoint="list", code="200") == 1
    assert sample(metrics, name, endpoint="list", code="429") == 1
    duration = "batch_worker_api_request_duration_seconds_count"
    assert sample(metrics, duration, endpoint="list") == 2
    assert sample(metrics, "batch_worker_api_budget_wait_seconds_total") == 1.5


def test_gauges_and_simple_counters(metrics: Metrics) -> None:
    metrics.status_lag(42.5)
    metrics.broker_connected(True)
    metrics.outbox_pending(12)
    metrics.event_published("batchworker.job.progress")
    metrics.event_published("batchworker.job.progress")
    metrics.duplicate_stopped()
    assert sample(metrics, "batch_worker_jobs_paused_total", reason="OUT_OF_PU") == 0
    metrics.job_paused("UNHEALTHY")
    assert sample(metrics, "batch_worker_jobs_paused_total", reason="UNHEALTHY") == 1
    assert sample(metrics, "batch_worker_status_lag_seconds") == 42.5
    assert sample(metrics, "batch_worker_broker_connected") == 1
    assert sample(metrics, "batch_worker_outbox_pending") == 12
    metrics.outbox_parked(3)
    assert sample(metrics, "batch_worker_outbox_parked") == 3
    assert (
        sample(metrics, "batch_worker_events_published_total", type="batchworker.job.progress") == 2
    )
    assert sample(metrics, "batch_worker_duplicates_stopped_total") == 1
    metrics.broker_connected(False)
    metrics.status_lag(-1.0)
    assert sample(metrics, "batch_worker_broker_connected") == 0
    assert sample(metrics, "batch_worker_status_lag_seconds") == 0


def test_watched_loop_age_is_read_at_scrape_time(metrics: Metrics) -> None:
    age = [3.0]
    metrics.watch_loop("poller", lambda: age[0], 213.0)
    assert sample(metrics, "batch_worker_loop_progress_age_seconds", loop="poller") == 3.0
    age[0] = 7.5
    assert sample(metrics, "batch_worker_loop_progress_age_seconds", loop="poller") == 7.5
    assert sample(metrics, "batch_worker_loop_progress_bound_seconds", loop="poller") == 213.0


def test_build_info_names_the_version_and_the_fleet(metrics: Metrics) -> None:
    from worker import __version__

    assert sample(metrics, "batch_worker_build_info", version=__version__, fleet="default") == 1
    other = Metrics(fleet_id="eu-north")
    assert sample(other, "batch_worker_build_info", version=__version__, fleet="eu-north") == 1


def test_budget_gauge_holds_the_setting_and_defaults_match_the_settings() -> None:
    from worker.settings import Settings

    assert sample(Metrics(api_budget_per_minute=120), "batch_worker_api_budget_per_minute") == 120
    defaults = Settings.model_fields
    assert sample(Metrics(), "batch_worker_api_budget_per_minute") == (
        defaults["api_budget_per_minute"].default
    )
    assert defaults["fleet_id"].default == "default"


def test_cost_share_is_a_gauge_that_never_goes_negative(metrics: Metrics) -> None:
    assert sample(metrics, "batch_worker_jobs_cost_share_max") == 0  # exists from the start
    metrics.cost_share(0.85)
    assert sample(metrics, "batch_worker_jobs_cost_share_max") == 0.85
    metrics.cost_share(-1.0)
    assert sample(metrics, "batch_worker_jobs_cost_share_max") == 0


def test_api_hooks_feed_the_api_metrics(metrics: Metrics) -> None:
    hooks = metrics.api_hooks()
    assert hooks.on_request is not None
    assert hooks.on_budget_wait is not None
    hooks.on_request("create", "201", 0.3)
    hooks.on_budget_wait(2.0)
    assert sample(metrics, "batch_worker_api_requests_total", endpoint="create", code="201") == 1
    assert sample(metrics, "batch_worker_api_budget_wait_seconds_total") == 2.0


# --- the dashboard and the alert rules (config/) --------------------------------------

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "batch-worker-dashboard.json"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yaml"
METRIC_NAME = re.compile(r"\b((?:batch_worker|process|python)_[a-z_]+)\b")
RABBITMQ_NAME = re.compile(r"\b(rabbitmq_[a-z_]+)\b")


# Label lists (by, on, group_left, ...), selectors and label_values' label argument hold label
# names, which look like metric names (rabbitmq_cluster).
_LABEL_PARTS = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)|\{[^}]*\}|,\s*\w+\)\s*$"
)


def metric_names(query: str, pattern: re.Pattern[str] = METRIC_NAME) -> set[str]:
    return set(pattern.findall(_LABEL_PARTS.sub(" ", query)))


def rabbitmq_metric_names() -> set[str]:
    """What RabbitMQ's Prometheus plugin serves (tests/rabbitmq_prometheus_metrics.txt)."""
    lines = (Path(__file__).parent / "rabbitmq_prometheus_metrics.txt").read_text().splitlines()
    return {line for line in lines if line and not line.startswith("#")}


def exposed_sample_names() -> set[str]:
    metrics = Metrics()
    exercise(metrics)
    text = generate_latest(metrics.registry).decode()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    return queries


def test_dashboard_queries_only_metrics_that_exist() -> None:
    exposed = exposed_sample_names()
    referenced = {name for query in dashboard_queries() for name in metric_names(query)}
    assert referenced
    assert referenced <= exposed, referenced - exposed
    rabbitmq = {n for query in dashboard_queries() for n in metric_names(query, RABBITMQ_NAME)}
    assert rabbitmq
    assert rabbitmq <= rabbitmq_metric_names(), rabbitmq - rabbitmq_metric_names()


def test_every_signal_an_alert_reads_has_a_panel() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"]
    alerting = " ".join(rule["expr"] for group in rules for rule in group["rules"])
    read = metric_names(alerting) | metric_names(alerting, RABBITMQ_NAME)
    shown = {
        name
        for query in dashboard_queries()
        for name in metric_names(query) | metric_names(query, RABBITMQ_NAME)
    }
    assert read <= shown, read - shown


def test_the_fleet_selector_narrows_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    # The fleet comes from the one series that carries it; the workers follow the fleet.
    assert variables["fleet"]["definition"] == "label_values(batch_worker_build_info, fleet)"
    assert 'batch_worker_build_info{fleet=~"$fleet"}' in variables["instance"]["definition"]
    # "All" must mean the fleet's workers, not every worker (a custom allValue of .* would).
    assert "allValue" not in variables["instance"]
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            if METRIC_NAME.search(expr):
                assert 'instance=~"$instance"' in expr, panel["title"]
            if RABBITMQ_NAME.search(expr):
                assert '$rabbitmq_cluster"' in expr, panel["title"]
            assert not re.search(r"\$job\b", expr), panel["title"]  # the old selector


def test_every_worker_metric_is_on_the_dashboard() -> None:
    referenced = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query)}
    base = {re.sub(r"_(bucket|sum|count)$", "", name) for name in referenced}
    ours = {name for name in families(Metrics()) if name.startswith("batch_worker_")}
    assert set(CONTRACT) <= ours
    assert ours <= base, ours - base


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36  # Grafana 9.0 on; 10 and 11 migrate it on load
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_follow_ups_and_recovered_features_only_rise(metrics: Metrics) -> None:
    metrics.follow_up(0, created=True)
    metrics.follow_up(3, created=False)
    metrics.follow_up(-2, created=False)  # an older copy of the execution database
    assert sample(metrics, "batch_worker_follow_ups_total") == 1
    assert sample(metrics, "batch_worker_features_recovered_total") == 3


def test_the_tenant_label_is_bounded_by_the_configured_tenants() -> None:
    metrics = Metrics(registry=CollectorRegistry(), tenants=["team-a"])
    metrics.command("submit", "accepted", "team-a")
    metrics.command("submit", "accepted", "mallory-1")
    metrics.command("submit", "accepted", "mallory-2")
    metrics.command("cancel", "rejected", None)
    metrics.job_finished("DONE", None, 1.0, "mallory-3")
    name = "batch_worker_commands_total"
    assert sample(metrics, name, action="submit", outcome="accepted", tenant="team-a") == 1
    assert sample(metrics, name, action="submit", outcome="accepted", tenant="other") == 2
    assert sample(metrics, name, action="cancel", outcome="rejected", tenant="") == 1
    assert sample(metrics, name, action="submit", outcome="accepted", tenant="mallory-1") is None
    finished = "batch_worker_jobs_finished_total"
    assert sample(metrics, finished, status="DONE", reason="", tenant="other") == 1
    # A configured tenant's alerting series exist before its first job ends.
    assert sample(metrics, finished, status="STOPPED", reason="OUT_OF_PU", tenant="team-a") == 0
