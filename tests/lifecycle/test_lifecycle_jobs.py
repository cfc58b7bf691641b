"""A job's payload keeps its credentials only while a create may still send them."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from lifecycle_support import Run, at, job, task

from worker.lifecycle import (
    CancelRequested,
    CreateRefused,
    CreateSucceeded,
    CreateUncertain,
    JobError,
    Phase,
    TaskSeen,
    Wake,
)
from worker.lifecycle.jobs import holds_credentials, without_credentials
from worker.lifecycle.state import Retry

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
S3 = {"url": "s3://bucket/out", "accessKey": "AKIAIOSFODNN7EXAMPLE", "secretAccessKey": SECRET}
PAYLOAD: dict[str, Any] = {
    "description": "Max NDVI",
    "input": {"type": "geopackage", "features": {"s3": dict(S3, url="s3://bucket/in.gpkg")}},
    "output": {"type": "raster", "delivery": {"s3": S3}},
}


def test_the_keys_stay_through_uncertain_creates_and_go_once_the_request_is_known() -> None:
    run = Run(job(request=PAYLOAD))
    run.feed(Wake(), at(0))
    run.feed(CreateUncertain("read timeout"), at(30))
    assert SECRET in str(run.state.request)  # the retry must send them again
    run.feed(CreateSucceeded(task("CREATED")), at(90))
    assert run.state.phase is Phase.TRACKING
    assert SECRET not in run.state.model_dump_json()
    assert not holds_credentials(run.state.request)
    # What the tile reader needs stays: the delivery location.
    assert run.state.request is not None
    assert run.state.request["output"]["delivery"]["s3"] == {"url": "s3://bucket/out"}
    assert run.state.request["description"].startswith("Max NDVI")


def test_a_job_that_may_make_follow_ups_keeps_the_keys_until_it_ends() -> None:
    # A follow-up over FATAL features is created from the job's own payload.
    run = Run(job(request=PAYLOAD).model_copy(update={"retry": Retry(attempts=1)}))
    run.feed(Wake(), at(0))
    run.feed(CreateSucceeded(task("CREATED")), at(1))
    assert run.state.phase is Phase.TRACKING
    assert SECRET in run.state.model_dump_json()
    run.feed(CancelRequested(), at(2))
    run.feed(TaskSeen(task("STOPPED", stopped_reason="USER_ACTION")), at(200))
    assert run.state.phase is Phase.ENDED
    assert SECRET not in run.state.model_dump_json()


def test_a_job_that_ends_before_any_request_keeps_no_key() -> None:
    refused = Run(job(request=PAYLOAD))
    refused.feed(Wake(), at(0))
    error = JobError(source="api", http_status=400, code="BAD", message="no")
    refused.feed(CreateRefused(error), at(1))
    cancelled = Run(job(request=PAYLOAD))
    cancelled.feed(CancelRequested(), at(0))
    for run in (refused, cancelled):
        assert run.state.phase is Phase.ENDED
        assert SECRET not in run.state.model_dump_json()


json_ = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["url", "accessKey", "secretAccessKey", "credentials", "a", "b"]),
            inner,
            max_size=4,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(value=json_)
def test_without_credentials_drops_every_credential_and_nothing_else(value: Any) -> None:
    kept = without_credentials(value)
    assert not holds_credentials(kept)
    assert without_credentials(kept) == kept
    if not holds_credentials(value):
        assert kept == value
