"""The engine: claims due jobs, steps the lifecycle, saves, then performs the actions.

Order per job, always under its lease (docs/design.md "Per-job serialisation"):
fold pending start/cancel requests → ``step`` → SAVE (state + events, fenced on the
claim's generation) → perform the actions → their outcomes are observations → step →
save → … → release with the next wake-up. A lost lease aborts before any action runs.
A step on a read whose actions only read again is saved with the step after it
(``_deferrable``), and the save that ends a drive releases the lease in the same statement.

Jobs run on a bounded thread pool; nothing per job lives in memory between steps. The
engine claims the jobs that are due (a timed wake-up, a request intake recorded); the jobs
whose status moved upstream are claimed by the status loop (worker/daemon/status_loop.py),
which steps them by the same ``drive``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

from psycopg_pool import ConnectionPool

from worker import lifecycle
from worker.daemon import loops, step_report
from worker.daemon.actions import ActionRunner, BatchApi, RetryInputs, TileSource
from worker.daemon.fleet_budget import fenced
from worker.daemon.step_report import EngineMetrics
from worker.daemon.timings import policy_from, utc_now
from worker.lifecycle import (
    CancelRequested,
    JobState,
    Observation,
    Phase,
    Policy,
    StartRequested,
    Transition,
    Wake,
)
from worker.settings import Settings
from worker.store import db, jobs, leases
from worker.store.api_budget import Fence
from worker.wire import events
from worker.wire.outgoing import OutboxMessage

log = logging.getLogger(__name__)

# A job stepping more often than this in one claim is looping; hand it back for later.
MAX_STEPS_PER_CLAIM = 32
# The names the claim loop and job steps report their progress under (``on_progress`` as a
# step moves on, ``on_idle`` when its thread is done with the job).
ENGINE_LOOP = loops.ENGINE
STEPS_LOOP = loops.STEPS
# Threads of their own for a dead worker's jobs (worker/store/presence.py, first in line):
# they are stepped again at once however busy the other threads are.
RESCUE_THREADS = 8
# The claim loop's back-off after an error: doubling from the first, up to the most.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


@dataclass(frozen=True)
class _Link:
    """A step decided: what it stepped on, what it decided, and when."""

    observation: Observation
    transition: Transition
    now: datetime
    stepped_at: float  # monotonic


@dataclass
class _Held:
    """A claimed job while a worker thread drives it."""

    state: JobState
    generation: int
    released: bool = False  # the last save gave the lease back
    saved_at: float = float("-inf")  # monotonic: when the last save extended the lease


# Asked before each request to the API: is the lease on (job_id, generation), last extended
# at saved_at (monotonic), still surely this worker's? (worker/daemon/presence.py)
LeaseGuard = Callable[[str, int, float], bool]


class Engine:
    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        client: BatchApi,
        *,
        tiles: TileSource,
        retry_inputs: RetryInputs | None = None,
        metrics: EngineMetrics | None = None,
        policy: Policy | None = None,
        worker_name: str,
        clock: Callable[[], datetime] = utc_now,
        threads: int = 8,
        rescue_threads: int = RESCUE_THREADS,
        claim_batch: int = 64,
        idle_wait: float = 0.5,
        gauges_every: float = 10.0,
        on_progress: Callable[[str], None] | None = None,
        on_idle: Callable[[str], None] | None = None,
        lease_guard: LeaseGuard | None = None,
    ) -> None:
        """``on_progress`` is called with ``ENGINE_LOOP`` each time the claim loop goes
        round, idle or not, and with ``STEPS_LOOP`` on the thread driving a job each time
        its step moves on (each lifecycle step and save, each action, the release);
        ``on_idle`` with ``STEPS_LOOP`` when that thread is done with the job, however it
        ended. Both feed the daemon's liveness watch (worker/daemon/health.py); they run on
        every step, so must be cheap."""
        self._settings = settings
        self._pool = pool
        self._fleet = settings.fleet_id
        self._metrics = metrics
        self._policy = policy or policy_from(settings)
        self._owner = worker_name
        self._clock = clock
        self._lease = timedelta(seconds=settings.lease_seconds)
        self._threads = threads
        self._rescue_threads = rescue_threads
        self._claim_batch = claim_batch
        self._idle_wait = idle_wait
        self._gauges_every = gauges_every
        self._progress = on_progress or (lambda _loop: None)
        self._idle = on_idle or (lambda _loop: None)
        self._lease_guard = lease_guard
        self._runner = ActionRunner(
            client,
            tiles,
            on_duplicate_stopped=metrics.duplicate_stopped if metrics else (lambda: None),
            retry_inputs=retry_inputs,
        )
        self._stop = threading.Event()
        self._in_hand: set[Future[None]] = set()
        self._rescuing: set[Future[None]] = set()
        self._wake = threading.Event()
        self._lock = threading.Lock()

    # -- the loop -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop claiming; steps in hand finish their current action, save and release."""
        self._stop.set()
        self._wake.set()

    def wake(self) -> None:
        """Claim now, not at the next idle round: jobs were freed (a dead worker's leases
        run out) or a thread became idle. Cheap and thread-safe."""
        self._wake.set()

    def run(self) -> None:
        """Block until ``request_stop``; every exception is logged and the loop goes on."""
        next_gauges = 0.0
        backoff = 0.0
        with (
            ThreadPoolExecutor(self._threads, thread_name_prefix="engine") as executor,
            ThreadPoolExecutor(
                max(1, self._rescue_threads), thread_name_prefix="engine-rescue"
            ) as rescue,
        ):
            while not self._stop.is_set():
                self._progress(ENGINE_LOOP)
                self._wake.clear()
                try:
                    claimed = self._claim_and_submit(executor, rescue)
                    if self._clock().timestamp() >= next_gauges:
                        self._update_gauges()
                        next_gauges = self._clock().timestamp() + self._gauges_every
                    backoff = 0.0
                except Exception as exc:  # noqa: BLE001 - the loop must outlive any error
                    backoff = min(max(backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
                    log.error("engine loop error (%s); retrying in %.1fs", exc, backoff)
                    self._stop.wait(backoff)
                    continue
                if not claimed:
                    self._wake.wait(self._idle_wait)
        log.info("engine stopped")

    def _claim_and_submit(
        self, executor: ThreadPoolExecutor, rescue: ThreadPoolExecutor | None = None
    ) -> int:
        """Claim as many due jobs as there are idle threads, no more: a job claimed into a
        queue would hold its lease while it waits, out of every other worker's reach (a
        dead worker's jobs waited 5 s so behind a peer's busy threads). The rescue lane's
        threads take only a dead worker's jobs (first in line), so those are stepped at once
        even when every other thread is busy."""
        with self._lock:
            self._in_hand = {f for f in self._in_hand if not f.done()}
            self._rescuing = {f for f in self._rescuing if not f.done()}
            free = self._threads - len(self._in_hand)
            free_rescue = self._rescue_threads - len(self._rescuing) if rescue else 0
        if free <= 0 and free_rescue <= 0:
            return 0
        claims: list[leases.Claim] = []
        rescued: list[leases.Claim] = []
        limit = min(free, self._claim_batch)
        with self._pool.connection() as conn:
            now = self._clock()
            if free > 0:
                # First in line come first here too: the rescue lane is for what is left.
                claims = leases.claim_due(
                    conn, self._fleet, self._owner, now=now, lease=self._lease, limit=limit
                )
            if free_rescue > 0 and len(claims) == max(limit, 0):
                rescued = leases.claim_due(
                    conn,
                    self._fleet,
                    self._owner,
                    now=now,
                    lease=self._lease,
                    limit=free_rescue,
                    rescued_only=True,
                )
        for claim in claims:
            self._submit(executor, claim, [], self._in_hand)
        for claim in rescued:
            assert rescue is not None  # free_rescue is 0 without it
            self._submit(rescue, claim, [], self._rescuing)
        return len(claims) + len(rescued)

    def _submit(
        self,
        executor: ThreadPoolExecutor,
        claim: leases.Claim,
        observations: list[Observation],
        lane: set[Future[None]],
    ) -> None:
        future = executor.submit(self.drive_safely, claim, observations)
        with self._lock:
            lane.add(future)
        # A thread idle again: claim for it now, not at the next idle round.
        future.add_done_callback(lambda _f: self._wake.set())

    def _update_gauges(self) -> None:
        if self._metrics is None:
            return
        with self._pool.connection() as conn:
            counts = jobs.count_active_by_status(conn, self._fleet)
            oldest = jobs.oldest_seen(conn, self._fleet)
            cost_share = jobs.max_cost_share(conn, self._fleet)
        self._metrics.set_in_flight(counts)
        lag = (self._clock() - oldest).total_seconds() if oldest is not None else 0.0
        self._metrics.status_lag(max(0.0, lag))
        self._metrics.cost_share(cost_share)

    # -- one job ------------------------------------------------------------------------

    def drive_safely(
        self,
        claim: leases.Claim,
        observations: list[Observation],
        *,
        stop: threading.Event | None = None,
    ) -> None:
        """``drive``, with whatever it raises logged: the job's saved state is what a
        worker resumes from, once the lease runs out."""
        try:
            self.drive(claim, observations, stop=stop)
        except leases.LeaseLost as exc:
            log.warning("%s; its actions were not performed", exc)
        except Exception:
            # The lease expires and this or another worker resumes from the saved state.
            log.exception("job %s: step failed", claim.state.job_id)

    def drive(
        self,
        claim: leases.Claim,
        observations: list[Observation],
        *,
        stop: threading.Event | None = None,
    ) -> None:
        """Run a claimed job until it asks for nothing more, then release it.

        Once ``request_stop`` or ``stop`` (the stop of the loop that claimed it, if not the
        engine's) is set, the job takes on no new action and is handed back at once."""
        try:
            self._drive(claim, observations, stop or self._stop)
        finally:
            # Whatever ended the drive, this thread no longer has a step to make progress
            # on: an idle step thread must not read as a stalled one.
            self._idle(STEPS_LOOP)

    def _drive(
        self, claim: leases.Claim, observations: list[Observation], stop: threading.Event
    ) -> None:
        state = claim.state
        pending: deque[Observation] = deque()
        if claim.cancel_requested_at is not None and not state.cancel_wanted:
            pending.append(CancelRequested())
        if claim.start_requested_at is not None and (
            not state.start_wanted or state.pause is not None  # a start or resume
        ):
            pending.append(StartRequested())
        pending.extend(observations)
        if not pending:
            pending.append(Wake())
        held = _Held(state, claim.generation)
        # The request columns as last read; the next save clears them, and applies only
        # while they are unchanged (a request arriving meanwhile is refolded, see below).
        seen = claim.requests
        # Steps decided and not saved yet: a step on a read whose actions only read again
        # (the tile read after a status read) is saved with the step after it, one round
        # trip for both (see _deferrable). A crash meanwhile loses nothing the next read
        # does not bring back.
        chain: list[_Link] = []
        # With a request that arrived during unsaved steps: the saved state with it folded
        # in, which the first of those steps is decided on again (``replay``).
        folded: JobState | None = None
        replay: _Link | None = None
        wake_at: datetime | None = None
        steps = 0
        while True:
            if not pending or steps >= MAX_STEPS_PER_CLAIM:
                if not chain:
                    break
                # The drive ends on unsaved steps (their reads answered nothing to step on,
                # or it is stopping): their save gives the lease back.
                last = chain[-1].transition
                wake = self._clock() if pending or self._stopping(stop) else last.wake_at
                release = leases.Release(self._wake_at(last.state, wake))
                arrived = self._save(held, chain, seen, release)
                if arrived is None:
                    self._progress(STEPS_LOOP)
                    return
                seen, folded, replay = self._refold(held, chain, pending, arrived)
                chain = []
                continue
            steps += 1
            self._progress(STEPS_LOOP)
            observation = pending.popleft()
            if replay is not None:
                # The step's own `now`: a create's `create_not_before` was decided with it.
                now, stepped_at, replay = replay.now, replay.stepped_at, None
            else:
                now, stepped_at = self._clock(), time.monotonic()
            before = chain[-1].transition.state if chain else (folded or held.state)
            transition = lifecycle.step(before, observation, now, self._policy)
            chain.append(_Link(observation, transition, now, stepped_at))
            if not self._deferrable(observation, transition, pending, stop):
                arrived = self._save(held, chain, seen, self._last(transition, pending, stop))
                if arrived is not None:
                    # A start or cancel came while these steps were decided (say a cancel
                    # while the create was in flight): decide them again knowing the
                    # request; nothing was saved, and no action of theirs but reads ran.
                    # Intake only sets an empty column, so this ends after two rounds.
                    seen, folded, replay = self._refold(held, chain, pending, arrived)
                    chain = []
                    continue
                chain, folded, seen = [], None, leases.Requests()
                if held.released:
                    self._progress(STEPS_LOOP)
                    return
            wake_at = transition.wake_at
            for action in transition.actions:
                if self._stopping(stop):
                    break  # stopping: the action in hand finished; take on nothing new
                self._progress(STEPS_LOOP)
                if isinstance(action, _SENT):
                    self._check_lease(held)
                    log.info(
                        "job %s: %s sent",
                        held.state.job_id,
                        type(action).__name__.lower(),
                        extra=step_report.job_fields(held.state),
                    )
                # The step's own `now`: a create's `create_not_before` was decided with it.
                outcome = self._perform(held, transition.state, action, now)
                if outcome is not None:
                    pending.append(outcome)
        if pending or self._stopping(stop):
            # Stopping (another worker takes it at once) or looping: pick it up again now.
            wake_at = self._clock()
        self._progress(STEPS_LOOP)
        self._release(held, wake_at)

    def _stopping(self, stop: threading.Event) -> bool:
        return stop.is_set() or self._stop.is_set()

    def _deferrable(
        self,
        observation: Observation,
        transition: Transition,
        pending: deque[Observation],
        stop: threading.Event,
    ) -> bool:
        """Whether a step's save can wait for the step after it: the step folds in a read
        (a status, tile counts), so if it is lost the next read brings it back, and its
        actions only read again (the tiles, a status), so performing them before the save
        commits the job to nothing. Nothing else waits (what the reads answer is all the
        drive steps on next; see _refold) and the drive is not stopping. A step that
        publishes a status change is saved at once: its event must not wait for S3 (a
        `PROCESSING` read asks for the execution database), while progress, which is most
        steps, may."""
        return (
            bool(transition.actions)
            and not pending
            and not any(emit.kind == "status" for emit in transition.emits)
            and not self._stopping(stop)
            and isinstance(observation, _READ_OBSERVATIONS)
            and all(isinstance(action, _READS) for action in transition.actions)
        )

    def _refold(
        self,
        held: _Held,
        chain: list[_Link],
        pending: deque[Observation],
        arrived: leases.Requests,
    ) -> tuple[leases.Requests, JobState, _Link]:
        """A start or cancel arrived during ``chain``'s steps: nothing of them was saved.
        The first step is decided again on the saved state with the request folded in, at
        its own time; what the chain's reads answered is dropped (a step that reads
        waits for nothing else, so ``pending`` holds only their answers), and read again
        if the new decision asks."""
        log.info("job %s: a request arrived during the step", held.state.job_id)
        if len(chain) > 1:
            pending.clear()
        first = chain[0]
        pending.appendleft(first.observation)
        folded = lifecycle.fold_requests(
            held.state,
            cancel=arrived.cancel_requested_at is not None,
            start=arrived.start_requested_at is not None,
        )
        return arrived, folded, first

    def _last(
        self, transition: Transition, pending: deque[Observation], stop: threading.Event
    ) -> leases.Release | None:
        """The lease to give back with this step's save, when the drive ends with it: it
        asks for no action and nothing else waits. One round trip then saves and releases.
        """
        if transition.actions or pending:
            return None
        if self._stopping(stop):
            return leases.Release(self._clock())  # another worker takes it at once
        return leases.Release(self._wake_at(transition.state, transition.wake_at))

    def _wake_at(self, state: JobState, wake_at: datetime | None) -> datetime | None:
        if wake_at is None and state.phase is Phase.PENDING_CREATE:
            # Nothing polls a job without a request: never leave one without a wake-up.
            return self._clock() + self._policy.create_retry
        # A tracked job without a wake-up is the status poller's (it reads every one).
        return wake_at

    def _perform(
        self, held: _Held, state: JobState, action: lifecycle.Action, now: datetime
    ) -> Observation | None:
        """Perform ``action`` of the step that led to ``state`` (saved by now, unless the
        action only reads: see _deferrable)."""
        if not isinstance(action, _SENT):
            return self._runner.perform(state, action, now)
        # Checked again in the budget token's own statement, the last round trip before the
        # request: a freeze after the check above does not send what another worker owns.
        fence = Fence(held.state.job_id, held.generation, self._owner)
        with fenced(fence):
            return self._runner.perform(state, action, now)

    def _check_lease(self, held: _Held) -> None:
        guard = self._lease_guard
        if guard is not None and not guard(held.state.job_id, held.generation, held.saved_at):
            # A freeze (SIGSTOP, a partition) outlasted the lease: another worker may own
            # the job now and may have sent this very request already.
            raise leases.LeaseLost(
                f"job {held.state.job_id}: lease may have run out (generation {held.generation})"
            )

    def _save(
        self,
        held: _Held,
        chain: list[_Link],
        seen: leases.Requests,
        release: leases.Release | None,
    ) -> leases.Requests | None:
        """Save the chain's steps (the last one's state, every step's events, requests
        cleared; with ``release``, the lease given back); None when saved, else the
        requests that arrived since ``seen`` (nothing was written)."""
        previous = held.state
        last = chain[-1]
        messages: list[OutboxMessage] = []
        status_event: OutboxMessage | None = None
        exchange = self._settings.events_exchange
        for link in chain:
            for emit in link.transition.emits:
                out = events.job_event(
                    link.transition.state,
                    emit.kind,
                    exchange=exchange,
                    worker=self._owner,
                    now=link.now,
                    sequence=emit.sequence,
                )
                messages.extend(out)
                if emit.kind == "status":
                    status_event = next((m for m in out if m.exchange == exchange), None)
        # One statement (see leases.save_step), in autocommit: its own transaction, so the
        # steps' writes and, when they end the drive, the release cost one round trip.
        with self._pool.connection() as conn, db.autocommit(conn):
            arrived = leases.save_step(
                conn,
                last.transition.state,
                generation=held.generation,
                owner=self._owner,
                messages=messages,
                status_event=status_event,
                folded_cancel=seen.cancel_requested_at,
                folded_start=seen.start_requested_at,
                lease_until=last.now + self._lease,
                release=release,
            )
        if arrived is not None:
            return arrived
        held.state = last.transition.state
        held.saved_at = last.stepped_at  # the save set lease_until from the step's `now`
        held.released = release is not None
        for link in chain:
            step_report.report(previous, link.transition.state, self._metrics)
            previous = link.transition.state
        return None

    def _release(self, held: _Held, wake_at: datetime | None) -> None:
        wake_at = self._wake_at(held.state, wake_at)
        with self._pool.connection() as conn:
            released = leases.release(
                conn,
                self._fleet,
                held.state.job_id,
                generation=held.generation,
                owner=self._owner,
                next_run_at=wake_at,
                now=self._clock(),
            )
        if not released:
            log.warning("job %s: lease lost before release", held.state.job_id)


# Actions that ask the API to do something, logged at INFO as they go out; reads (polls,
# tile reads) are not: a job reads its status hundreds of times.
_SENT = (lifecycle.Create, lifecycle.Adopt, lifecycle.Analyse, lifecycle.Start, lifecycle.Stop)
# Actions that only read (S3's tile files, the task's status), and the observations that only
# bring what was read: a step of the second kind asking for the first is saved with the step
# after it (Engine._deferrable).
_READS = (lifecycle.ReadTiles, lifecycle.Poll)
_READ_OBSERVATIONS = (lifecycle.TaskSeen, lifecycle.TilesSeen, lifecycle.TilesUnavailable)
