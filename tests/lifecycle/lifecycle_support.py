"""Builders shared by the lifecycle tests: a job, a clock, snapshots, and a driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from worker.lifecycle import (
    CostGuard,
    Echo,
    JobState,
    Observation,
    Policy,
    TaskSnapshot,
    Transition,
    new_job,
    step,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
RID = "6aa8765a-e9eb-4dd0-a567-b86cfdb840e0"
POLICY = Policy()


def job(
    *,
    auto_start: bool = True,
    adopt_id: str | None = None,
    deadline: datetime | None = None,
    max_cost_pu: float | None = None,
    request: dict[str, Any] | None = None,
    cost_guard: CostGuard = "spent",
) -> JobState:
    payload = None if adopt_id else (request or {"description": "Max NDVI over Corsica"})
    return new_job(
        job_id="corsica-ndvi",
        fleet_id="default",
        request=payload,
        adopt_id=adopt_id,
        request_hash="h",
        auto_start=auto_start,
        deadline=deadline,
        max_cost_pu=max_cost_pu,
        echo=Echo(message_id="m1"),
        now=T0,
        cost_guard=cost_guard,
    )


def task(status: str, **fields: Any) -> TaskSnapshot:
    fields.setdefault("id", RID)
    fields.setdefault("created", T0)
    return TaskSnapshot(status=status, **fields)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


@dataclass
class Run:
    """Steps one job through observations, keeping every transition for assertions."""

    state: JobState
    policy: Policy = POLICY
    transitions: list[Transition] = field(default_factory=list)

    def feed(self, observation: Observation, now: datetime) -> Transition:
        transition = step(self.state, observation, now, self.policy)
        self.transitions.append(transition)
        self.state = transition.state
        return transition

    @property
    def emitted(self) -> list[tuple[str, str | None]]:
        """(kind, published status) of every event so far."""
        return [(e.kind, t.state.status) for t in self.transitions for e in t.emits]
