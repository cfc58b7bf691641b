"""Job requests: what arrives on the jobs queue, parsed, validated and hashed.

``parse_job_request`` turns a message body into a ``JobRequest`` or a ``Rejection`` (never an
exception). ``request_hash`` and ``same_request`` tell an idempotent re-submit from a conflict.

This module is what the rest of the worker imports; the parts are ``request_model`` (the
model, the rejection codes), ``request_parsing`` (with the limits) and ``request_hashing``.

Decisions the contract leaves open (documented in docs/events.md and the schemas):

- ``start``, ``cancel`` and ``resume`` carry only ``job_id``: the submit-only fields
  (``request``, ``batch_request_id``, ``auto_start``, ``deadline``, ``max_cost_pu``,
  ``resume_on``, ``cost_guard``) are ignored on them,
  not validated, so a cancel is never refused for what it did not need.
- ``request: null`` and ``batch_request_id: null`` count as absent.
- ``Rejection.action`` is only ever a known action (or None): it becomes a metric label.
- Limits (docs/events.md): a body of at most ``MAX_REQUEST_BYTES`` (``REQUEST_TOO_LARGE``,
  refused before it is parsed, so a huge body costs no memory), nesting at most
  ``MAX_DEPTH`` deep (``REQUEST_TOO_DEEP``); ``batch_request_id`` a UUID (the API's ids:
  ``.`` or ``..`` would be a path); no NUL character in any string (PostgreSQL cannot store
  one); a deadline whose instant exists (an offset that moves it past year 9999 does not).
"""

from worker.wire.request_hashing import REQUEST_HASH_V2, request_hash, request_hash_v1, same_request
from worker.wire.request_model import (
    ACTIONS,
    COMMANDS,
    JOB_ID_PATTERN,
    SCHEMA_VERSION,
    SUBMIT_ONLY_FIELDS,
    UUID_PATTERN,
    Action,
    JobRequest,
    RejectCode,
    Rejection,
    valid_tenant,
)
from worker.wire.request_parsing import MAX_DEPTH, MAX_REQUEST_BYTES, parse_job_request

__all__ = [
    "ACTIONS",
    "COMMANDS",
    "JOB_ID_PATTERN",
    "MAX_DEPTH",
    "MAX_REQUEST_BYTES",
    "REQUEST_HASH_V2",
    "SCHEMA_VERSION",
    "SUBMIT_ONLY_FIELDS",
    "UUID_PATTERN",
    "Action",
    "JobRequest",
    "RejectCode",
    "Rejection",
    "parse_job_request",
    "request_hash",
    "request_hash_v1",
    "same_request",
    "valid_tenant",
]
