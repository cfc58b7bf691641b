"""The status loop: reads the statuses of the fleet's tracked jobs, and steps those that moved.

Tracked jobs have no timed wake-up of their own (docs/lifecycle.md "Events and schedule"):
these rounds are what keeps them moving. Each round takes the active jobs from the store
(and the ended doubtful ones a duplicate sweep still looks for), has the ``Poller`` read
those due within the round's share of the request budget (worker/daemon/poller.py), marks
the unchanged as seen in one UPDATE, and claims the changed to step them with what was
read: on this loop's own pool of threads, by the engine's drive (``JobDriver``), under the
same leases as every other step. A changed job waits in this loop's memory, unleased, until
a thread is free for it, and is claimed then (as the engine claims): a lease taken for a job
in a queue would keep it out of every other worker's reach, and a worker killed with a long
queue left them all to wait out their leases (docs/reliability.md "The long haul").

A loop like the daemon's others: ``run`` until ``request_stop``, ``on_progress`` each time
round, idle or not (worker/daemon/liveness.py watches it as ``poller``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from functools import partial
from typing import Protocol

from psycopg_pool import ConnectionPool

from worker.daemon.actions import BatchApi
from worker.daemon.poller import (
    Poller,
    PollResult,
    SweepSchedule,
    due_targets,
    jobs_read,
    jobs_to_step,
)
from worker.daemon.timings import policy_from, utc_now
from worker.lifecycle import Observation, Policy, TaskSeen
from worker.lifecycle.schedule import PROCESSING, Progress, next_read_at
from worker.settings import Settings
from worker.store import jobs, leases

log = logging.getLogger(__name__)

# Status reads may spend this share of the request budget; creates and actions get the rest.
STATUS_BUDGET_SHARE = 0.75
# A duplicate sweep (a list scan back to the oldest active job, for duplicates; see
# worker/daemon/poller.py) at least this many poll intervals apart, and soon after a
# doubtful create.
SWEEP_EVERY_POLLS = 4
# An ended doubtful job is swept for until list_lag_window and this many poll intervals
# after its end: room for a few sweeps (SWEEP_EVERY_POLLS apart when the budget cuts them).
ENDED_SWEEP_MARGIN_POLLS = 3 * SWEEP_EVERY_POLLS
# Steps that only publish progress (completion or cost moved, same status) are taken while
# fewer than this many status steps per step thread are waiting; the rest count as read and
# show their progress at their next read (poller.jobs_read). Without it, with thousands of
# jobs processing, every round queued a progress step for each of them and a new status
# waited behind them all (docs/performance.md, runs H).
PROGRESS_BACKLOG_PER_THREAD = 8
# How long the loop waits after a round that failed.
ERROR_WAIT = 1.0


class JobDriver(Protocol):
    """How the loop steps a job it claimed (``Engine.drive_safely``)."""

    def drive_safely(
        self,
        claim: leases.Claim,
        observations: list[Observation],
        *,
        stop: threading.Event | None = None,
    ) -> None: ...


class StatusLoop:
    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        client: BatchApi,
        driver: JobDriver,
        *,
        worker_name: str,
        policy: Policy | None = None,
        clock: Callable[[], datetime] = utc_now,
        threads: int = 8,
        sweep_every_polls: int | None = SWEEP_EVERY_POLLS,
        on_progress: Callable[[], None] | None = None,
    ) -> None:
        """``driver`` steps the jobs whose status moved, on ``threads`` threads of this
        loop's own. ``sweep_every_polls`` None: no duplicate sweeps at all (a baseline for
        bench/bench_engine.py; a deployment wants them). ``on_progress`` is called each
        time the loop goes round, idle or not (the API calls of a round count as its
        progress too: the client's hooks, worker/daemon/liveness.py)."""
        self._pool = pool
        self._fleet = settings.fleet_id
        self._driver = driver
        self._owner = worker_name
        self._policy = policy or policy_from(settings)
        self._clock = clock
        self._lease = timedelta(seconds=settings.lease_seconds)
        self._threads = threads
        self._progress = on_progress or (lambda: None)
        self._poller = Poller(client, self._fleet, clock_skew=self._policy.clock_skew)
        self._sweeps = (
            SweepSchedule(
                every=self._policy.poll_interval * sweep_every_polls,
                list_lag=self._policy.list_lag_window,
            )
            if sweep_every_polls is not None
            else None
        )
        # How long after its end a doubtful job is still swept for (docs/lifecycle.md
        # "Duplicate sweeps"): its last POST (no later than the end) shows in the list
        # within list_lag_window; the rest is room for a sweep the budget cut short. Past
        # it, a request nobody started stays CREATED, spending nothing.
        self._ended_sweep_window = self._policy.list_lag_window + self._policy.poll_interval * (
            ENDED_SWEEP_MARGIN_POLLS
        )
        poll_seconds = self._policy.poll_interval.total_seconds()
        self._round_requests = max(
            1, int(settings.api_budget_per_minute * poll_seconds / 60 * STATUS_BUDGET_SHARE)
        )
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._progress_backlog = threads * PROGRESS_BACKLOG_PER_THREAD
        # Jobs read as changed and not yet claimed, with what was read: new statuses first,
        # then progress, each in the order read. Unleased: another worker may step them.
        self._waiting: dict[str, list[Observation]] = {}
        self._waiting_progress: dict[str, list[Observation]] = {}
        self._stepping: set[str] = set()  # claimed (or being claimed) and not finished
        # The first read of each processing job's run, for its completion's rate. In
        # memory: after a restart a job is read every interval until its rate shows again.
        self._progress_from: dict[str, Progress] = {}
        # The completion last read of each processing job whose read was progress only, so
        # not saved until its step (which may wait, or be left to the next read): what its
        # next read is timed on (a 100 % not yet saved still calls for a read soon).
        self._read_completion: dict[str, float] = {}

    def request_stop(self) -> None:
        """Stop reading; steps in hand finish their current action, save and release."""
        self._stop.set()

    def run(self) -> None:
        """Block until ``request_stop``; every exception is logged and the loop goes on."""
        with ThreadPoolExecutor(self._threads, thread_name_prefix="poll-step") as executor:
            while not self._stop.is_set():
                self._progress()
                try:
                    waited = self.poll_once(executor)
                except Exception as exc:  # noqa: BLE001 - the loop must outlive any error
                    log.error("poller error (%s)", exc)
                    waited = ERROR_WAIT
                self._stop.wait(waited)
        with self._lock:
            # Unleased, so nothing to hand back: they are read again by whoever reads next.
            self._waiting.clear()
            self._waiting_progress.clear()
        log.info("status loop stopped")

    def poll_once(self, executor: ThreadPoolExecutor | None = None) -> float:
        """One status round; returns how long to wait before the next one. Without an
        executor, the jobs that moved are stepped on the calling thread.

        Changed jobs are claimed and stepped with what was read; unchanged ones only get
        ``last_seen_at`` touched (no claim, no step): tracked jobs cost nothing between
        changes but this one bulk UPDATE.
        """
        now = self._clock()
        interval, rest = self._policy.poll_interval, self._policy.rest_poll_interval
        sweeps = self._sweeps
        with self._pool.connection() as conn:
            active = jobs.active_poll_targets(conn, self._fleet)
            ended = (
                sweeps.lingering(
                    jobs.ended_doubtful_targets(
                        conn, self._fleet, ended_since=now - self._ended_sweep_window
                    )
                )
                if sweeps is not None
                else []
            )
        # Ended jobs only widen a sweep (for their tag); their statuses are never read.
        targets = active + ended
        read_at = self._read_at(active)
        # A job waiting for a thread, or being stepped, holds a read its step will save: it
        # is not read again meanwhile (unleased while it waits, it would be due every round).
        with self._lock:
            in_hand = self._waiting.keys() | self._waiting_progress.keys() | self._stepping
        polled = [t for t in active if t.job_id not in in_hand]
        due = due_targets(polled, now=now, interval=interval, rest_interval=rest, read_at=read_at)
        sweep = sweeps is not None and sweeps.wanted(targets, now)
        if not due and not sweep:
            soonest = min(read_at.values(), default=now + interval)
            if sweeps is not None:
                soonest = min(soonest, sweeps.next_at(targets) or soonest)
            return float(max(0.2, min((soonest - now).total_seconds(), interval.total_seconds())))
        # Jobs due within half an interval are read too where the scan can reach them: the
        # rounds then fall into step, one scan through the list doing for many.
        soon = due_targets(
            polled, now=now + interval / 2, interval=interval, rest_interval=rest, read_at=read_at
        )
        result = self._poller.round(
            targets, due, max_requests=self._round_requests, sweep=sweep, due_soon=soon
        )
        if sweep and sweeps is not None:
            sweeps.done(targets, started=now, complete=result.swept)
        self._remember_completions(result)
        to_step = self._to_step(result, active)
        with self._pool.connection() as conn:
            jobs.touch_seen(conn, self._fleet, jobs_read(result, to_step), seen_at=now)
        log.debug(
            "status round: %d due, %s, %d requests, %d changed, %d unchanged",
            len(due),
            result.method,
            result.requests,
            len(result.observations),
            len(result.unchanged),
        )
        self._wait_for_threads(result, to_step)
        if executor is None:
            while self._claim_and_submit(None, limit=1) is not None:
                pass
        else:
            self._claim_and_submit(executor)
        return 0.2

    def _wait_for_threads(self, result: PollResult, to_step: list[str]) -> None:
        """Queue the round's changed jobs, unleased. A job still waiting from an earlier
        round keeps its place; a new status read for it since replaces mere progress (a
        status snapshot holds the progress too). One being stepped is left out, as when
        its lease refused it: its step saves what it read, and the next read is fresh."""
        with self._lock:
            for job_id in to_step:
                if job_id in self._stepping:
                    continue
                observations = result.observations[job_id]
                if job_id in result.urgent:
                    self._waiting_progress.pop(job_id, None)
                    self._waiting.setdefault(job_id, observations)
                elif job_id not in self._waiting:
                    self._waiting_progress.setdefault(job_id, observations)

    def _claim_and_submit(self, executor: ThreadPoolExecutor | None, limit: int = 0) -> int | None:
        """Claim as many waiting jobs as there are idle threads (or ``limit``), no more, and
        step them; the number claimed, None when none was waiting. A waiting job another
        worker holds now is dropped: its owner steps it, and a later round reads anew."""
        with self._lock:
            free = limit or self._threads - len(self._stepping)
            picked: list[tuple[str, list[Observation]]] = []
            for queue in (self._waiting, self._waiting_progress):
                while queue and len(picked) < free:
                    job_id = next(iter(queue))
                    picked.append((job_id, queue.pop(job_id)))
            self._stepping.update(job_id for job_id, _ in picked)  # their threads, held
        if not picked:
            return None
        observed = dict(picked)
        try:
            with self._pool.connection() as conn:
                claims = leases.claim_due(
                    conn,
                    self._fleet,
                    self._owner,
                    now=self._clock(),
                    lease=self._lease,
                    limit=len(picked),
                    job_ids=list(observed),
                )
        except BaseException:
            self._steps_finished(observed)
            raise
        self._steps_finished(set(observed) - {claim.state.job_id for claim in claims})
        # In the order picked: new statuses go ahead of progress.
        order = {job_id: n for n, (job_id, _) in enumerate(picked)}
        claims.sort(key=lambda claim: order[claim.state.job_id])
        for claim in claims:
            observations = observed[claim.state.job_id]
            if executor is None:
                self._drive_here(claim, observations)
                continue
            try:
                future = executor.submit(
                    self._driver.drive_safely, claim, observations, stop=self._stop
                )
            except RuntimeError:
                # The loop stopped and its executor shut down meanwhile: step it here (a
                # stopping step takes on no new action and releases the job).
                self._drive_here(claim, observations)
                continue
            future.add_done_callback(partial(self._step_done, executor, claim.state.job_id))
        return len(claims)

    def _drive_here(self, claim: leases.Claim, observations: list[Observation]) -> None:
        try:
            self._driver.drive_safely(claim, observations, stop=self._stop)
        finally:
            self._steps_finished({claim.state.job_id})

    def _read_at(self, active: list[jobs.PollTarget]) -> dict[str, datetime]:
        """When each job read before is next due (worker/lifecycle/schedule.py), keeping
        the first read of each processing run for its rate."""
        policy = self._policy
        known, read = self._progress_from, self._read_completion
        self._progress_from, self._read_completion = {}, {}
        read_at: dict[str, datetime] = {}
        for t in active:
            if t.last_seen_at is None:
                continue
            first = known.get(t.job_id)
            # A job read with only progress and no room to step it has its old completion
            # saved beside a new last_seen_at: the completion read stands in for it.
            completion = t.completion
            if t.status == PROCESSING:
                completion = max(completion, read.get(t.job_id, completion))
                if t.job_id in read:
                    self._read_completion[t.job_id] = completion
                if first is None or completion < first.completion:
                    first = Progress(at=t.last_seen_at, completion=completion)
                self._progress_from[t.job_id] = first
            read_at[t.job_id] = next_read_at(
                status=t.status,
                seen_at=t.last_seen_at,
                completion=completion,
                first=first if t.status == PROCESSING else None,
                interval=policy.poll_interval,
                freshness=policy.progress_freshness,
                rest=policy.rest_poll_interval,
                resting=t.resting,
            )
        return read_at

    def _remember_completions(self, result: PollResult) -> None:
        for job_id in result.progress_only():
            observation = result.observations[job_id][-1]
            if isinstance(observation, TaskSeen) and observation.task.status == PROCESSING:
                self._read_completion[job_id] = observation.task.completion_percentage

    def _steps_finished(self, job_ids: Iterable[str]) -> None:
        with self._lock:
            self._stepping.difference_update(job_ids)

    def _step_done(self, executor: ThreadPoolExecutor, job_id: str, _step: Future[None]) -> None:
        """A thread is free: claim the next waiting job for it now, not at the next round."""
        self._steps_finished({job_id})
        if self._stop.is_set():
            return
        try:
            self._claim_and_submit(executor)
        except Exception as exc:  # noqa: BLE001 - the next round claims what is left
            log.error("status loop: claim after a step failed (%s)", exc)

    def _to_step(self, result: PollResult, targets: list[jobs.PollTarget]) -> list[str]:
        with self._lock:
            # Waiting or stepping: the old executor's queue, now kept unleased.
            pending = len(self._waiting) + len(self._waiting_progress) + len(self._stepping)
            room = max(0, self._progress_backlog - pending)
        return jobs_to_step(result, targets, progress_room=room)
