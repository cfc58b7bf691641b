"""Re-runs of FATAL features (worker/lifecycle/followups.py and its steps in the machine)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from lifecycle_support import RID, T0, Run, at, task

from worker.lifecycle import (
    CancelRequested,
    Create,
    CreateRefused,
    CreateSucceeded,
    Echo,
    JobError,
    JobState,
    Phase,
    Policy,
    ReadTiles,
    RetryInputFailed,
    RetryInputWritten,
    TaskSeen,
    Tiles,
    TilesSeen,
    Wake,
    WriteRetryInput,
    attempt_tag,
    new_job,
    request_tag,
    tag_for,
    total_cost,
)
from worker.lifecycle.followups import (
    RETRY_COST_LIMIT,
    RETRY_UNSUPPORTED,
    batch_requests,
    follow_up_request,
)

POLICY = Policy(tiles_wait=timedelta(seconds=5), list_lag_window=timedelta(seconds=6))
INPUT = f"s3://bucket/out/{RID}/failedFeatures-{RID}.gpkg"


def request(output_type: str = "raster", url: str = "s3://bucket/out") -> dict[str, Any]:
    return {
        "description": "fields [sim:fatal=3]",
        "input": {"type": "tiling-grid", "id": 0, "resolution": 60.0},
        "processRequest": {"evalscript": "x"},
        "output": {
            "type": output_type,
            "delivery": {"s3": {"url": url, "iamRoleARN": "arn:aws:iam::1:role/r"}},
        },
    }


def retrying_job(attempts: int = 1, **changes: Any) -> JobState:
    return new_job(
        job_id="fields",
        fleet_id="default",
        request=changes.pop("payload", request()),
        adopt_id=None,
        request_hash="h",
        auto_start=True,
        deadline=None,
        max_cost_pu=changes.pop("max_cost_pu", None),
        echo=Echo(),
        now=T0,
        retry_failed=attempts,
    )


def to_done(run: Run, rid: str, *, cost: float, tiles: Tiles, now: datetime) -> None:
    """Create (or find) ``rid``, process it and read it DONE with ``tiles`` held for."""
    run.feed(CreateSucceeded(task("CREATED", id=rid, created=now)), now)
    run.feed(TaskSeen(task("PROCESSING", id=rid, completion_percentage=50.0)), now)
    t = run.feed(TaskSeen(task("DONE", id=rid, cost_pu=cost, completion_percentage=100.0)), now)
    assert ReadTiles(rid, execution_db=True) in t.actions
    run.feed(TilesSeen(tiles), now)


def test_fatal_features_make_one_follow_up_and_the_job_ends_once() -> None:
    run = Run(retrying_job(attempts=1), POLICY)
    assert run.feed(Wake(), at(0)).actions == (Create(),)
    to_done(run, RID, cost=120.0, tiles=Tiles(total=10, processed=7, failed=3), now=at(10))
    last = run.transitions[-1]
    assert last.actions == (WriteRetryInput(RID, 1),)
    assert run.state.phase is Phase.TRACKING and run.state.status == "PROCESSING"
    assert not last.emits  # the end is held: the job is not over

    t = run.feed(RetryInputWritten(url=INPUT, features=3), at(11))
    assert t.actions == (Create(),)  # a first POST for the attempt; its intent is saved first
    s = t.state
    assert s.phase is Phase.PENDING_CREATE and s.intent_at == at(11)
    assert s.request is not None and s.request["input"]["type"] == "geopackage"
    assert s.request["input"]["features"]["s3"] == {
        "url": INPUT,
        "iamRoleARN": "arn:aws:iam::1:role/r",
    }
    url = s.request["output"]["delivery"]["s3"]["url"]
    assert url == f"s3://bucket/out/{RID}/<tileName>/<outputId>.<format>"
    assert s.request["output"]["overwrite"] is True
    tag = attempt_tag("default", "fields", 1)
    assert request_tag(s) == tag and tag != tag_for("default", "fields")
    assert s.request["description"] == f"fields [sim:fatal=3] {tag}"
    assert total_cost(s) == 120.0

    follow = "follow-up-1"
    t = run.feed(CreateSucceeded(task("CREATED", id=follow, created=at(12))), at(12))
    assert [e.kind for e in t.emits] == ["progress"]  # names the follow-up
    assert t.state.batch_request_id == follow and t.state.status == "PROCESSING"
    t = run.feed(TaskSeen(task("ANALYSIS_DONE", id=follow)), at(13))
    assert t.state.status == "PROCESSING"  # a follow-up's early statuses are the job's
    run.feed(TaskSeen(task("PROCESSING", id=follow, cost_pu=20.0)), at(14))
    run.feed(TilesSeen(Tiles(total=3, processed=1, failed=0)), at(14))
    assert run.state.tiles == Tiles(total=10, processed=8, failed=2)
    run.feed(TaskSeen(task("DONE", id=follow, cost_pu=40.0, completion_percentage=100.0)), at(15))
    t = run.feed(TilesSeen(Tiles(total=3, processed=3, failed=0)), at(16))
    s = t.state
    assert s.phase is Phase.ENDED and s.status == "DONE" and [e.kind for e in t.emits] == ["status"]
    assert s.tiles == Tiles(total=10, processed=10, failed=0)
    assert total_cost(s) == 160.0
    rows = batch_requests(s)
    assert [(r["batch_request_id"], r["attempt"], r["features"]) for r in rows] == [
        (RID, 0, None),
        (follow, 1, 3),
    ]
    assert rows[0]["failed"] == 3 and rows[1]["processed"] == 3 and rows[1]["status"] == "DONE"
    terminal = [e for t in run.transitions for e in t.emits if t.state.phase is Phase.ENDED]
    assert len(terminal) == 1


def test_without_retry_failed_the_job_ends_as_before() -> None:
    run = Run(retrying_job(attempts=0), POLICY)
    run.feed(Wake(), at(0))
    to_done(run, RID, cost=120.0, tiles=Tiles(total=10, processed=7, failed=3), now=at(10))
    assert run.state.phase is Phase.ENDED and run.state.status == "DONE"
    assert run.state.retry.skipped is None


def test_no_fatal_features_no_follow_up() -> None:
    run = Run(retrying_job(attempts=2), POLICY)
    run.feed(Wake(), at(0))
    to_done(run, RID, cost=120.0, tiles=Tiles(total=10, processed=10, failed=0), now=at(10))
    assert run.state.phase is Phase.ENDED and run.state.retry.attempt == 0


def test_an_unwritable_bucket_ends_the_job_as_today_with_the_reason() -> None:
    run = Run(retrying_job(), POLICY)
    run.feed(Wake(), at(0))
    to_done(run, RID, cost=120.0, tiles=Tiles(total=10, processed=7, failed=3), now=at(10))
    error = JobError(source="worker", code="RETRY_INPUT_NOT_WRITTEN", message="AccessDenied")
    t = run.feed(RetryInputFailed(error), at(11))
    assert t.state.phase is Phase.ENDED and t.state.status == "DONE"
    assert t.state.retry.skipped == error and t.state.error is None
    assert t.state.tiles == Tiles(total=10, processed=7, failed=3)


def test_a_lost_answer_is_asked_for_again_and_a_cancel_waits_for_it() -> None:
    run = Run(retrying_job(), POLICY)
    run.feed(Wake(), at(0))
    to_done(run, RID, cost=120.0, tiles=Tiles(total=10, processed=7, failed=3), now=at(10))
    # A crash between writing the GeoPackage and saving: the next owner's Wake asks again.
    assert run.feed(Wake(), at(30)).actions == (WriteRetryInput(RID, 1),)
    t = run.feed(CancelRequested(), at(31))
    assert t.state.phase is Phase.TRACKING and not t.emits
    t = run.feed(RetryInputWritten(url=INPUT, features=3), at(32))
    # Cancelled meanwhile: nothing is created, the job ends as its last request did.
    assert t.state.phase is Phase.ENDED and t.state.status == "DONE" and not t.actions
    assert t.state.batch_request_id == RID


def test_a_crash_after_the_intent_scans_for_the_attempts_tag() -> None:
    run = Run(retrying_job(), POLICY)
    run.feed(Wake(), at(0))
    to_done(run, RID, cost=120.0, tiles=Tiles(total=10, processed=7, failed=3), now=at(10))
    run.feed(RetryInputWritten(url=INPUT, features=3), at(11))
    # The POST may have landed before the crash: scan only, within the list-lag window...
    t = run.feed(Wake(), at(13))
    assert t.actions == (Create(search_since=at(11) - POLICY.clock_skew, create_not_before=at(17)),)
    assert t.state.create_doubtful
    # ... and a request found by the attempt's tag is the follow-up.
    t = run.feed(CreateSucceeded(task("CREATED", id="found", created=at(11)), found=True), at(14))
    assert t.state.batch_request_id == "found" and t.state.retry.attempt == 1


def test_a_refused_follow_up_ends_the_job_as_its_last_request_ended() -> None:
    run = Run(retrying_job(), POLICY)
    run.feed(Wake(), at(0))
    to_done(run, RID, cost=120.0, tiles=Tiles(total=10, processed=7, failed=3), now=at(10))
    run.feed(RetryInputWritten(url=INPUT, features=3), at(11))
    refusal = JobError(source="api", http_status=400, code="COMMON_BAD_PAYLOAD", message="no")
    t = run.feed(CreateRefused(refusal), at(12))
    assert t.state.phase is Phase.ENDED and t.state.status == "DONE"
    assert t.state.batch_request_id == RID and t.state.error is None
    assert t.state.retry.skipped == refusal and total_cost(t.state) == 120.0


def test_the_cost_cap_covers_every_attempt() -> None:
    run = Run(retrying_job(max_cost_pu=150.0), POLICY)
    run.feed(Wake(), at(0))
    to_done(run, RID, cost=120.0, tiles=Tiles(total=10, processed=7, failed=3), now=at(10))
    run.feed(RetryInputWritten(url=INPUT, features=3), at(11))
    run.feed(CreateSucceeded(task("CREATED", id="f1", created=at(12))), at(12))
    t = run.feed(TaskSeen(task("PROCESSING", id="f1", cost_pu=31.0)), at(13))
    assert t.state.stop_reason is not None and t.state.stop_reason.value == "COST_LIMIT"
    # Spent already: no follow-up is made at all.
    run = Run(retrying_job(max_cost_pu=100.0), POLICY)
    run.feed(Wake(), at(0))
    to_done(run, RID, cost=100.0, tiles=Tiles(total=10, processed=7, failed=3), now=at(10))
    assert run.state.phase is Phase.ENDED
    assert run.state.retry.skipped is not None
    assert run.state.retry.skipped.code == RETRY_COST_LIMIT


def test_zarr_and_adopted_jobs_are_not_re_run() -> None:
    run = Run(retrying_job(payload=request("zarr")), POLICY)
    run.feed(Wake(), at(0))
    to_done(run, RID, cost=120.0, tiles=Tiles(total=10, processed=7, failed=3), now=at(10))
    assert run.state.phase is Phase.ENDED and run.state.retry.skipped is not None
    assert run.state.retry.skipped.code == RETRY_UNSUPPORTED


def test_a_template_keeps_its_own_shape_with_the_first_id_pinned() -> None:
    payload = request(url="s3://b/data/<requestId>/<tileName>.<format>")
    out = follow_up_request(payload, first_request_id="r0", input_url="s3://b/x.gpkg", tag="bwT")
    assert out["output"]["delivery"]["s3"]["url"] == "s3://b/data/r0/<tileName>.<format>"
    assert payload["output"]["delivery"]["s3"]["url"].endswith("<requestId>/<tileName>.<format>")
    assert payload["input"]["type"] == "tiling-grid"  # the job's own payload is left alone


# -- properties ---------------------------------------------------------------------------

TOTAL = 12


@settings(max_examples=150, deadline=None)
@given(
    attempts=st.integers(0, 3),
    first_failed=st.integers(0, TOTAL),
    recovered=st.lists(st.floats(0, 1), min_size=3, max_size=3),
    lost=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_features_are_counted_once_and_the_job_ends_once(
    attempts: int, first_failed: int, recovered: list[float], lost: list[bool]
) -> None:
    """Whatever each attempt recovers, and with answers lost to crashes on the way."""
    run = Run(retrying_job(attempts=attempts), POLICY)
    now = T0
    run.feed(Wake(), now)
    to_done(
        run,
        RID,
        cost=100.0,
        tiles=Tiles(total=TOTAL, processed=TOTAL - first_failed, failed=first_failed),
        now=now,
    )
    failed, made = first_failed, 0
    seen_processed = [run.state.tiles.processed if run.state.tiles else 0]
    while run.state.phase is not Phase.ENDED:
        now += timedelta(seconds=30)
        if lost[made]:
            assert run.feed(Wake(), now).actions == (
                WriteRetryInput(run.state.batch_request_id or "", made + 1),
            )
        run.feed(RetryInputWritten(url=INPUT, features=failed), now)
        made += 1
        rid = f"follow-{made}"
        done_now = round(failed * recovered[made - 1])
        to_done(
            run,
            rid,
            cost=10.0,
            tiles=Tiles(total=failed, processed=done_now, failed=failed - done_now),
            now=now,
        )
        failed -= done_now
        seen_processed.append(run.state.tiles.processed if run.state.tiles else 0)
    s = run.state
    assert made == (min(attempts, _needed(first_failed, recovered)) if first_failed else 0)
    assert s.tiles == Tiles(total=TOTAL, processed=TOTAL - failed, failed=failed)
    assert seen_processed == sorted(seen_processed)
    assert total_cost(s) == 100.0 + 10.0 * made
    assert [r["attempt"] for r in batch_requests(s)] == list(range(made + 1))
    ended = [t for t in run.transitions if t.state.phase is Phase.ENDED and t.emits]
    assert len(ended) == 1 and ended[0].emits[0].kind == "status"
    sequences = [e.sequence for t in run.transitions for e in t.emits]
    assert sequences == list(range(1, len(sequences) + 1))


def _needed(first_failed: int, recovered: list[float]) -> int:
    """Follow-ups made until none is FATAL (unbounded attempts)."""
    failed, made = first_failed, 0
    while failed and made < len(recovered):
        failed -= round(failed * recovered[made])
        made += 1
    return made
