"""Prometheus metrics of one worker process (CONTRACT.md "Metrics and health").

Each ``Metrics`` owns its own ``CollectorRegistry``: the daemon makes one, tests make as
many as they like without colliding in prometheus-client's global registry.

Label values are always from small, known sets (actions, statuses, reasons, endpoint
names, HTTP codes, event types). Job ids and batch request ids never become label values:
one series per job would grow without bound across a fleet's lifetime.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from worker import __version__
from worker.lifecycle import KNOWN_STATUSES, TERMINAL, StoppedReason
from worker.wire.job_requests import ACTIONS

if TYPE_CHECKING:
    from worker.api.client import ApiHooks

PREFIX = "batch_worker"

# A batch job runs for minutes to hours (batch-v2-api.md §3.3, §3.4: the tutorial job took
# ~12 minutes); a refusal at create ends within seconds. Buckets from 30 s to two days.
JOB_DURATION_BUCKETS = (
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1200.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    28800.0,
    57600.0,
    86400.0,
    172800.0,
)
# One HTTP call to the API, token endpoint included: tens of milliseconds to the timeout.
API_DURATION_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Anything that is not a short upper-case word (an unexpected reason, a status the API adds
# with odd spelling) is folded into one value, so a label can never explode.
_LABEL_WORD = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
OTHER = "OTHER"
NO_REASON = ""

# A rejected message may name any action at all: only the contract's three become labels.
OUTCOMES = frozenset({"accepted", "rejected"})
IN_FLIGHT_STATUSES = ("PENDING_CREATE", *(s for s in KNOWN_STATUSES if s not in TERMINAL))


# The tenant label: a configured tenant's name, NO_TENANT for none, and every other name
# (unconfigured, or any at all without TENANTS) folded into OTHER_TENANT: producers choose
# tenant names, the configuration bounds the label.
NO_TENANT = ""
OTHER_TENANT = "other"


def _label(value: str | None, *, empty: str = OTHER) -> str:
    if value is None or value == "":
        return empty
    return value if _LABEL_WORD.match(value) else OTHER


class Metrics:
    """Every metric the worker exposes, and the few methods the rest of the code calls."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        fleet_id: str = "default",
        api_budget_per_minute: int = 300,
        tenants: Collection[str] = (),
    ) -> None:
        """``fleet_id``, ``api_budget_per_minute`` and ``tenants`` (``TENANTS``' names): the
        process's settings (their defaults are the settings' defaults)."""
        self._tenants = frozenset(tenants)
        # The `_created` series double what is scraped and no dashboard here reads them.
        # (A process-wide switch in prometheus-client; the worker exposes nothing else.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._commands = Counter(
            f"{PREFIX}_commands_total",
            "Job-request messages taken in, by action, outcome (accepted, rejected) and"
            " tenant (a configured one, empty for none, other for any other).",
            ["action", "outcome", "tenant"],
            registry=r,
        )
        self._jobs_finished = Counter(
            f"{PREFIX}_jobs_finished_total",
            "Jobs that reached a terminal status, by status and reason "
            "(stopped reason or error code; empty when none) and tenant.",
            ["status", "reason", "tenant"],
            registry=r,
        )
        self._in_flight = Gauge(
            f"{PREFIX}_jobs_in_flight",
            "Jobs not yet ended, by last known status (PENDING_CREATE: no batch request yet).",
            ["status"],
            registry=r,
        )
        self._job_duration = Histogram(
            f"{PREFIX}_job_duration_seconds",
            "Time from accepting a job to its terminal status.",
            ["status"],
            buckets=JOB_DURATION_BUCKETS,
            registry=r,
        )
        self._tiles_processed = Counter(
            f"{PREFIX}_tiles_processed_total",
            "Features the API finished (DONE rows of execution databases).",
            registry=r,
        )
        self._tiles_failed = Counter(
            f"{PREFIX}_tiles_failed_total",
            "Features the API gave up on (FATAL rows of execution databases).",
            registry=r,
        )
        self._api_requests = Counter(
            f"{PREFIX}_api_requests_total",
            "HTTP requests to the Batch V2 API and its token endpoint, by endpoint and "
            "status code (or the kind of transport failure).",
            ["endpoint", "code"],
            registry=r,
        )
        self._api_duration = Histogram(
            f"{PREFIX}_api_request_duration_seconds",
            "Duration of HTTP requests to the API, by endpoint.",
            ["endpoint"],
            buckets=API_DURATION_BUCKETS,
            registry=r,
        )
        self._budget_wait = Counter(
            f"{PREFIX}_api_budget_wait_seconds_total",
            "Seconds spent waiting for the API request budget (or a 429's Retry-After).",
            registry=r,
        )
        self._status_lag = Gauge(
            f"{PREFIX}_status_lag_seconds",
            "Age of the stalest job status this process holds.",
            registry=r,
        )
        self._budget = Gauge(
            f"{PREFIX}_api_budget_per_minute",
            "The process's API request budget (API_BUDGET_PER_MINUTE).",
            registry=r,
        )
        self._cost_share = Gauge(
            f"{PREFIX}_jobs_cost_share_max",
            "Highest share of its cost cap (max_cost_pu) spent by a job in flight "
            "(0 when no job in flight has a cap).",
            registry=r,
        )
        self._events_published = Counter(
            f"{PREFIX}_events_published_total",
            "Events the broker confirmed, by CloudEvents type.",
            ["type"],
            registry=r,
        )
        self._broker_connected = Gauge(
            f"{PREFIX}_broker_connected",
            "1 while the broker connection is up, 0 otherwise.",
            registry=r,
        )
        self._jobs_paused = Counter(
            f"{PREFIX}_jobs_paused_total",
            "Jobs paused by a stop of the API their resume_on names (they go on later),"
            " by the API's reason.",
            ["reason"],
            registry=r,
        )
        self._duplicates_stopped = Counter(
            f"{PREFIX}_duplicates_stopped_total",
            "Duplicate batch requests found carrying a job's tag and stopped.",
            registry=r,
        )
        self._follow_ups = Counter(
            f"{PREFIX}_follow_ups_total",
            "Follow-up batch requests created to re-run a request's FATAL features.",
            registry=r,
        )
        self._features_recovered = Counter(
            f"{PREFIX}_features_recovered_total",
            "Features FATAL in an earlier request of their job and DONE in a follow-up.",
            registry=r,
        )
        self._starts_withheld = Counter(
            f"{PREFIX}_starts_withheld_total",
            "Auto starts withheld: under the forecast cost guard, a lower bound of the job's "
            "cost already exceeded its max_cost_pu, and it rests at ANALYSIS_DONE.",
            registry=r,
        )
        self._outbox_pending = Gauge(
            f"{PREFIX}_outbox_pending",
            "Messages saved in the outbox and not yet confirmed by the broker.",
            registry=r,
        )
        self._outbox_parked = Gauge(
            f"{PREFIX}_outbox_parked",
            "Outbox rows the broker refused OUTBOX_MAX_ATTEMPTS times, parked: kept in "
            "PostgreSQL, not published until replayed (batch-worker outbox).",
            registry=r,
        )
        self._tile_reads = Counter(
            f"{PREFIX}_tile_reads_total",
            "Reads of tile artifacts in delivery buckets, by file (manifest, execution_db) "
            "and outcome (ok, not_modified, absent, unreadable).",
            ["file", "outcome"],
            registry=r,
        )
        self._loop_progress_age = Gauge(
            f"{PREFIX}_loop_progress_age_seconds",
            "Seconds since the loop last went round (read at scrape time); past its bound "
            "the loop is stalled and /healthz fails.",
            ["loop"],
            registry=r,
        )
        self._loop_progress_bound = Gauge(
            f"{PREFIX}_loop_progress_bound_seconds",
            "The loop's longest legitimate pause, derived from the settings.",
            ["loop"],
            registry=r,
        )
        # The fleet rides on the info series (one per process) rather than on every
        # series: dashboards and alerts join it in by (job, instance).
        info = Info(f"{PREFIX}_build", "The running worker's version and fleet.", registry=r)
        info.info({"version": __version__, "fleet": fleet_id})
        # The process's own CPU, memory, file descriptors and GC: the first things an
        # operator looks at when a pod misbehaves. (Their defaults live in the global
        # registry; this registry gets its own instances.)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        self._in_flight_lock = threading.Lock()
        self._in_flight_seen: set[str] = set()
        # Series that exist from the start, so dashboards and alerts see 0, not "no data".
        self._broker_connected.set(0)
        self._outbox_pending.set(0)
        self._outbox_parked.set(0)
        self._status_lag.set(0)
        self._cost_share.set(0)
        self._budget.set(api_budget_per_minute)
        # rate() and increase() miss a counter's first step when its series is born at 1:
        # an alert on the first OUT_OF_PU stop would never fire. The fixed reasons (and
        # plain DONE) start at 0; failures' error codes are open-ended and cannot.
        for tenant in (NO_TENANT, *sorted(self._tenants)):
            self._jobs_finished.labels(status="DONE", reason=NO_REASON, tenant=tenant)
            for stopped in StoppedReason:
                self._jobs_finished.labels(status="STOPPED", reason=stopped.value, tenant=tenant)
        for paused in ("UNHEALTHY", "OUT_OF_PU"):
            self._jobs_paused.labels(reason=paused)
        self.set_in_flight({})

    # --- intake --------------------------------------------------------------------------

    def tenant_label(self, tenant: str | None) -> str:
        if tenant is None or tenant == NO_TENANT:
            return NO_TENANT
        return tenant if tenant in self._tenants else OTHER_TENANT

    def command(self, action: str, outcome: str, tenant: str | None = None) -> None:
        """A job-request message was accepted or rejected."""
        action_label = action if action in ACTIONS else OTHER
        outcome_label = outcome if outcome in OUTCOMES else OTHER
        self._commands.labels(
            action=action_label, outcome=outcome_label, tenant=self.tenant_label(tenant)
        ).inc()

    # --- jobs ----------------------------------------------------------------------------

    def job_finished(
        self,
        status: str,
        reason: str | None,
        duration_seconds: float | None,
        tenant: str | None = None,
    ) -> None:
        """A job reached its terminal status. ``reason``: stopped reason or error code."""
        status_label = _label(status)
        self._jobs_finished.labels(
            status=status_label,
            reason=_label(reason, empty=NO_REASON),
            tenant=self.tenant_label(tenant),
        ).inc()
        if duration_seconds is not None and duration_seconds >= 0:
            self._job_duration.labels(status=status_label).observe(duration_seconds)

    def set_in_flight(self, counts: Mapping[str, int]) -> None:
        """Replace the in-flight gauge: ``counts`` maps status → jobs; others become 0."""
        wanted = dict.fromkeys(IN_FLIGHT_STATUSES, 0)
        for status, count in counts.items():
            key = _label(status)
            wanted[key] = wanted.get(key, 0) + max(0, count)
        with self._in_flight_lock:
            # Statuses seen before but absent now drop to 0 rather than vanish, so a graph
            # shows the fall instead of a line ending mid-air.
            for status in self._in_flight_seen:
                wanted.setdefault(status, 0)
            self._in_flight_seen.update(wanted)
            for status, count in wanted.items():
                self._in_flight.labels(status=status).set(count)

    def tiles(self, processed_delta: int, failed_delta: int) -> None:
        """Count newly processed / failed tiles. Negative deltas (a re-read older file,
        a restarted request) are ignored: counters only rise."""
        if processed_delta > 0:
            self._tiles_processed.inc(processed_delta)
        if failed_delta > 0:
            self._tiles_failed.inc(failed_delta)

    def duplicate_stopped(self) -> None:
        self._duplicates_stopped.inc()

    def follow_up(self, recovered_delta: int, *, created: bool) -> None:
        """A follow-up created (``created``) and features it recovered since the last save."""
        if created:
            self._follow_ups.inc()
        if recovered_delta > 0:
            self._features_recovered.inc(recovered_delta)

    def job_paused(self, reason: str) -> None:
        """A job paused on an API stop (resume by policy) instead of ending."""
        self._jobs_paused.labels(reason=_label(reason)).inc()

    def start_withheld(self) -> None:
        self._starts_withheld.inc()

    def status_lag(self, seconds: float) -> None:
        self._status_lag.set(max(0.0, seconds))

    def cost_share(self, share: float) -> None:
        """The highest ``cost_pu / max_cost_pu`` among the fleet's jobs in flight."""
        self._cost_share.set(max(0.0, share))

    # --- the API -------------------------------------------------------------------------

    def api_request(self, endpoint: str, code: str, seconds: float) -> None:
        """One HTTP request: ``endpoint`` is a route name (never a URL with an id in it)."""
        endpoint_label = _label(endpoint)
        self._api_requests.labels(endpoint=endpoint_label, code=_label(code)).inc()
        self._api_duration.labels(endpoint=endpoint_label).observe(max(0.0, seconds))

    def api_budget_wait(self, seconds: float) -> None:
        if seconds > 0:
            self._budget_wait.inc(seconds)

    def api_hooks(self) -> ApiHooks:
        """Callbacks for ``worker.api.client`` that feed the API metrics."""
        # Imported here so that importing metrics never pulls in requests and OAuth.
        from worker.api.client import ApiHooks

        return ApiHooks(on_request=self.api_request, on_budget_wait=self.api_budget_wait)

    # --- broker, outbox, events ----------------------------------------------------------

    def event_published(self, event_type: str) -> None:
        self._events_published.labels(type=_label(event_type)).inc()

    def broker_connected(self, up: bool) -> None:
        self._broker_connected.set(1 if up else 0)

    def outbox_pending(self, count: int) -> None:
        self._outbox_pending.set(max(0, count))

    def outbox_parked(self, count: int) -> None:
        self._outbox_parked.set(max(0, count))

    # --- liveness ------------------------------------------------------------------------

    def watch_loop(self, loop: str, age: Callable[[], float], bound: float) -> None:
        """Expose a loop's progress: ``age`` is read at each scrape. ``loop`` is one of the
        daemon's few fixed loop names, never free text."""
        self._loop_progress_age.labels(loop=loop).set_function(age)
        self._loop_progress_bound.labels(loop=loop).set(bound)

    # --- tile artifacts ------------------------------------------------------------------

    def tile_read(self, file: str, outcome: str) -> None:
        """One read of a tile artifact (see ``worker.daemon.tiles``)."""
        self._tile_reads.labels(file=_label(file), outcome=_label(outcome)).inc()
