"""List answers: the query, both shapes, the next token (the client's tests run them over HTTP)."""

from __future__ import annotations

import pytest

from worker.api.errors import ServerError
from worker.api.pages import any_list, list_params, next_token


def test_list_params_leave_out_what_is_not_asked() -> None:
    assert list_params(None, None, None) == {}
    assert list_params("created:desc", "bw1", 5) == {
        "sort": "created:desc",
        "search": "bw1",
        "count": 5,
    }


@pytest.mark.parametrize(
    ("links", "expected"),
    [
        ({"nextToken": "t2", "next": "http://x/process?viewtoken=other"}, "t2"),
        ({"next": "http://x/process?count=5&viewtoken=t3"}, "t3"),
        ({"nextToken": "", "next": ""}, None),
        ({"currentToken": "t1"}, None),
        (None, None),
        ("t2", None),
    ],
)
def test_next_token(links: object, expected: str | None) -> None:
    assert next_token(links) == expected


def test_any_list_takes_both_shapes_and_refuses_others() -> None:
    assert any_list([{"id": 1}], "tilinggrids") == ([{"id": 1}], None, True)
    assert any_list({"data": [], "links": {"a": 1}}, "tilinggrids") == ([], {"a": 1}, False)
    for answer in ({"links": {}}, {"data": {}}, None, "x"):
        with pytest.raises(ServerError) as caught:
            any_list(answer, "tilinggrids")
        assert caught.value.code == "INVALID_RESPONSE"
