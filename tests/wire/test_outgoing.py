"""worker.wire.outgoing: AMQP tables as tagged JSON, the one form the outbox and job rows keep."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.wire.outgoing import (
    OutboxMessage,
    _encode,
    decode_table,
    encode_table,
    message_from_json,
    message_to_json,
)


def test_rejects_values_amqp_cannot_carry() -> None:
    for bad in (object(), {"nested": object()}, [2**70, object()]):
        with pytest.raises(TypeError):
            encode_table({"bad": bad})


amqp_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)  # beyond 64 bits, orjson hands over to json
    | st.floats(allow_nan=False)  # infinities too: tagged
    | st.text(max_size=5)
    | st.binary(max_size=5)
    | st.datetimes()
    | st.decimals(allow_nan=False, places=3),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=5), amqp_values, max_size=4))
def test_a_table_comes_back_as_it_went_whichever_writer_wrote_it(table: dict) -> None:
    written = encode_table(table)
    assert decode_table(written) == table
    # The same value as the json writer's, which older rows were written with.
    assert json.loads(written) == json.loads(json.dumps(_encode(table)))


def test_a_message_comes_back_from_its_json_form_whole() -> None:
    message = OutboxMessage(
        "batch.events",
        "job.done",
        b'{"id": "e1"}',
        {"message_id": "e1", "timestamp": 1_700_000_000},
        {"x-raw": b"\x00\xff", "x-inf": float("inf")},
        mandatory=True,
    )
    data = message_to_json(message)
    assert json.loads(json.dumps(data)) == data  # plain JSON, as a jsonb column keeps it
    assert message_from_json(data) == message
