"""One simulated batch request: its timeline and the status machine of batch-v2-api.md §3.

Nothing ticks. An action writes a *timeline* (the statuses to come, each with the wall
clock time it will show); every read evaluates the timeline at ``now``. Status lag after
an action (§3.3) is the gap between the action and the first phase it schedules; the
service already "knows" the new status, so legality checks look at the status the last
action leads to, not at the lagging one a GET shows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.simulator.config import SimulatorConfig
from worker.simulator.grids import Feature

CREATED = "CREATED"
ANALYSING = "ANALYSING"
ANALYSIS_DONE = "ANALYSIS_DONE"
PROCESSING = "PROCESSING"
DONE = "DONE"
FAILED = "FAILED"
STOPPED = "STOPPED"
FINAL = frozenset({DONE, FAILED})

MIN_COST_PU = 100.0  # §14: the minimum cost of a batch request


class IllegalAction(Exception):
    """The request's status forbids the action; ``str(exc)`` is the API's message."""


class Conflict(Exception):
    """``PUT`` on a request that is processing or waiting to be processed (§2, 409)."""


@dataclass
class Phase:
    """A status that shows from ``at`` (epoch seconds) until the next phase."""

    at: float
    status: str
    # Completion at ``at``; while PROCESSING it rises linearly to ``progress_to`` at ``until``.
    progress: float = 0.0
    progress_to: float = 0.0
    until: float = 0.0
    reason: str | None = None
    error: str | None = None
    billed: float = 0.0  # PUs earlier runs billed (restart_mode "reprocess"), on top
    # When a GET or list page first answered this status (epoch seconds), None before:
    # a status held at the barrier shows later than ``at``, and the bench measures from here.
    shown: float | None = None
    # When the barrier that held this status back was lifted (None: never held).
    released: float | None = None


@dataclass
class Outcome:
    """What will go wrong with this request, decided at create (markers or dice)."""

    fail_analysis: bool = False
    stop_reason: str | None = None  # OUT_OF_PU | UNHEALTHY, ``stops`` times
    # How far into a run the stop happens: the percentage of what the run has left to do
    # (from 0 %: the completion at the stop).
    stop_at: float = 50.0
    stops: int = 1  # system stops still to come; each restart after one runs on
    fatal: int | None = None  # exact number of FATAL features, else rate
    fatal_rate: float = 0.0
    fatal_attempts: int = 1  # attempts a feature picked by `fatal` stays FATAL
    features: int | None = None  # forced feature count
    cost: float | None = None  # forced total cost (PU), accrued with progress like any other


@dataclass
class View:
    """The request as a GET at one instant sees it."""

    status: str
    completion: float
    cost: float
    last_updated: float
    reason: str | None
    error: str | None


@dataclass
class SimJob:
    id: str
    request: dict[str, Any]
    created: float
    account_id: str
    project_id: str
    outcome: Outcome = field(default_factory=Outcome)
    user_action: str = "NONE"
    user_action_updated: float | None = None
    phases: list[Phase] = field(default_factory=list)
    # Settled once analysis has been scheduled.
    features: list[Feature] | None = None
    feature_count: int = 0
    fatal_indices: frozenset[int] = frozenset()
    analysis_error: str | None = None
    analysis_end: float | None = None
    pu_per_feature: float = 1.0
    stopped_at: float | None = None
    # PUs billed by earlier runs that a restart processes again (``restart_mode``
    # "reprocess"): the phases scheduled since carry them, costPU grows on from there.
    billed_pu: float = 0.0
    # When the last action's first phase shows (statuses before it are stale).
    pending_from: float = 0.0
    # The request's JSON, made once: list pages repeat it many times a second.
    request_json: str | None = field(default=None, repr=False, compare=False)
    # While set, time stands still just before it: the status does not move past an
    # artifact the service must upload first (the manifest before ANALYSIS_DONE, §3.2).
    barrier: float | None = None

    def hold(self, barrier: float | None, now: float) -> None:
        """Move the barrier (None lifts it); the held phases it lets show record ``now``."""
        if self.barrier is not None:
            for phase in self.phases:
                if self.barrier <= phase.at <= now and (barrier is None or phase.at < barrier):
                    phase.released = now
        self.barrier = barrier

    # --- reading -----------------------------------------------------------------------
    def view(self, now: float, *, answered: bool = False) -> View:
        """``answered``: a reader gets this view (records when the phase first showed)."""
        shown_at, now = now, self._clamp(now)
        phase = self._phase_at(now)
        if answered and phase is not None and phase.shown is None:
            phase.shown = shown_at
        if phase is None:
            return View(CREATED, 0.0, 0.0, self.user_action_updated or self.created, None, None)
        completion = phase.progress
        last_updated = phase.at
        if phase.status == PROCESSING and phase.until > phase.at:
            share = min(1.0, (now - phase.at) / (phase.until - phase.at))
            completion = phase.progress + (phase.progress_to - phase.progress) * share
            last_updated = now
        elif phase.status == DONE:
            completion = 100.0
        completion = round(completion, 2)
        run_cost = (
            0.0
            if phase.status in {ANALYSING, ANALYSIS_DONE, FAILED} and completion == 0
            else (self._total_cost() * completion / 100.0)
        )
        cost = phase.billed + run_cost
        return View(
            phase.status, completion, round(cost, 3), last_updated, phase.reason, phase.error
        )

    def status(self, now: float) -> str:
        phase = self._phase_at(self._clamp(now))
        return CREATED if phase is None else phase.status

    def settled_status(self, now: float) -> str:
        """The status the service acts on: what the last action leads to, without lag."""
        return self.status(max(now, self.pending_from))

    def _clamp(self, now: float) -> float:
        return now if self.barrier is None or now < self.barrier else self.barrier - 1e-6

    def _phase_at(self, now: float) -> Phase | None:
        current = None
        for phase in self.phases:
            if phase.at > now:
                break
            current = phase
        return current

    def done_at(self) -> float | None:
        """When the DONE phase shows, if the timeline leads there."""
        return next((p.at for p in self.phases if p.status == DONE), None)

    def next_change(self, now: float) -> float | None:
        """The next instant a phase begins after ``now``."""
        return next((p.at for p in self.phases if p.at > now), None)

    def _total_cost(self) -> float:
        if self.outcome.cost is not None:
            return self.outcome.cost
        return max(MIN_COST_PU, self.feature_count * self.pu_per_feature)

    def completion_at(self, now: float) -> float:
        return self.view(now).completion

    def description(self) -> str:
        value = self.request.get("description")
        return value if isinstance(value, str) else ""

    # --- actions (§3.2) ------------------------------------------------------------------
    def analyse(self, now: float, config: SimulatorConfig) -> None:
        status = self.settled_status(now)
        if status != CREATED:
            raise IllegalAction(f"Cannot analyse a request with status {status}.")
        self._act("ANALYSE", now)
        self._schedule_analysis(now + config.scaled(config.status_lag), config)

    def start(self, now: float, config: SimulatorConfig) -> None:
        status = self.settled_status(now)
        lag = config.scaled(config.status_lag)
        if status == CREATED:
            self._act("START", now)
            end = self._schedule_analysis(now + lag, config)
            if self.analysis_error is None:
                self._schedule_processing(end + lag, 0.0, config)
        elif status == ANALYSING and self.user_action == "ANALYSE":
            # Analysis keeps running and rolls into processing (§3.2, eo-grow starts here too).
            self._act("START", now)
            end = self.analysis_end or now
            self._truncate(end + 1e-6)
            if self.analysis_error is None:
                self._schedule_processing(end + lag, 0.0, config)
        elif status == ANALYSIS_DONE and self.user_action != "START":
            self._act("START", now)
            self._truncate(now)
            self._schedule_processing(now + lag, 0.0, config)
        elif status == STOPPED:
            blocked_until = (self.stopped_at or now) + config.scaled(config.restart_block)
            if now < blocked_until:
                raise IllegalAction(
                    "A stopped request cannot be restarted within 30 minutes of the stop."
                )
            completion = self.completion_at(now)
            if config.restart_mode == "reprocess":
                # Everything runs again from the start, and is billed again (§3.2 says
                # only that processed features were charged at the stop).
                self.billed_pu = self.view(now).cost
                completion = 0.0
            self._act("START", now)
            self.phases.append(
                Phase(now + lag, ANALYSIS_DONE, progress=completion, billed=self.billed_pu)
            )
            self._schedule_processing(now + 2 * lag, completion, config)
            self.pending_from = now + lag
        else:
            raise IllegalAction(f"Cannot start a request with status {status}.")

    def stop(self, now: float, config: SimulatorConfig) -> None:
        status = self.settled_status(now)
        lag = config.scaled(config.status_lag)
        if status == ANALYSING:
            # §3.2: the analysis still completes; the request then rests STOPPED.
            end = self.analysis_end or now
            self._act("STOP", now)
            if self.analysis_error is not None:
                return  # it fails anyway; FAILED is final
            self._truncate(end)
            self._stop_at(end, 0.0, "USER_ACTION")
        elif status in {ANALYSIS_DONE, PROCESSING}:
            at = max(now + lag, self.pending_from)
            completion = self.completion_at(at)
            self._act("STOP", now)
            self._truncate(at)
            self._stop_at(at, completion, "USER_ACTION")
        else:
            raise IllegalAction(f"Cannot stop a request with status {status}.")
        self.pending_from = self.phases[-1].at

    def update_description(self, now: float, description: str) -> None:
        status = self.settled_status(now)
        waiting = self.user_action == "START" and status in {ANALYSING, ANALYSIS_DONE}
        if status == PROCESSING or waiting:
            raise Conflict(
                f"Cannot update a request with status {status} while it is"
                " processing or waiting to be processed."
            )
        self.request["description"] = description
        self.request_json = None

    # --- timeline building -------------------------------------------------------------
    def _act(self, action: str, now: float) -> None:
        self.user_action = action
        self.user_action_updated = now

    def _truncate(self, at: float) -> None:
        self.phases = [p for p in self.phases if p.at < at]

    def _stop_at(self, at: float, completion: float, reason: str) -> None:
        self.phases.append(
            Phase(at, STOPPED, progress=completion, reason=reason, billed=self.billed_pu)
        )
        self.stopped_at = at

    def _schedule_analysis(self, begin: float, config: SimulatorConfig) -> float:
        duration = config.scaled(
            config.analysis_base + config.analysis_per_feature * self.feature_count
        )
        end = begin + duration
        self.phases.append(Phase(begin, ANALYSING))
        self.analysis_end = end
        self.pending_from = begin
        if self.analysis_error is not None:
            self.phases.append(Phase(end, FAILED, error=self.analysis_error))
        else:
            self.phases.append(Phase(end, ANALYSIS_DONE))
        return end

    def _schedule_processing(
        self, begin: float, completion: float, config: SimulatorConfig
    ) -> None:
        total = config.scaled(
            config.processing_base + config.processing_per_feature * self.feature_count
        )
        remaining = total * (100.0 - completion) / 100.0
        outcome = self.outcome
        if outcome.stop_reason is not None and outcome.stops > 0:
            stop_at = round(completion + (100.0 - completion) * outcome.stop_at / 100.0, 2)
            until = begin + total * (stop_at - completion) / 100.0
            self.phases.append(
                Phase(
                    begin,
                    PROCESSING,
                    progress=completion,
                    progress_to=stop_at,
                    until=until,
                    billed=self.billed_pu,
                )
            )
            self._stop_at(until, stop_at, outcome.stop_reason)
            outcome.stops -= 1  # the restart after the last one runs to the end
            return
        until = begin + remaining
        self.phases.append(
            Phase(
                begin,
                PROCESSING,
                progress=completion,
                progress_to=100.0,
                until=until,
                billed=self.billed_pu,
            )
        )
        # §3.3: completion shows 100 for a while before the status turns DONE.
        done_at = until + config.scaled(config.done_lag)
        self.phases.append(Phase(done_at, DONE, progress=100.0, billed=self.billed_pu))

    # --- execution database rows (§8.3) ---------------------------------------------------
    def feature_rows(self, now: float) -> list[tuple[int, str, str, str | None, bool]]:
        """(id, name, status, error, delivered) of each feature at ``now``."""
        features = self.features or []
        view = self.view(now)
        processed = math.floor(len(features) * view.completion / 100.0 + 1e-9)
        rows: list[tuple[int, str, str, str | None, bool]] = []
        for index, feature in enumerate(features):
            if index >= processed:
                rows.append((index + 1, feature.name, "PENDING", None, False))
            elif index in self.fatal_indices:
                rows.append(
                    (
                        index + 1,
                        feature.name,
                        "FATAL",
                        "Processing failed 3 times and will not be retried.",
                        False,
                    )
                )
            else:
                rows.append((index + 1, feature.name, "DONE", None, True))
        return rows

    # --- the wire format (§4) -----------------------------------------------------------------
    def to_api(self, now: float) -> dict[str, Any]:
        body = self._fields(now)
        return {"id": self.id, "request": self.request, **body}

    def to_api_json(self, now: float) -> str:
        """``to_api`` as JSON, reusing the request's serialisation."""
        if self.request_json is None:
            self.request_json = json.dumps(self.request)
        rest = json.dumps(self._fields(now))
        return f'{{"id": "{self.id}", "request": {self.request_json}, {rest[1:]}'

    def _fields(self, now: float) -> dict[str, Any]:
        view = self.view(now, answered=True)
        body: dict[str, Any] = {
            "domainAccountId": self.account_id,
            "projectId": self.project_id,
            "status": view.status,
            "userAction": self.user_action,
            "created": iso(self.created),
            "completionPercentage": view.completion,
            "lastUpdated": iso(view.last_updated),
            "costPU": view.cost,
        }
        if self.user_action_updated is not None:
            body["userActionUpdated"] = iso(self.user_action_updated)
        if view.error is not None:
            body["error"] = view.error
        if view.status == STOPPED and view.reason is not None:
            body["stoppedStatusReason"] = view.reason
        return body


def iso(epoch: float) -> str:
    """``2025-08-14T14:30:46.716642Z``: microseconds and ``Z``, as the API writes (§4)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
