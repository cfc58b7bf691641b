"""worker.redact: registered secrets, credential keys, URL passwords, tokens."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.redact import (
    REDACTED,
    RedactingFilter,
    forget_secret,
    redact,
    redact_text,
    register_secret,
)

SECRET = "cl1ent/s3cret+value&more"


@pytest.fixture
def registered() -> Iterator[str]:
    register_secret(SECRET)
    yield SECRET
    forget_secret(SECRET)


def test_a_registered_secret_is_masked_raw_url_encoded_and_json_escaped(registered: str) -> None:
    texts = [
        f"secret is {registered}!",
        "client_secret=cl1ent%2Fs3cret%2Bvalue%26more&grant_type=client_credentials",
        "body cl1ent%2Fs3cret%2Bvalue%26more",
        '{"x": "cl1ent/s3cret+value&more"}',
    ]
    for text in texts:
        masked = redact_text(text)
        assert "s3cret" not in masked, masked
        assert REDACTED in masked


def test_a_forgotten_secret_is_no_longer_masked() -> None:
    register_secret("temporary-token-value")
    forget_secret("temporary-token-value")

    assert redact_text("temporary-token-value") == "temporary-token-value"


def test_empty_values_are_not_registered() -> None:
    register_secret("")

    assert redact_text("nothing to hide") == "nothing to hide"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("amqp://user:pa55@rabbit:5672//", "amqp://user:***@rabbit:5672//"),
        ("postgresql://pg:p@ss@db/jobs", "postgresql://pg:***@db/jobs"),
        ("http://host:8080/a@b", "http://host:8080/a@b"),
        ("Authorization: Bearer abc.def-ghi", "Authorization: Bearer ***"),
        ("{'Authorization': 'Basic dXNlcjpwYXNz'}", "{'Authorization': '***'}"),
        (
            '{"secretAccessKey": "wJa\\"lr", "url": "s3://b"}',
            '{"secretAccessKey": "***", "url": "s3://b"}',
        ),
        ("accessKey=AK1&region=eu", "accessKey=***&region=eu"),
        ("password: hunter2", "password: ***"),
        ("token eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl here", "token *** here"),
        ("key AKIAIOSFODNN7EXAMPLE leaked", "key *** leaked"),
        ("secretAccessKey wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "secretAccessKey ***"),
        ("accessKey and secretAccessKey go together", "accessKey and secretAccessKey go together"),
        ('{"nextToken": "abc", "viewtoken": "x"}', '{"nextToken": "abc", "viewtoken": "x"}'),
        ("iamRoleARN: arn:aws:iam::1:role/r", "iamRoleARN: arn:aws:iam::1:role/r"),
    ],
)
def test_credential_shapes_in_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_redact_masks_credential_keys_deep_and_copies() -> None:
    payload = {
        "input": {
            "features": {"s3": {"url": "s3://b/f.gpkg", "accessKey": "AK", "secretAccessKey": "SK"}}
        },
        "output": {"delivery": {"gs": {"url": "gs://b", "credentials": "base64json"}}},
        "list": [{"client_secret": "x", "Access-Token": "y", "password": None}, ("amqp://u:p@h",)],
        "n": 3,
    }

    clean = redact(payload)

    assert clean == {
        "input": {
            "features": {
                "s3": {"url": "s3://b/f.gpkg", "accessKey": REDACTED, "secretAccessKey": REDACTED}
            }
        },
        "output": {"delivery": {"gs": {"url": "gs://b", "credentials": REDACTED}}},
        "list": [
            {"client_secret": REDACTED, "Access-Token": REDACTED, "password": None},
            ["amqp://u:***@h"],
        ],
        "n": 3,
    }
    assert payload["input"]["features"]["s3"]["secretAccessKey"] == "SK"  # type: ignore[index]


def test_the_filter_redacts_message_arguments_and_traceback(registered: str) -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "sent %s", (registered,), None)
    try:
        raise RuntimeError(f"failed with {registered}")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()

    assert RedactingFilter().filter(record) is True
    assert registered not in record.getMessage()
    assert record.exc_text is not None
    assert registered not in record.exc_text
    assert "RuntimeError" in record.exc_text


_FRAGMENTS = [
    "password", "Pass", "api_key", "KEY", "token", "secret", "Authorization", "credentials",
    "AKIA", "ASIA", "://", "@", ":", "=", " ", "\"", "'", "Bearer ", "basic ", "eyJ", ".",
    "x", "7", "/", "_", "-", "ABCDEFGHIJ0123456789", "é", "eyJhbGci.eyJzdWIi.c2ln",
    "amqp://user:pw@host", "AKIAABCDEFGHIJ012345",
]  # fmt: skip


# Short texts: in a long one some other fragment usually sets off the full passes anyway.
@settings(max_examples=1000)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=5).map("".join))
def test_the_quick_check_never_skips_text_a_pattern_would_change(text: str) -> None:
    # Text the quick check lets through unchanged must be text no pattern changes.
    from worker import redact as module

    assert redact_text(text) == module._redact_forms(text)


@pytest.mark.parametrize(
    ("said", "kept"),
    [
        (
            'CONTEXT:  JSON data, line 1: ...G/bPxRfiCYEXAMPLEKEY"}}}, "d": "a\\u0000...',
            "CONTEXT:  JSON data, line 1: ***",
        ),
        ("unnamed portal parameter $3 = 'wJalr''XUtn'", "unnamed portal parameter $3 = ***"),
        (
            'DETAIL:  Failing row contains (f, j, {"k": "v"}).',
            "DETAIL:  Failing row contains (***).",
        ),
        (
            "DETAIL:  Key (fleet_id, job_id)=(f, j1) already exists.",
            "DETAIL:  Key (fleet_id, job_id)=(***) already exists.",
        ),
        ('DETAIL:  Token "wJalrXUtnFEMI" is invalid.', "DETAIL:  Token *** is invalid."),
        (
            'invalid input syntax for type integer: "12ab"',
            "invalid input syntax for type integer: ***",
        ),
    ],
)
def test_what_postgresql_quotes_back_of_the_data_is_masked_whole(said: str, kept: str) -> None:
    assert redact_text(said) == kept
