"""What makes a submit "the same request": the hash stored with each job, and comparing
against a hash stored in an older version.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC
from typing import Any

import orjson

from worker.wire.request_model import SCHEMA_VERSION, JobRequest

# The request hash is stored with each job, so its bytes are for good. Version 1 hashed
# json.dumps' text; version 2 (prefixed) hashes orjson's, a fifth of the cost on intake's hot
# path. A job stored with a version-1 hash is compared in version 1 (``same_request``).
REQUEST_HASH_V2 = "v2:"


def request_hash(req: JobRequest) -> str:
    """What makes a submit "the same request" for an idempotent re-submit: ``v2:`` and the
    SHA-256 (hex) of its defining fields as orjson writes them, keys sorted. A request
    orjson cannot write (an integer beyond 64 bits) is hashed as version 1."""
    canonical = _defining_fields(req)
    try:
        data = orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        return request_hash_v1(req)
    return REQUEST_HASH_V2 + hashlib.sha256(data).hexdigest()


def request_hash_v1(req: JobRequest) -> str:
    """Version 1: the SHA-256 (hex, no prefix) of json.dumps' text, keys sorted."""
    text = json.dumps(
        _defining_fields(req), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def same_request(stored: str, req: JobRequest, digest: str) -> bool:
    """Whether ``req`` (whose ``request_hash`` is ``digest``) is the request hashed as
    ``stored``, whichever version that was written in."""
    if stored.startswith(REQUEST_HASH_V2) == digest.startswith(REQUEST_HASH_V2):
        return stored == digest
    return stored == request_hash_v1(req)


def _defining_fields(req: JobRequest) -> dict[str, Any]:
    deadline = (
        req.deadline.astimezone(UTC).isoformat().replace("+00:00", "Z") if req.deadline else None
    )
    fields: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "request": req.request,
        "batch_request_id": req.batch_request_id,
        "auto_start": req.auto_start,
        "deadline": deadline,
        "max_cost_pu": req.max_cost_pu,
        # Only when given: the hash of every job stored before the field existed holds.
        **({"retry_failed": req.retry_failed} if req.retry_failed is not None else {}),
    }
    if req.resume_on is not None:
        # Only when given, so the hashes stored before resume_on existed still match.
        fields["resume_on"] = req.resume_on.model_dump(mode="json", exclude_none=True)
    # Only when given: the hashes stored before the field existed stay what they were.
    if req.cost_guard is not None:
        fields["cost_guard"] = req.cost_guard
    return fields
