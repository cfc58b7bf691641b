"""The account's batch requests: creation order, the seeded history, list pages (§2.1),
and the optional state file that lets a restarted simulator keep its requests.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Any

from worker.simulator.config import SimulatorConfig
from worker.simulator.grids import Feature
from worker.simulator.jobs import (
    ANALYSING,
    ANALYSIS_DONE,
    DONE,
    FAILED,
    PROCESSING,
    STOPPED,
    Outcome,
    Phase,
    SimJob,
)

logger = logging.getLogger(__name__)

_WORD = re.compile(r"[A-Za-z0-9]+")
_HISTORY_SPAN = 30 * 86_400.0  # the seeded requests were created over the last 30 days
_STATUS_ORDER = {
    s: i
    for i, s in enumerate(["CREATED", ANALYSING, ANALYSIS_DONE, PROCESSING, DONE, FAILED, STOPPED])
}


class Store:
    def __init__(self, account_id: str, project_id: str) -> None:
        self.account_id = account_id
        self.project_id = project_id
        self.jobs: dict[str, SimJob] = {}
        # Creation order; requests are never deleted (V2 has no DELETE, §2), so a position
        # in this list is a stable cursor for created-sorted pages.
        self.order: list[SimJob] = []

    def add(self, job: SimJob) -> None:
        self.jobs[job.id] = job
        self.order.append(job)

    # --- the seeded history ---------------------------------------------------------------
    def seed_history(self, count: int, now: float) -> None:
        """``count`` finished requests created before ``now`` (DONE, some FAILED/STOPPED)."""
        for index in range(count):
            created = now - _HISTORY_SPAN + index * _HISTORY_SPAN / max(count, 1) - 3600.0
            job = SimJob(
                id=str(uuid.UUID(int=index + 1, version=4)),
                request=_history_request(index),
                created=created,
                account_id=self.account_id,
                project_id=self.project_id,
            )
            job.feature_count = 4 + index % 20
            job.pu_per_feature = 40.0
            job.user_action, job.user_action_updated = "START", created + 60.0
            job.phases = [
                Phase(created + 90.0, ANALYSING),
                Phase(created + 300.0, ANALYSIS_DONE),
                Phase(created + 400.0, PROCESSING, progress_to=100.0, until=created + 2400.0),
            ]
            if index % 17 == 5:
                job.phases[1:] = [
                    Phase(created + 300.0, FAILED, error="Failed to validate evalscript.")
                ]
            elif index % 23 == 7:
                job.phases.append(
                    Phase(created + 1000.0, STOPPED, progress=30.0, reason="USER_ACTION")
                )
                job.user_action = "STOP"
            else:
                job.phases.append(Phase(created + 2500.0, DONE, progress=100.0))
            self.add(job)

    # --- list pages ---------------------------------------------------------------------------
    def page(
        self,
        now: float,
        config: SimulatorConfig,
        *,
        count: int,
        token: str | None,
        sort: str | None,
        search: str | None,
    ) -> tuple[list[SimJob], str | None]:
        """One page of the list and the token of the next one (None on the last page)."""
        visible_before = now - config.list_lag
        matcher = _matcher(search, config.search_mode)
        sort = sort or config.default_sort
        if sort in {"status", "status:desc"}:
            return self._status_page(
                now=now,
                visible_before=visible_before,
                matcher=matcher,
                count=count,
                token=token,
                descending=sort == "status:desc",
            )
        descending = sort == "created:desc"
        position = _decode(token)
        if position is None:
            position = len(self.order) - 1 if descending else 0
        step = -1 if descending else 1
        found: list[SimJob] = []
        while 0 <= position < len(self.order) and len(found) < count:
            job = self.order[position]
            position += step
            if job.created <= visible_before and matcher(job):
                found.append(job)
        more = 0 <= position < len(self.order)
        return found, _encode(position) if more else None

    def _status_page(
        self,
        *,
        now: float,
        visible_before: float,
        matcher: Any,
        count: int,
        token: str | None,
        descending: bool,
    ) -> tuple[list[SimJob], str | None]:
        listed = [j for j in self.order if j.created <= visible_before and matcher(j)]
        listed.sort(key=lambda j: _STATUS_ORDER.get(j.status(now), 99), reverse=descending)
        offset = _decode(token) or 0
        chunk = listed[offset : offset + count]
        end = offset + len(chunk)
        return chunk, _encode(end) if end < len(listed) else None

    # --- persistence ----------------------------------------------------------------------
    def save(self, path: Path) -> None:
        data = {
            "account_id": self.account_id,
            "project_id": self.project_id,
            "jobs": [_dump_job(job) for job in self.order],
        }
        partial = path.with_suffix(path.suffix + ".tmp")
        partial.write_text(json.dumps(data))
        os.replace(partial, path)

    @classmethod
    def load(cls, path: Path) -> Store:
        data = json.loads(path.read_text())
        store = cls(data["account_id"], data["project_id"])
        for raw in data["jobs"]:
            store.add(_load_job(raw))
        return store


def _matcher(search: str | None, mode: str) -> Any:
    """A predicate for ``search``: words joined by ``|`` (or) and ``&`` (and) (§2.1)."""
    if not search or mode == "ignored":
        return lambda job: True
    groups = [
        [t.strip().lower() for t in part.split("&") if t.strip()] for part in search.split("|")
    ]
    groups = [g for g in groups if g]
    if mode == "words":

        def by_words(job: SimJob) -> bool:
            words = {w.lower() for w in _WORD.findall(job.description())}
            return any(all(set(_WORD.findall(t)) <= words for t in g) for g in groups)

        return by_words

    def by_substring(job: SimJob) -> bool:
        text = job.description().lower()
        return any(all(t in text for t in g) for g in groups)

    return by_substring


def _encode(position: int) -> str:
    return base64.urlsafe_b64encode(f"p{position}".encode()).decode().rstrip("=")


def _decode(token: str | None) -> int | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        return int(raw[1:]) if raw.startswith("p") else None
    except ValueError:
        return None


def valid_token(token: str) -> bool:
    return _decode(token) is not None


def _history_request(index: int) -> dict[str, Any]:
    return {
        "processRequest": {
            "input": {
                "bounds": {"bbox": [13.0, 45.0, 13.5, 45.5]},
                "data": [{"type": "sentinel-2-l2a"}],
            },
            "output": {"responses": [{"identifier": "default", "format": {"type": "image/tiff"}}]},
            "evalscript": "//VERSION=3\n",
        },
        "input": {"type": "tiling-grid", "id": 1, "resolution": 10.0},
        "output": {
            "type": "raster",
            "delivery": {"s3": {"url": "s3://archive-bucket/history", "iamRoleARN": "*****"}},
            "overwrite": False,
            "skipExisting": False,
            "cogOutput": False,
            "createCollection": False,
        },
        "instanceType": "normal",
        "description": f"archived request {index}",
    }


def _dump_job(job: SimJob) -> dict[str, Any]:
    # Field by field rather than ``asdict``: asdict deep-copies every request, and with
    # thousands of jobs a save then held the GIL for seconds, starving the server's loop.
    # json.dumps reads the values as they are; ``request_json`` is a cache and is not kept.
    raw = {f.name: getattr(job, f.name) for f in fields(job) if f.name != "request_json"}
    raw["outcome"] = vars(job.outcome)
    raw["phases"] = [vars(phase) for phase in job.phases]
    raw["fatal_indices"] = sorted(job.fatal_indices)
    raw["features"] = (
        None if job.features is None else [[f.name, f.epsg, list(f.extent)] for f in job.features]
    )
    return raw


def _load_job(raw: dict[str, Any]) -> SimJob:
    raw = dict(raw)
    raw["phases"] = [Phase(**p) for p in raw["phases"]]
    raw["outcome"] = Outcome(**raw["outcome"])
    raw["fatal_indices"] = frozenset(raw["fatal_indices"])
    if raw["features"] is not None:
        raw["features"] = [Feature(n, e, (x[0], x[1], x[2], x[3])) for n, e, x in raw["features"]]
    return SimJob(**raw)
