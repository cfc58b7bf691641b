"""Reading many jobs' statuses per API call (docs/design.md "Reading statuses within a budget").

Each round takes the active jobs whose status is older than the poll interval and reads
them the cheaper way: list pages sorted ``created:desc`` down to the oldest due job's
creation, or one GET per due job. The list's page size and how many foreign tasks (other
clients of the account) sit among ours are unknowns, so both are learned from each scan.

A status that did not change costs one bulk UPDATE of ``last_seen_at``; only changes,
404s and duplicates become observations the engine steps on. Tracked jobs have no timed
wake-up of their own (docs/lifecycle.md "Events and schedule"): these rounds are what
keeps them moving.

The request budget wins over freshness: a round spends at most ``max_requests`` (the
budget's share for one poll interval), stalest jobs first; what it cannot read stays due
and ``batch_worker_status_lag_seconds`` shows the debt.

Duplicates (another request carrying a job's tag) show only in list pages, so with few jobs,
where GETs are cheaper, they would never be seen. A *sweep* is a round that scans the list
back to the oldest active job whatever GETs would cost (``SweepSchedule``): every few poll
intervals, and soon after a job whose create was doubtful (the likely source of
duplicates). A sweep reads every listed job's status too, so it replaces GETs of that round
and costs only the pages beyond them (docs/performance.md "Duplicate sweeps").

A doubtful job that ended before it knew its request (a cancel or deadline while a create
was uncertain) is still swept for a while (``PollTarget.ended``): until one complete sweep
has run after its last create could show in the list. A running request carrying its tag is
reported (and stopped); a ``CREATED`` one cannot be stopped and spends nothing, so it is
left alone and logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from worker import lifecycle
from worker.api.errors import ApiError, NotFound
from worker.api.models import TaskStatus
from worker.daemon.actions import BatchApi, snapshot
from worker.lifecycle import DuplicateFound, Observation, TaskMissing, TaskSeen
from worker.lifecycle.jobs import TAG_WORD
from worker.store.jobs import PollTarget

log = logging.getLogger(__name__)

# A duplicate is worth reporting only while a stop can still reach it and it can still
# spend processing units (§3.2): CREATED costs nothing and cannot be stopped, and nobody
# will start it; the final statuses are over.
_STOPPABLE = frozenset({"ANALYSING", "ANALYSIS_DONE", "PROCESSING"})


@dataclass
class PollResult:
    """What one round learned: changes to step on, and jobs merely seen unchanged."""

    observations: dict[str, list[Observation]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)
    requests: int = 0
    method: str = "none"  # "list", "get", "sweep" or "none"
    swept: bool = False  # a sweep's scan reached the oldest active job (within its budget)
    # Jobs with more than progress to step on: a new status, a 404, a duplicate. The rest
    # only moved completion or cost; those steps can wait (StatusLoop.poll_once).
    urgent: set[str] = field(default_factory=set)

    def add(self, job_id: str, observation: Observation, *, progress: bool = False) -> None:
        self.observations.setdefault(job_id, []).append(observation)
        if not progress:
            self.urgent.add(job_id)

    def progress_only(self) -> list[str]:
        """Jobs whose every observation is progress (same status), in the order read."""
        return [job_id for job_id in self.observations if job_id not in self.urgent]


def changed(target: PollTarget, task: TaskStatus) -> bool:
    return (
        task.status != target.status
        or task.completion_percentage != target.completion
        or (target.cost_pu is not None and task.cost_pu != target.cost_pu)
        or (target.cost_pu is None and task.cost_pu != 0)
    )


def jobs_to_step(result: PollResult, targets: list[PollTarget], *, progress_room: int) -> list[str]:
    """The jobs a round steps: every one with a new status (or a 404, a duplicate), then
    at most ``progress_room`` with only progress, least recently seen first. Those left out
    count as read all the same (``jobs_read``): their progress waits for their next read."""
    urgent = [job_id for job_id in result.observations if job_id in result.urgent]
    progress = result.progress_only()
    if len(progress) > progress_room:
        seen = {t.job_id: t.last_seen_at for t in targets}
        oldest = datetime.min.replace(tzinfo=UTC)
        progress.sort(key=lambda job_id: seen.get(job_id) or oldest)
        del progress[max(0, progress_room) :]
    return urgent + progress


def jobs_read(result: PollResult, stepping: Sequence[str]) -> list[str]:
    """The jobs a round read and does not step, to be marked as seen: those unchanged, and
    those with only progress that found no room (``jobs_to_step``). Left due, these were
    read again the very next round, each read of an old job a scan through the whole list:
    with thousands processing, most of the list pages a burst cost."""
    taken = set(stepping)
    return result.unchanged + [job_id for job_id in result.progress_only() if job_id not in taken]


def due_targets(
    targets: list[PollTarget],
    *,
    now: datetime,
    interval: timedelta,
    rest_interval: timedelta | None = None,
    read_at: Mapping[str, datetime] | None = None,
) -> list[PollTarget]:
    """Targets whose status is older than their interval, stalest first. A job in
    ``read_at`` is due from the time it gives (worker/lifecycle/schedule.py) instead."""
    rest = rest_interval if rest_interval is not None else interval
    when = read_at or {}

    def is_due(t: PollTarget) -> bool:
        if t.last_seen_at is None:
            return True
        at = when.get(t.job_id)
        if at is not None:
            return at <= now
        return t.last_seen_at <= now - (rest if t.resting else interval)

    due = [t for t in targets if is_due(t)]
    due.sort(key=lambda t: (t.last_seen_at is not None, t.last_seen_at or now))
    return due


def sweep_reach(targets: list[PollTarget]) -> datetime | None:
    """How far back a sweep must list: the oldest active request's creation, or, for a job
    whose create was doubtful, its acceptance (a lost POST may predate its known request)."""
    starts = [
        (t.accepted_at or t.upstream_created) if t.create_doubtful else t.upstream_created
        for t in targets
    ]
    known = [start for start in starts if start is not None]
    return min(known) if known else None


class SweepSchedule:
    """When a round must be a duplicate sweep: ``every`` since the last one, and soon for a
    doubtful create: at once, and again once ``list_lag`` has passed since its request's
    creation (a duplicate the list did not show yet shows by then). In memory: a restart
    costs one early sweep."""

    def __init__(self, *, every: timedelta, list_lag: timedelta) -> None:
        self._every = every
        self._lag = list_lag
        self._last: datetime | None = None
        self._doubts_swept: dict[str, datetime] = {}  # job id -> start of its last sweep
        self._covered: set[str] = set()  # ended jobs swept for long enough

    def _doubt_due_at(self, target: PollTarget) -> datetime | None:
        """When a doubtful job next needs a sweep; None when it needs none."""
        if not target.create_doubtful:
            return None
        swept = self._doubts_swept.get(target.job_id)
        if swept is None:
            return datetime.min.replace(tzinfo=UTC)
        settled = self._settled_at(target, swept)
        return settled if swept < settled else None

    def _settled_at(self, target: PollTarget, fallback: datetime) -> datetime:
        """When any request the job's creates made shows in the list. An ended job's last
        POST (``intent_at``) may be its only one, and no request of its own dates it."""
        if target.ended:
            start = target.intent_at or target.accepted_at
        else:
            start = target.upstream_created or target.accepted_at
        return (start or fallback) + self._lag

    def lingering(self, ended: list[PollTarget]) -> list[PollTarget]:
        """The ended doubtful jobs (as the store lists them) still to be swept for: those
        no complete sweep has covered since their last create could be listed."""
        self._covered &= {t.job_id for t in ended}
        return [t for t in ended if t.job_id not in self._covered]

    def next_at(self, targets: list[PollTarget]) -> datetime | None:
        """When a sweep is next wanted; None without jobs to sweep for. Ended jobs ask
        for their own sweeps only, never the regular ones."""
        if not targets:
            return None
        doubts = [d for d in map(self._doubt_due_at, targets) if d is not None]
        if any(not t.ended for t in targets):
            doubts.append(
                self._last + self._every if self._last else datetime.min.replace(tzinfo=UTC)
            )
        return min(doubts, default=None)

    def wanted(self, targets: list[PollTarget], now: datetime) -> bool:
        due = self.next_at(targets)
        return due is not None and due <= now

    def done(self, targets: list[PollTarget], *, started: datetime, complete: bool) -> None:
        """Record a sweep begun at ``started``; an incomplete one (budget) still counts for
        the rate, but a doubtful job waits for one that reached it."""
        self._last = started
        active = {t.job_id for t in targets}
        self._doubts_swept = {j: at for j, at in self._doubts_swept.items() if j in active}
        if complete:
            for t in targets:
                if t.create_doubtful:
                    self._doubts_swept[t.job_id] = started
                if t.ended and started >= self._settled_at(t, started):
                    self._covered.add(t.job_id)


class Poller:
    def __init__(
        self,
        client: BatchApi,
        fleet_id: str,
        *,
        clock_skew: timedelta = timedelta(seconds=30),
        initial_page_size: int = 100,
    ) -> None:
        self._client = client
        self._fleet_id = fleet_id
        self._skew = clock_skew
        # Learned from scans: tasks per page, and tasks listed per task of ours (>= 1).
        self._page_size = float(initial_page_size)
        self._crowding = 1.0
        # CREATED requests of ended jobs already logged. Small: one per doubtful create that
        # landed after its job was cancelled.
        self._left_alone: set[str] = set()

    def estimate_list_pages(self, targets: list[PollTarget], oldest_due: datetime) -> int:
        ours = sum(
            1 for t in targets if t.upstream_created is None or t.upstream_created >= oldest_due
        )
        return max(1, math.ceil(ours * self._crowding / self._page_size))

    def round(
        self,
        targets: list[PollTarget],
        due: list[PollTarget],
        *,
        max_requests: int | None = None,
        sweep: bool = False,
        due_soon: Sequence[PollTarget] = (),
    ) -> PollResult:
        """Read the statuses of ``due`` (and whatever else the chosen scan covers), in at
        most ``max_requests`` API requests; ``due`` stalest first. ``sweep``: list back to
        ``sweep_reach(targets)`` whatever GETs would cost, for duplicates.

        A list scan reads every job newer than the oldest one it must reach, so a scan for
        the due jobs reaches on to ``due_soon`` (jobs that will be due before long) when
        they are older: a few pages more now, instead of another scan through the same
        pages for each of them as it comes due. Every job a scan sees counts as read."""
        result = PollResult()
        limit = max_requests if max_requests is not None else len(due) + 1_000_000
        if limit < 1:
            return result
        reach = sweep_reach(targets) if sweep else None
        if reach is not None:
            result.method = "sweep"
            seen, result.swept = self._scan_to(targets, reach - self._skew, result, limit)
            missed = [t for t in due if t.job_id not in seen]
            self._get_each(missed[: max(0, limit - result.requests)], result)
            return result
        if not due:
            return result
        created = [t.upstream_created for t in due if t.upstream_created is not None]
        if created and len(due) > 1:
            oldest = min(created)
            if self.estimate_list_pages(targets, oldest) < len(due):
                result.method = "list"
                soon = [t.upstream_created for t in due_soon if t.upstream_created is not None]
                deepest = min([oldest, *soon])
                seen = self._scan(targets, deepest - self._skew, result, limit)
                # Jobs the scan missed (list lag, or older than it reached) fall back to GET.
                missed = [t for t in due if t.job_id not in seen]
                self._get_each(missed[: max(0, limit - result.requests)], result)
                return result
        result.method = "get"
        self._get_each(due[:limit], result)
        return result

    def _scan(
        self, targets: list[PollTarget], stop_before: datetime, result: PollResult, limit: int
    ) -> set[str]:
        return self._scan_to(targets, stop_before, result, limit)[0]

    def _scan_to(
        self, targets: list[PollTarget], stop_before: datetime, result: PollResult, limit: int
    ) -> tuple[set[str], bool]:
        """Observe every target listed down to ``stop_before``; the jobs seen, and whether
        the scan got there (not cut short by ``limit`` or an error)."""
        # An ended job's own request is over for the worker: only its tag is looked for.
        by_id = {t.batch_request_id: t for t in targets if t.batch_request_id and not t.ended}
        # Every tag the job has used: a follow-up carries its attempt's own (its duplicates
        # too), and the job's earlier requests are over (DONE), so no duplicates to report.
        by_tag = {
            tag: t
            for t in targets
            for tag in lifecycle.job_tags(self._fleet_id, t.job_id, t.attempt)
        }
        seen: set[str] = set()
        listed = ours = 0
        complete = False
        try:
            for page in self._client.iter_pages(sort="created:desc"):
                result.requests += 1
                if page.tasks:
                    self._page_size = max(self._page_size * 0.5 + len(page.tasks) * 0.5, 1.0)
                reached_end = False
                for task in page.tasks:
                    if task.created is not None and task.created < stop_before:
                        reached_end = True
                        break
                    listed += 1
                    target = by_id.get(task.id)
                    if target is not None:
                        ours += 1
                        seen.add(target.job_id)
                        self._observe(target, task, result)
                    self._check_duplicate(task, by_tag, result)
                if reached_end or not page.next_token:
                    complete = True
                    break
                if result.requests >= limit:
                    break
        except ApiError as exc:
            log.warning("status list scan failed: %s", exc)
        if ours:
            self._crowding = max(1.0, listed / ours)
        return seen, complete

    def _check_duplicate(
        self, task: TaskStatus, by_tag: dict[str, PollTarget], result: PollResult
    ) -> None:
        for tag in TAG_WORD.findall(task.description or ""):
            target = by_tag.get(tag)
            if target is None or target.batch_request_id == task.id:
                continue
            if task.status in _STOPPABLE:
                result.add(target.job_id, DuplicateFound(batch_request_id=task.id))
            elif target.ended and task.status == "CREATED":
                self._report_left_alone(target, task)

    def _report_left_alone(self, target: PollTarget, task: TaskStatus) -> None:
        # The job ended without knowing this request; the API refuses to stop a CREATED
        # one (§3.2) and it spends nothing unless someone starts it. Events have no field
        # for it, so the log says it, once per request; should someone start it while the
        # job is still swept for, the next sweep stops it.
        if task.id in self._left_alone:
            return
        self._left_alone.add(task.id)
        log.warning(
            "job %s ended, but batch request %s carrying its tag exists (CREATED): "
            "left alone, the API cannot stop a CREATED request",
            target.job_id,
            task.id,
        )

    def _get_each(self, due: list[PollTarget], result: PollResult) -> None:
        for target in due:
            if target.batch_request_id is None:
                continue
            result.requests += 1
            try:
                # No created_at: a new request's 404 is the lifecycle's to read again on its
                # NOT_FOUND_RETRIES schedule, not the client's to retry while the round waits.
                task = self._client.get(target.batch_request_id)
            except NotFound:
                result.add(target.job_id, TaskMissing())
                continue
            except ApiError as exc:
                log.warning("status of %s: %s", target.batch_request_id, exc)
                continue
            self._observe(target, task, result)

    @staticmethod
    def _observe(target: PollTarget, task: TaskStatus, result: PollResult) -> None:
        if changed(target, task):
            result.add(
                target.job_id, TaskSeen(snapshot(task)), progress=task.status == target.status
            )
        else:
            result.unchanged.append(target.job_id)
