"""Reading a request message's properties and headers (worker/wire/properties.py)."""

from __future__ import annotations

import pytest

from worker.wire.properties import dead_letter_tables, reply_to_problem, unusable

# As RabbitMQ 3.10 hands it to a consumer of direct reply-to.
REAL = "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABj7gAAAAJrEaqX.TR8SZjW9T8mJ12n0SclmgA=="


@pytest.mark.parametrize("reply_to", [None, "my-replies", "amq.rabbitmq.reply-to", REAL])
def test_ordinary_and_well_formed_reply_tos_pass(reply_to: str | None) -> None:
    assert reply_to_problem(reply_to) is None


@pytest.mark.parametrize(
    "reply_to",
    [
        "amq.rabbitmq.reply-to.garbage",
        "amq.rabbitmq.reply-to.g2gCZAAsc2FzZEBsb2NhbGhvc3Q=.xx",  # closed the connection: 541
        "amq.rabbitmq.reply-to.AAAA.TR8SZjW9T8mJ12n0SclmgA==",  # not an Erlang term
        REAL + "x",
    ],
)
def test_malformed_direct_reply_tos_are_named(reply_to: str) -> None:
    assert (
        reply_to_problem(reply_to)
        == "property 'reply_to': not a direct reply-to name the broker gave"
    )


def test_a_nul_in_a_property_header_or_nested_table_is_named_never_quoted() -> None:
    assert unusable({"message_id": "m"}, {"x": [1, "ok"]}) is None
    assert unusable({"correlation_id": "a\x00secret"}, {}) == (
        "property 'correlation_id': holds a NUL character, which cannot be stored"
    )
    found = unusable({}, {"t": {"deep": ["x\x00"]}})
    assert found is not None and found.startswith("header 't'")


def test_dead_letter_tables_keep_aside_what_the_broker_acts_on() -> None:
    properties, headers = dead_letter_tables(
        {"user_id": "mallory", "expiration": "1000", "message_id": "m", "correlation_id": "c\x00"},
        {"CC": ["q1"], "BCC": ["q2"], "n": 1, "t": ["a\x00"]},
    )
    assert properties == {"message_id": "m", "correlation_id": b"c\x00"}
    assert headers == {
        "n": 1,
        "t": [b"a\x00"],
        "x-batch-worker-original-user-id": "mallory",
        "x-batch-worker-original-expiration": "1000",
        "x-batch-worker-original-CC": ["q1"],
        "x-batch-worker-original-BCC": ["q2"],
    }
