"""The simulator's state and its background duties, independent of HTTP.

Runs on one asyncio loop: handlers and the artifact deliverers share the jobs without
locks. Blocking work (reading a GeoPackage input, writing artifacts to S3, saving the
state file) goes to a small thread pool so request handling never waits on it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from worker.simulator import delivery, features
from worker.simulator.config import SimulatorConfig
from worker.simulator.gate import RequestLimit, Tokens
from worker.simulator.grids import GRIDS
from worker.simulator.jobs import DONE, FAILED, PROCESSING, STOPPED, SimJob
from worker.simulator.store import Store

logger = logging.getLogger(__name__)

_SECRET_FIELDS = {"accessKey", "secretAccessKey", "credentials"}
_SAVE_SHARE_INVERSE = 10.0  # a save waits ten times its own duration before the next one
_MASK = "*****"  # §4.1: the captured live task shows credentials masked


class Simulator:
    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.tokens = Tokens()
        self.limit = RequestLimit()
        self.dice = random.Random(config.seed)
        self.stats: Counter[str] = Counter()
        self.s3 = delivery.S3()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sim-io")
        self._deliverers: dict[str, asyncio.Task[None]] = {}
        self._wake: dict[str, asyncio.Event] = {}
        self._resolving: dict[str, asyncio.Future[None]] = {}
        self._dirty = asyncio.Event()
        self._saver: asyncio.Task[None] | None = None
        path = config.state_file
        if path is not None and path.exists():
            self.store = Store.load(path)
            logger.info("loaded %d batch requests from %s", len(self.store.order), path)
        else:
            self.store = Store(str(uuid.uuid4()), str(uuid.uuid4()))
            self.store.seed_history(config.history, time.time())

    # --- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        if self.config.state_file is not None:
            self._saver = asyncio.get_running_loop().create_task(self._save_loop())
        now = time.time()
        for job in self.store.order:
            if job.barrier is not None or (job.features and job.status(now) not in {DONE, FAILED}):
                self._deliver(job)

    async def close(self) -> None:
        for task in [*self._deliverers.values(), *([self._saver] if self._saver else [])]:
            task.cancel()
        await asyncio.gather(*self._deliverers.values(), return_exceptions=True)
        if self.config.state_file is not None:
            await asyncio.get_running_loop().run_in_executor(
                self.pool, self.store.save, self.config.state_file
            )
        self.pool.shutdown(wait=True)

    def configure(self, changes: dict[str, Any]) -> SimulatorConfig:
        """Apply run-time changes (validated as a whole; invalid changes change nothing)."""
        merged = {**self.config.model_dump(), **changes}
        self.config = SimulatorConfig.model_validate(merged)
        return self.config

    def changed(self) -> None:
        self._dirty.set()

    # --- requests -------------------------------------------------------------------------
    def create(self, payload: dict[str, Any], now: float) -> SimJob:
        request = _with_defaults(payload)
        outcome = features.decide_outcome(request.get("description") or "", self.config, self.dice)
        job = SimJob(
            id=str(uuid.uuid4()),
            request=request,
            created=now,
            account_id=self.store.account_id,
            project_id=self.store.project_id,
            outcome=outcome,
        )
        job.pu_per_feature = features.pu_per_feature(request)
        self.store.add(job)
        self.changed()
        return job

    def visible(self, job_id: str, now: float) -> SimJob | None:
        """The job, unless unknown or still inside the read-after-create window (§3.3)."""
        job = self.store.jobs.get(job_id)
        if job is None or now - job.created < self.config.not_found_after_create:
            return None
        return job

    async def prepare_analysis(self, job: SimJob) -> None:
        """Work out the job's features once (off the loop: may read S3)."""
        if job.features is not None or job.analysis_error is not None:
            return
        pending = self._resolving.get(job.id)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._resolving[job.id] = pending
            try:
                await self._resolve(job)
            finally:
                del self._resolving[job.id]
                pending.set_result(None)
        else:
            await pending

    async def _resolve(self, job: SimJob) -> None:
        download = self.s3.download if self.config.write_artifacts else None
        try:
            found = await asyncio.get_running_loop().run_in_executor(
                self.pool,
                features.resolve_features,
                job.request,
                job.outcome,
                self.config,
                download,
            )
        except ValueError as exc:
            job.features, job.analysis_error = [], str(exc)
            return
        job.features = found
        job.feature_count = len(found)
        job.fatal_indices = features.fatal_indices(
            [feature.name for feature in found],
            job.outcome,
            self._attempts_before(job),
            seed=self.config.seed,
            dice=self.dice,
        )
        if job.outcome.fail_analysis:
            job.analysis_error = "Failed to validate evalscript: evaluatePixel threw an error."

    def _attempts_before(self, job: SimJob) -> Callable[[str], int]:
        """How many earlier requests processed a feature of this name to the same output
        (its attempt: a follow-up over FATAL features writes to the first request's paths).
        Counted only when a die asks: it reads every earlier request."""
        counts: Counter[tuple[str, str]] | None = None

        def attempts(name: str) -> int:
            nonlocal counts
            if counts is None:
                counts = Counter()
                for other in self.store.order:
                    if other is job:
                        break
                    if other.features and any(p.status == PROCESSING for p in other.phases):
                        for feature in other.features:
                            counts[_feature_output(other, feature.name)] += 1
            return counts[_feature_output(job, name)]

        return attempts

    def after_action(self, job: SimJob) -> None:
        """Hold the status at analysis end until the manifest is up; wake the deliverer."""
        if self._artifacts_for(job) is not None and job.analysis_error is None:
            end = job.analysis_end
            if end is not None and end > time.time() and job.id not in self._deliverers:
                job.hold(end, time.time())
            self._deliver(job)
        self.changed()

    # --- artifacts (§8) -----------------------------------------------------------------------
    def _artifacts_for(self, job: SimJob) -> tuple[str, str, str] | None:
        if not self.config.write_artifacts or not job.features:
            return None
        return delivery.keys(job.request, job.id)

    def _deliver(self, job: SimJob) -> None:
        running = self._deliverers.get(job.id)
        # A loop that has returned but whose done callback has not run yet cannot be woken:
        # a START in that gap (a restart right after the stop's upload) needs a new one.
        if running is not None and not running.done():
            self._wake[job.id].set()
            return
        self._wake[job.id] = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._delivery_loop(job))
        self._deliverers[job.id] = task
        task.add_done_callback(lambda done: self._forget(job.id, done))

    def _forget(self, job_id: str, task: asyncio.Task[None]) -> None:
        if self._deliverers.get(job_id) is task:  # not the loop that replaced it
            self._deliverers.pop(job_id, None)
            self._wake.pop(job_id, None)

    async def _delivery_loop(self, job: SimJob) -> None:
        targets = self._artifacts_for(job)
        if targets is None:
            job.hold(None, time.time())
            return
        bucket, manifest_key, execution_key = targets
        loop = asyncio.get_running_loop()
        manifest_up = final_up = False
        written: tuple[str, int] | None = None
        while True:
            now = time.time()
            end = job.analysis_end
            if not manifest_up:
                if end is None or job.analysis_error is not None:
                    job.hold(None, now)
                    return
                if now >= end:
                    manifest = await loop.run_in_executor(self.pool, self._manifest(job))
                    await self._upload(loop, job, bucket, manifest_key, manifest)
                    manifest_up = True
                    continue
            else:
                done_at = job.done_at()
                job.hold(done_at if done_at is not None and not final_up else None, now)
                status = job.status(now)
                if status in {PROCESSING, DONE, STOPPED}:
                    rows = job.feature_rows(now)
                    state = (status, sum(1 for row in rows if row[2] != "PENDING"))
                    if state != written:
                        body = await loop.run_in_executor(
                            self.pool, delivery.execution_db_bytes, rows
                        )
                        await self._upload(loop, job, bucket, execution_key, body)
                        written = state
                    if done_at is not None and not final_up and now >= done_at - 1e-3:
                        final_up = True  # the last database is up: DONE may show
                        continue
                    # Ended, unless an action scheduled more: after a restart's START the
                    # request still shows STOPPED for the status lag, and the run that
                    # follows writes its databases too.
                    if status in {DONE, STOPPED} and job.next_change(now) is None:
                        job.hold(None, now)
                        return
            await self._sleep(job, now)

    async def _sleep(self, job: SimJob, now: float) -> None:
        interval = self.config.scaled(self.config.execution_db_interval)
        wake_at = min(
            x
            for x in (
                job.next_change(now),
                job.barrier,
                now + interval,
                job.analysis_end if job.analysis_end and job.analysis_end > now else None,
            )
            if x is not None
        )
        try:
            await asyncio.wait_for(self._wake[job.id].wait(), max(0.0, wake_at - now) + 0.001)
        except TimeoutError:
            return
        self._wake[job.id].clear()

    def _manifest(self, job: SimJob) -> Callable[[], bytes]:
        """The manifest's making, its inputs taken now: it runs off the loop (a GeoPackage
        takes tens of ms, and hundreds of jobs ending their analysis together would hold
        every API answer and status behind them)."""
        spec = job.request["input"]
        if spec["type"] == "tiling-grid":
            pixels = GRIDS[spec["id"]].tile_pixels(float(spec["resolution"]))
        else:
            pixels = int((spec.get("defaults") or {}).get("width") or 1000)
        request, request_id, features = copy.deepcopy(job.request), job.id, list(job.features or [])
        return lambda: delivery.manifest_bytes(request, request_id, features, pixels)

    async def _upload(
        self, loop: asyncio.AbstractEventLoop, job: SimJob, bucket: str, key: str, body: bytes
    ) -> None:
        try:
            await loop.run_in_executor(
                self.pool, self.s3.put, bucket, key, body, "application/octet-stream"
            )
        except Exception as exc:  # noqa: BLE001 - an unwritable bucket must not wedge the job
            logger.warning(
                "cannot write s3://%s/%s for %s: %s", bucket, key, job.id, type(exc).__name__
            )

    # --- persistence ---------------------------------------------------------------------------
    async def _save_loop(self) -> None:
        path = self.config.state_file
        assert path is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            began = time.monotonic()
            await loop.run_in_executor(self.pool, self.store.save, path)
            # At most one save a second, and a slow one (many requests) at most a tenth of
            # the time: the save holds the GIL, and the requests it delays are the point.
            spent = time.monotonic() - began
            await asyncio.sleep(max(1.0, _SAVE_SHARE_INVERSE * spent))


def _feature_output(job: SimJob, name: str) -> tuple[str, str]:
    """Where a feature's first output lands: a re-run of it lands on the same path."""
    first = job.request["processRequest"]["output"]["responses"][0]
    path = delivery.output_path(
        job.request, job.id, name, first["identifier"], first["format"]["type"]
    )
    return path, name


def _with_defaults(payload: dict[str, Any]) -> dict[str, Any]:
    """The request as the API echoes it (§4.1): defaults filled in, credentials masked."""
    request = copy.deepcopy(payload)
    request.setdefault("instanceType", "normal")
    output = request["output"]
    if output.get("type") == "raster":
        for flag in ("overwrite", "skipExisting", "cogOutput", "createCollection"):
            output.setdefault(flag, False)
    _mask(request)
    return request


def _mask(node: Any) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _SECRET_FIELDS and isinstance(value, str):
                node[key] = _MASK
            else:
                _mask(value)
    elif isinstance(node, list):
        for item in node:
            _mask(item)
