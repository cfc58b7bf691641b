"""The shapes of resume by policy: the rules a job request gives, and a job's pause.

Apart from ``resume.py`` (the decisions) because the job's state holds them.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

UNHEALTHY = "UNHEALTHY"
OUT_OF_PU = "OUT_OF_PU"
PAUSED = "PAUSED"  # the status a paused job publishes (the worker's, not the API's)


class _Rule(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UnhealthyRule(_Rule):
    attempts: int = Field(
        ge=1, le=100, description="START again at most this many times after UNHEALTHY stops."
    )


class OutOfPuRule(_Rule):
    until: AwareDatetime | None = Field(
        default=None,
        description="RFC 3339: START again then (the PU reset) unless a resume comes first;"
        " null: wait for an operator's resume.",
    )


class ResumeOn(_Rule):
    """Which stops of the API pause the job instead of ending it (the job request's
    ``resume_on``, or the fleet's ``RESUME_ON``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", title="ResumeOn")
    UNHEALTHY: UnhealthyRule | None = None
    OUT_OF_PU: OutOfPuRule | None = None


class Pause(_Rule):
    """A job paused by an API stop: why, since when, when it STARTs again."""

    reason: str  # UNHEALTHY | OUT_OF_PU
    since: datetime  # when the STOPPED was read
    earliest: datetime  # since + the restart block: START is refused before
    # When the policy STARTs again; None: parked until a resume (OUT_OF_PU without a date).
    resume_at: datetime | None
    cost_pu: float  # costPU at the stop: a STOPPED read that billed more is a new stop
    resume_requested: bool = False  # an operator's resume (or start) came
    restart_sent_at: datetime | None = None  # the START of this resume, once sent

    @property
    def next_start_at(self) -> datetime | None:
        """When the job STARTs again: the policy's time, or the end of the block once a
        resume was asked for, whichever comes first; None: only a resume will tell."""
        asked = self.earliest if self.resume_requested else None
        return min((t for t in (self.resume_at, asked) if t is not None), default=None)
