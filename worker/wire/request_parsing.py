"""Reading a message body into a ``JobRequest`` or a ``Rejection``, never an exception, within
the limits of docs/events.md.

Two readings: the usual valid request validated straight from the bytes, and, for anything
that refuses, the full one that names the first problem (its code, message and job id).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from pydantic import ValidationError

from worker.wire.request_model import ACTIONS, JOB_ID_PATTERN, JobRequest, RejectCode, Rejection

# A create payload is a few KiB (its evalscript the most of it); 256 KiB leaves room for a
# long evalscript and inline geometry, and bounds what one message may cost to parse.
MAX_REQUEST_BYTES = 256 * 1024


# Objects and arrays inside one another, counting the message itself as depth 1.
MAX_DEPTH = 32


_JOB_ID_RE = re.compile(JOB_ID_PATTERN)


def parse_job_request(body: bytes, content_type: str | None) -> JobRequest | Rejection:
    """Read one message body. UTF-8 JSON; ``application/json`` or no content type at all."""
    if len(body) > MAX_REQUEST_BYTES:
        return Rejection(
            RejectCode.REQUEST_TOO_LARGE,
            f"the body is {len(body)} bytes; at most {MAX_REQUEST_BYTES} are taken",
        )
    req = _parse_quickly(body, content_type)
    if not isinstance(req, JobRequest):
        return req
    if _too_deep(req.request, MAX_DEPTH - 1):
        return Rejection(
            RejectCode.REQUEST_TOO_DEEP,
            f"field 'request': nested deeper than {MAX_DEPTH} levels",
            req.job_id,
            req.action,
        )
    if _SURROGATE_ESCAPE.search(body):
        where = _not_text(req, _has_lone_surrogate)
        if where is not None:
            return Rejection(
                RejectCode.INVALID_FIELD,
                f"field '{where}': a string holds a lone UTF-16 surrogate, which is not text",
                req.job_id,
                req.action,
            )
    if _NUL_ESCAPE in body:
        where = _not_text(req, _has_nul)
        if where is not None:
            return Rejection(
                RejectCode.INVALID_FIELD,
                f"field '{where}': a string holds a NUL character (\\u0000), which cannot be"
                " stored",
                req.job_id,
                req.action,
            )
    return req


def _too_deep(value: Any, room: int) -> bool:
    """Whether ``value`` nests objects or arrays more than ``room`` levels deep."""
    if isinstance(value, dict):
        return room <= 0 or any(_too_deep(v, room - 1) for v in value.values())
    if isinstance(value, list):
        return room <= 0 or any(_too_deep(v, room - 1) for v in value)
    return False


def _parse_quickly(body: bytes, content_type: str | None) -> JobRequest | Rejection:
    if _is_json_content_type(content_type) and not any(c in body for c in _NOT_JSON_CONSTANTS):
        # The usual case, a valid request, validated straight from the bytes: half the cost
        # of json.loads + model_validate. Whatever this refuses is read again below, so
        # every rejection (its code, message, job id) is the one the full reading gives.
        with suppress(ValidationError):
            return JobRequest.model_validate_json(body)
    return _parse_fully(body, content_type)


# JSON lets a string escape half of a UTF-16 pair ("\ud800") and both parsers take it, but
# such a string is not text: it cannot be stored (PostgreSQL refuses it), hashed or sent
# on as UTF-8. Only a body with such an escape (pairs included) is looked through.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


# JSON can escape NUL in a string, and both parsers take it, but PostgreSQL's text and jsonb
# cannot hold it (an INTERNAL_ERROR before). A raw NUL byte is not JSON at all; only the
# escape can bring one in.
_NUL_ESCAPE = rb"\u0000"


def _has_lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _has_nul(text: str) -> bool:
    return "\x00" in text


def _not_text(req: JobRequest, bad: Callable[[str], bool]) -> str | None:
    """The first field holding a string (or key) that ``bad`` finds, if any."""

    def holds_one(value: Any) -> bool:
        if isinstance(value, str):
            return bad(value)
        if isinstance(value, dict):
            return any(holds_one(k) or holds_one(v) for k, v in value.items())
        if isinstance(value, list):
            return any(holds_one(v) for v in value)
        return False

    for field in ("request", "batch_request_id"):
        if holds_one(getattr(req, field)):
            return field
    return None


def _parse_fully(body: bytes, content_type: str | None) -> JobRequest | Rejection:
    try:
        data = json.loads(body.decode("utf-8-sig"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError):
        return Rejection(RejectCode.MALFORMED_JSON, "the body is not UTF-8 JSON")
    except RecursionError:
        return Rejection(RejectCode.REQUEST_TOO_DEEP, f"nested deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        return Rejection(RejectCode.NOT_AN_OBJECT, "the body is JSON but not an object")

    job_id = _readable_job_id(data.get("job_id"))
    raw_action = data.get("action", "submit")
    action = raw_action if raw_action in ACTIONS else None
    if not _is_json_content_type(content_type):
        return Rejection(
            RejectCode.UNSUPPORTED_CONTENT_TYPE,
            "content_type must be application/json (UTF-8) or absent",
            job_id,
            action,
        )
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        code, message = _first_problem(exc)
        return Rejection(code, message, job_id, action)


# pydantic's JSON parser takes these constants, which the contract refuses (json.loads
# below is told to reject them): a body holding them anywhere takes the full reading.
_NOT_JSON_CONSTANTS = (b"NaN", b"Infinity")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _readable_job_id(value: Any) -> str | None:
    """The job id for a rejection, only when it is one: it goes into events and logs."""
    return value if isinstance(value, str) and _JOB_ID_RE.fullmatch(value) else None


@functools.lru_cache(maxsize=64)  # producers send one or two content types
def _is_json_content_type(content_type: str | None) -> bool:
    if not content_type or not content_type.strip():
        return True
    mime, *params = (part.strip().lower() for part in content_type.split(";"))
    if mime != "application/json":
        return False
    for param in params:
        key, _, value = param.partition("=")
        if key.strip() == "charset" and value.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


# Pydantic error → rejection code; the first matching rule in this order wins.
def _first_problem(exc: ValidationError) -> tuple[RejectCode, str]:
    errors = exc.errors(include_input=False, include_url=False, include_context=False)

    def field(err: Any) -> str:
        return str(err["loc"][0]) if err["loc"] else ""

    rules: list[tuple[RejectCode, Any]] = [
        (RejectCode.INVALID_JOB_ID, lambda e: field(e) == "job_id"),
        (
            RejectCode.UNSUPPORTED_SCHEMA_VERSION,
            lambda e: field(e) == "schema_version" and e["type"] == "less_than_equal",
        ),
        (RejectCode.UNKNOWN_ACTION, lambda e: field(e) == "action"),
        (RejectCode.CONFLICTING_FIELDS, lambda e: e["type"] == "conflicting_fields"),
        (RejectCode.MISSING_REQUEST, lambda e: e["type"] == "missing_request"),
        (RejectCode.INVALID_FIELD, lambda e: e["type"] == "batch_request_id"),
        (RejectCode.INVALID_FIELD, lambda e: True),
    ]
    for code, matches in rules:
        for err in errors:
            if matches(err):
                name = field(err)
                return code, (f"field '{name}': {err['msg']}" if name else err["msg"])
    raise AssertionError("a ValidationError without errors")  # pragma: no cover
