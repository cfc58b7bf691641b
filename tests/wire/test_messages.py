"""Job-request parsing (CONTRACT.md "Job requests") and the request hash."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.lifecycle import ResumeOn, UnhealthyRule
from worker.wire.job_requests import (
    SCHEMA_VERSION,
    JobRequest,
    RejectCode,
    Rejection,
    parse_job_request,
    request_hash,
    request_hash_v1,
    same_request,
)
from worker.wire.request_parsing import _parse_fully, _parse_quickly

PAYLOAD = {
    "processRequest": {"input": {}, "output": {}, "evalscript": "//VERSION=3"},
    "input": {"type": "tiling-grid", "id": 0, "resolution": 60.0},
    "output": {
        "type": "raster",
        "delivery": {
            "s3": {
                "url": "s3://bucket/prefix",
                "accessKey": "AKIAEXAMPLEKEY",
                "secretAccessKey": "wJalrXUtnFEMI-very-secret",
            }
        },
    },
}


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def parse(**fields: Any) -> JobRequest | Rejection:
    return parse_job_request(body(**fields), "application/json")


def accepted(result: JobRequest | Rejection) -> JobRequest:
    assert isinstance(result, JobRequest), result
    return result


def rejected(result: JobRequest | Rejection) -> Rejection:
    assert isinstance(result, Rejection), result
    return result


# --- what is taken ---------------------------------------------------------------------------


def test_the_contract_example_parses_with_its_values() -> None:
    req = accepted(
        parse(
            schema_version=1,
            job_id="corsica-ndvi-2019-q2",
            action="submit",
            request=PAYLOAD,
            auto_start=True,
            deadline="2026-12-01T00:00:00Z",
            max_cost_pu=5000,
        )
    )
    assert req.job_id == "corsica-ndvi-2019-q2"
    assert req.request == PAYLOAD
    assert req.deadline == datetime(2026, 12, 1, tzinfo=UTC)
    assert req.max_cost_pu == 5000.0


def test_defaults_make_a_minimal_submit() -> None:
    req = accepted(parse(job_id="j", request={}))
    assert (req.schema_version, req.action, req.auto_start) == (SCHEMA_VERSION, "submit", True)
    assert (req.batch_request_id, req.deadline, req.max_cost_pu) == (None, None, None)


def test_cost_guard_is_spent_or_forecast_and_absent_by_default() -> None:
    assert accepted(parse(job_id="j", request={})).cost_guard is None
    for guard in ("spent", "forecast"):
        assert accepted(parse(job_id="j", request={}, cost_guard=guard)).cost_guard == guard


def test_adopting_an_existing_batch_request_needs_no_payload() -> None:
    rid = "6aa8765a-e9eb-4dd0-a567-b86cfdb840e0"
    req = accepted(parse(job_id="j", batch_request_id=rid, request=None))
    assert req.batch_request_id == rid
    assert req.request is None


def test_unknown_top_level_fields_are_ignored() -> None:
    req = accepted(parse(job_id="j", request={}, priority="high", labels={"a": 1}))
    assert "priority" not in req.model_dump()


@pytest.mark.parametrize("action", ["start", "cancel", "resume"])
def test_start_and_cancel_ignore_submit_fields_even_malformed(action: str) -> None:
    req = accepted(
        parse(
            job_id="j",
            action=action,
            request="not an object",
            max_cost_pu=-1,
            deadline=3,
            resume_on="no",
        )
    )
    assert req.action == action
    assert (req.request, req.max_cost_pu, req.deadline, req.resume_on) == (None,) * 4


def test_resume_on_takes_both_rules_on_either_reading() -> None:
    rules = {"UNHEALTHY": {"attempts": 2}, "OUT_OF_PU": {"until": "2026-12-01T00:00:00Z"}}
    raw = body(job_id="j", request=PAYLOAD, resume_on=rules)
    for req in (accepted(_parse_quickly(raw, None)), accepted(_parse_fully(raw, None))):
        assert req.resume_on is not None
        assert req.resume_on.UNHEALTHY is not None and req.resume_on.UNHEALTHY.attempts == 2
        assert req.resume_on.OUT_OF_PU is not None
        assert req.resume_on.OUT_OF_PU.until == datetime(2026, 12, 1, tzinfo=UTC)
    parked = accepted(parse(job_id="j", request=PAYLOAD, resume_on={"OUT_OF_PU": {}}))
    assert parked.resume_on is not None and parked.resume_on.OUT_OF_PU is not None
    assert parked.resume_on.OUT_OF_PU.until is None and parked.resume_on.UNHEALTHY is None


@pytest.mark.parametrize(
    "rules",
    [
        {"USER_ACTION": {}},
        {"UNHEALTHY": {"attempts": 0}},
        {"UNHEALTHY": {}},
        {"UNHEALTHY": {"attempts": 1, "every": 5}},
        {"OUT_OF_PU": {"until": "2026-12-01T00:00:00"}},  # no time zone
        [],
    ],
)
def test_bad_resume_rules_are_refused_naming_the_field(rules: Any) -> None:
    refusal = rejected(parse(job_id="j", request=PAYLOAD, resume_on=rules))
    assert refusal.code == RejectCode.INVALID_FIELD
    assert refusal.message.startswith("field 'resume_on'")


@pytest.mark.parametrize(
    "content_type",
    [None, "", "application/json", "Application/JSON", "application/json; charset=utf-8"],
)
def test_json_content_types_and_none_are_taken(content_type: str | None) -> None:
    accepted(parse_job_request(body(job_id="j", request={}), content_type))


def test_a_utf8_bom_and_non_ascii_text_are_taken() -> None:
    raw = "\ufeff" + json.dumps({"job_id": "j", "request": {"description": "Île de Beauté"}})
    req = accepted(parse_job_request(raw.encode("utf-8"), None))
    assert req.request == {"description": "Île de Beauté"}


@pytest.mark.parametrize("job_id", ["a", "A.b_c-d:9", "x" * 128])
def test_job_id_limits_that_pass(job_id: str) -> None:
    assert accepted(parse(job_id=job_id, request={})).job_id == job_id


# --- what is refused -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", RejectCode.MALFORMED_JSON),
        (b"\xff\xfe{}", RejectCode.MALFORMED_JSON),
        (b'{"job_id": "j", "max_cost_pu": NaN, "request": {}}', RejectCode.MALFORMED_JSON),
        # Deep in an otherwise valid request, where pydantic's own parser would take it.
        (b'{"job_id": "j", "request": {"a": [-Infinity]}}', RejectCode.MALFORMED_JSON),
        (b'{"job_id": "j", "request": {"a": {"b": NaN}}}', RejectCode.MALFORMED_JSON),
        (b"", RejectCode.MALFORMED_JSON),
        (b"[]", RejectCode.NOT_AN_OBJECT),
        (b'"job"', RejectCode.NOT_AN_OBJECT),
        (b"null", RejectCode.NOT_AN_OBJECT),
    ],
)
def test_bodies_that_are_not_a_json_object(raw: bytes, code: RejectCode) -> None:
    rejection = rejected(parse_job_request(raw, "application/json"))
    assert rejection.code == code
    assert (rejection.job_id, rejection.action) == (None, None)


@pytest.mark.parametrize("job_id", [None, "", "x" * 129, "with space", "a/b", "é", 42, ["j"]])
def test_unusable_job_ids(job_id: Any) -> None:
    fields = {"request": {}} if job_id is None else {"job_id": job_id, "request": {}}
    rejection = rejected(parse(**fields))
    assert rejection.code == RejectCode.INVALID_JOB_ID
    assert rejection.job_id is None
    assert "job_id" in rejection.message


@pytest.mark.parametrize(
    ("fields", "code", "names"),
    [
        ({"action": "destroy"}, RejectCode.UNKNOWN_ACTION, "action"),
        ({"action": 1}, RejectCode.UNKNOWN_ACTION, "action"),
        ({}, RejectCode.MISSING_REQUEST, "request"),
        ({"request": None}, RejectCode.MISSING_REQUEST, "request"),
        ({"request": {}, "batch_request_id": "b"}, RejectCode.CONFLICTING_FIELDS, "request"),
        ({"request": {}, "schema_version": 2}, RejectCode.UNSUPPORTED_SCHEMA_VERSION, "schema"),
        ({"request": {}, "schema_version": 0}, RejectCode.INVALID_FIELD, "schema_version"),
        ({"request": {}, "schema_version": "1"}, RejectCode.INVALID_FIELD, "schema_version"),
        ({"request": []}, RejectCode.INVALID_FIELD, "request"),
        ({"request": {}, "max_cost_pu": 0}, RejectCode.INVALID_FIELD, "max_cost_pu"),
        ({"request": {}, "max_cost_pu": True}, RejectCode.INVALID_FIELD, "max_cost_pu"),
        ({"request": {}, "max_cost_pu": "5000"}, RejectCode.INVALID_FIELD, "max_cost_pu"),
        ({"request": {}, "cost_guard": "maybe"}, RejectCode.INVALID_FIELD, "cost_guard"),
        ({"request": {}, "cost_guard": 1}, RejectCode.INVALID_FIELD, "cost_guard"),
        ({"request": {}, "deadline": "2026-12-01T00:00:00"}, RejectCode.INVALID_FIELD, "deadline"),
        ({"request": {}, "deadline": 1_790_000_000}, RejectCode.INVALID_FIELD, "deadline"),
        ({"request": {}, "deadline": "tomorrow"}, RejectCode.INVALID_FIELD, "deadline"),
        ({"request": {}, "auto_start": "yes"}, RejectCode.INVALID_FIELD, "auto_start"),
        ({"batch_request_id": ""}, RejectCode.INVALID_FIELD, "batch_request_id"),
    ],
)
def test_field_problems_have_their_code_and_name_the_field(
    fields: dict[str, Any], code: RejectCode, names: str
) -> None:
    rejection = rejected(parse(job_id="job-1", **fields))
    assert rejection.code == code
    assert names in rejection.message
    assert rejection.job_id == "job-1"


def test_a_newer_schema_version_wins_over_other_problems() -> None:
    rejection = rejected(parse(job_id="j", schema_version=2, action="teleport"))
    assert rejection.code == RejectCode.UNSUPPORTED_SCHEMA_VERSION


def test_rejection_action_is_only_ever_a_known_action() -> None:
    assert rejected(parse(job_id="j", action="destroy")).action is None
    assert rejected(parse(job_id="j")).action == "submit"
    assert rejected(parse(job_id="j", action="start", schema_version=9)).action == "start"


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/xml", "application/json; charset=latin-1"]
)
def test_other_content_types_are_refused_but_the_job_id_is_read(content_type: str) -> None:
    rejection = rejected(parse_job_request(body(job_id="j", request={}), content_type))
    assert rejection.code == RejectCode.UNSUPPORTED_CONTENT_TYPE
    assert (rejection.job_id, rejection.action) == ("j", "submit")


def test_a_rejection_never_echoes_values() -> None:
    secret = "wJalrXUtnFEMI-very-secret"
    for fields in (
        {"request": {}, "max_cost_pu": secret},
        {"request": {}, "deadline": secret},
        {"request": secret},
        {"request": {}, "auto_start": secret},
        {"request": {}, "batch_request_id": secret},
    ):
        rejection = rejected(parse(job_id="j", **fields))
        assert secret not in rejection.message


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from(
    ["schema_version", "job_id", "action", "request", "batch_request_id", "auto_start",
     "deadline", "max_cost_pu", "cost_guard", "other"]
)  # fmt: skip


@settings(max_examples=120, deadline=None)
@given(st.dictionaries(field_names, json_values))
def test_any_json_object_is_parsed_or_rejected_never_raised(fields: dict[str, Any]) -> None:
    result = parse_job_request(json.dumps(fields).encode(), None)
    if isinstance(result, Rejection):
        assert isinstance(result.code, str) and result.message
        assert result.action in (None, "submit", "start", "cancel")
    else:
        assert result.job_id == fields["job_id"]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_are_parsed_or_rejected_never_raised(raw: bytes) -> None:
    assert isinstance(parse_job_request(raw, None), JobRequest | Rejection)


valid_requests = st.fixed_dictionaries(
    {
        "job_id": st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True),
        "request": st.dictionaries(st.text(), json_values, max_size=4),
    },
    optional={
        "action": st.sampled_from(["submit", "start", "cancel", "stop"]),
        "auto_start": st.booleans() | st.integers(0, 1),
        "deadline": st.sampled_from(["2026-12-01T00:00:00Z", "2026-12-01T00:00:00", 1764547200]),
        "max_cost_pu": st.floats() | st.integers(-1, 10**20),
        "schema_version": st.sampled_from([1, 1.0, 2, "1"]),
        "batch_request_id": st.none() | st.text(max_size=3),
    },
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(valid_requests, st.dictionaries(field_names, json_values)), st.booleans())
def test_the_quick_reading_agrees_with_the_full_one(fields: dict[str, Any], ascii: bool) -> None:
    raw = json.dumps(fields, ensure_ascii=ascii).encode()
    quick, full = _parse_quickly(raw, None), _parse_fully(raw, None)
    assert quick == full
    if isinstance(quick, JobRequest) and isinstance(full, JobRequest):
        # Same values down to a float's sign and the order of keys: the same hash and the
        # same payload sent to the API.
        assert request_hash(quick) == request_hash(full)
        assert json.dumps(quick.request) == json.dumps(full.request)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"job_id": "j", "job_id": "k", "request": {"b": 1, "a": 2, "b": 3}}',
        b'{"job_id": "j", "request": {"x": 1e400, "y": -0.0, "z": 123456789012345678901234567890}}',
        b'{"job_id": "j", "request": {"note": "NaN is only text here"}}',
        b'{"job_id": "j", "request": {"s": "\\ud800"}}',
        b'\xef\xbb\xbf{"job_id": "j", "request": {}}',
        b'{"job_id": "j", "request": {}} trailing',
        b'{"job_id": "j", "request": ' + b"[" * 300 + b"]" * 300 + b"}",
    ],
)
def test_bodies_at_the_edges_of_the_quick_reading(raw: bytes) -> None:
    assert _parse_quickly(raw, "application/json") == _parse_fully(raw, "application/json")


# --- the request hash --------------------------------------------------------------------------


def test_the_hash_ignores_key_order_offsets_and_fields_that_do_not_define_the_request() -> None:
    a = accepted(parse(job_id="a", request={"x": 1, "y": [1, 2]}, deadline="2026-12-01T00:00:00Z"))
    b = accepted(
        parse_job_request(
            b'{"deadline": "2026-12-01T01:00:00+01:00", "request": {"y": [1, 2], "x": 1},'
            b' "job_id": "b", "unknown": 1}',
            None,
        )
    )
    assert request_hash(a) == request_hash(b)
    version, digest = request_hash(a).split(":")
    assert version == "v2" and len(digest) == 64 and set(digest) <= set("0123456789abcdef")


@pytest.mark.parametrize(
    "change",
    [
        {"request": {"x": 2}},
        {"request": None, "batch_request_id": "b"},
        {"auto_start": False},
        {"deadline": datetime(2026, 12, 1, tzinfo=timezone(timedelta(hours=1)))},
        {"max_cost_pu": 10.0},
        {"retry_failed": 0},
        {"retry_failed": 2},
        {"resume_on": ResumeOn(UNHEALTHY=UnhealthyRule(attempts=1))},
        {"cost_guard": "forecast"},
        {"cost_guard": "spent"},
    ],
)
def test_the_hash_changes_with_each_field_that_defines_the_request(change: dict[str, Any]) -> None:
    base = JobRequest(job_id="j", request={"x": 1}, deadline=datetime(2026, 12, 1, tzinfo=UTC))
    assert request_hash(base) != request_hash(base.model_copy(update=change))


def test_version_1_is_json_dumps_text_as_it_always_was() -> None:
    # The bytes that workers before version 2 stored hashes of: these must never change.
    req = JobRequest(job_id="j", request={"b": [1, 2.5, "é"], "a": None}, auto_start=False)
    text = (
        '{"auto_start":false,"batch_request_id":null,"deadline":null,"max_cost_pu":null,'
        '"request":{"a":null,"b":[1,2.5,"é"]},"v":1}'
    )
    assert request_hash_v1(req) == hashlib.sha256(text.encode()).hexdigest()
    # A field added later joins the hashed text only when given, so those stay the same.
    assert request_hash_v1(req.model_copy(update={"cost_guard": None})) == request_hash_v1(req)


def test_retry_failed_is_a_submit_field_from_0_to_10() -> None:
    assert accepted(parse(job_id="a", request={}, retry_failed=3)).retry_failed == 3
    assert accepted(parse(job_id="a", request={})).retry_failed is None
    for bad in (-1, 11, "2", 1.5):
        rejection = parse(job_id="a", request={}, retry_failed=bad)
        assert isinstance(rejection, Rejection) and "retry_failed" in rejection.message
    # start and cancel carry only the job id: the field is dropped there, not refused.
    cancel = accepted(parse(job_id="a", action="cancel", retry_failed=-5))
    assert cancel.retry_failed is None


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=5),
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers(-(2**63), 2**63 - 1)
            | st.text(max_size=8)
            | st.floats(allow_nan=False, allow_infinity=False),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=3), inner, max_size=3)
            ),
            max_leaves=12,
        ),
        max_size=4,
    ),
    st.dictionaries(st.text(max_size=5), st.integers(0, 3), max_size=3),
)
def test_a_request_is_the_same_as_itself_under_either_stored_version(
    request: dict[str, Any], other: dict[str, Any]
) -> None:
    req = JobRequest(job_id="j", request=request)
    digest = request_hash(req)
    assert digest.startswith("v2:")
    # A job stored by a version-1 worker, or by this one: a re-submit is recognised...
    assert same_request(request_hash_v1(req), req, digest)
    assert same_request(digest, req, digest)
    # ...and a different request is a conflict under both.
    changed = JobRequest(job_id="j", request={**request, "\x00changed": other})
    assert not same_request(request_hash_v1(req), changed, request_hash(changed))
    assert not same_request(digest, changed, request_hash(changed))


def test_a_request_orjson_cannot_write_is_hashed_and_compared_in_version_1() -> None:
    huge = JobRequest(job_id="j", request={"n": 2**70})
    assert request_hash(huge) == request_hash_v1(huge)
    assert same_request(request_hash_v1(huge), huge, request_hash(huge))
    smaller = JobRequest(job_id="j", request={"n": 2**60})
    # A stored version-2 hash is never taken for a request that only version 1 can hash.
    assert not same_request(request_hash(smaller), huge, request_hash(huge))
    assert not same_request(request_hash(huge), smaller, request_hash(smaller))


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"job_id": "j", "request": {"s": "\\ud800"}}', "request"),
        (b'{"job_id": "j", "request": {"\\udfff": 1}}', "request"),
        (b'{"job_id": "j", "request": {"s": ["ok", "\\uDC00x"]}}', "request"),
        (b'{"job_id": "j", "batch_request_id": "\\ud83d"}', "batch_request_id"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_its_field(raw: bytes, field: str) -> None:
    for content_type in (None, "application/json"):
        rejection = parse_job_request(raw, content_type)
        assert isinstance(rejection, Rejection), rejection
        assert rejection.code == RejectCode.INVALID_FIELD
        assert rejection.message.startswith(f"field '{field}': ")
        assert (rejection.job_id, rejection.action) == ("j", "submit")


def test_a_surrogate_pair_is_text_and_taken() -> None:
    req = parse_job_request(b'{"job_id": "j", "request": {"s": "\\ud83d\\ude00"}}', None)
    assert isinstance(req, JobRequest) and req.request == {"s": "\U0001f600"}
    assert request_hash(req).startswith("v2:")


@pytest.mark.parametrize(
    "body",
    [
        rb'{"job_id": "j", "request": {"description": "a\u0000b"}}',
        rb'{"job_id": "j", "request": {"a\u0000": 1}}',
        rb'{"job_id": "j", "request": {"list": [["\u0000"]]}}',
    ],
)
def test_a_nul_character_in_a_string_is_refused_as_it_cannot_be_stored(body: bytes) -> None:
    rejection = parse_job_request(body, "application/json")
    assert isinstance(rejection, Rejection)
    assert rejection.code == "INVALID_FIELD" and rejection.job_id == "j"
    assert "NUL" in rejection.message and "field 'request'" in rejection.message
    # An escaped backslash before "u0000" is text, not a NUL.
    assert isinstance(
        parse_job_request(rb'{"job_id": "j", "request": {"d": "\\u0000"}}', None), JobRequest
    )


# --- limits (v1.2) ---------------------------------------------------------------------------


def _nested(levels: int) -> dict[str, Any]:
    """A request that makes the message ``levels`` deep (the message itself is level 1)."""
    value: Any = 1
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_nesting_up_to_the_limit_is_taken_and_one_level_more_is_too_deep() -> None:
    from worker.wire.job_requests import MAX_DEPTH

    accepted(parse(job_id="j", request=_nested(MAX_DEPTH)))
    result = rejected(parse(job_id="j", request=_nested(MAX_DEPTH + 1)))
    assert (result.code, result.job_id) == (RejectCode.REQUEST_TOO_DEEP, "j")


def test_a_body_up_to_the_limit_is_read_and_one_byte_more_is_too_large() -> None:
    from worker.wire.job_requests import MAX_REQUEST_BYTES

    head = b'{"job_id": "j", "request": {"evalscript": "'
    tail = b'"}}'
    fits = head + b"x" * (MAX_REQUEST_BYTES - len(head) - len(tail)) + tail
    assert len(fits) == MAX_REQUEST_BYTES
    accepted(parse_job_request(fits, "application/json"))
    over = rejected(parse_job_request(fits + b" ", "application/json"))
    assert over.code == RejectCode.REQUEST_TOO_LARGE and str(MAX_REQUEST_BYTES) in over.message


@pytest.mark.parametrize("rid", [".", "..", "../process", "b", "6aa8765a-e9eb-4dd0-a567"])
def test_a_batch_request_id_must_be_a_uuid(rid: str) -> None:
    result = rejected(parse(job_id="j", batch_request_id=rid))
    assert result.code == RejectCode.INVALID_FIELD
    # The same words whatever the value: a message names the field, never the value.
    assert result.message == "field 'batch_request_id': must be a batch request id (a UUID)"


def test_nul_characters_and_out_of_range_deadlines_are_invalid_fields() -> None:
    nul = rejected(parse(job_id="j", request={"description": "a\x00b"}))
    assert nul.code == RejectCode.INVALID_FIELD and "NUL" in nul.message
    late = rejected(parse(job_id="j", request={}, deadline="9999-12-31T23:59:59-23:59"))
    assert late.code == RejectCode.INVALID_FIELD and "deadline" in late.message
