"""No secret leaves the client: not in logs (DEBUG included), not in error texts."""

from __future__ import annotations

import logging

import pytest
from api_support import MakeClient, seed
from scripted_server import Reply, ScriptedServer, error_body, task_body

from worker.api.client import BatchClient
from worker.api.errors import ApiError, PayloadInvalid

pytestmark = pytest.mark.integration

RID = "1b2c3d4e-0000-4000-8000-000000000003"
S3_KEY = "AKIAEXAMPLEKEY123456"
S3_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def _keyed_payload() -> dict[str, object]:
    payload = seed("seed_tiff_geopackage")
    payload["input"]["features"]["s3"] = {  # type: ignore[index]
        "url": "s3://bucket/features.gpkg",
        "accessKey": S3_KEY,
        "secretAccessKey": S3_SECRET,
    }
    return payload


def test_secrets_never_reach_a_log_line_or_an_error(
    client: BatchClient, server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # requests-oauthlib logs bodies and tokens at DEBUG
    echoed = f"bad secretAccessKey {S3_SECRET} for accessKey: {S3_KEY}"
    server.on(
        "POST",
        "/process",
        Reply(500, error_body(500, "COMMON_EXCEPTION", echoed)),
        Reply(201, task_body(RID)),
    )
    server.on(
        "GET", f"/process/{RID}", Reply(401, error_body(401, "X", "no")), Reply(200, task_body(RID))
    )
    errors: list[str] = []

    with pytest.raises(ApiError) as first:
        client.create(_keyed_payload())
    errors.append(str(first.value))
    client.create(_keyed_payload())
    client.get(RID)
    bad = _keyed_payload()
    bad["output"] = {
        "type": "raster",
        "delivery": {"s3": {"url": "x", "secretAccessKey": S3_SECRET}},
    }
    with pytest.raises(PayloadInvalid) as second:
        client.create(bad)
    errors.append(str(second.value))

    secrets = [server.client_secret, S3_SECRET, S3_KEY, *server.issued]
    assert len(server.issued) == 2
    lines = [record.getMessage() for record in caplog.records]
    assert any("requests_oauthlib" in r.name for r in caplog.records)  # the leaky logger spoke
    for secret in secrets:
        assert all(secret not in line for line in lines), secret
        assert secret not in caplog.text
        assert all(secret not in text for text in errors)
    assert repr(client).count(server.client_secret) == 0


def test_a_refused_client_secret_is_not_in_the_error(
    make_client: MakeClient, server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "a-wrong-but-real-looking-secret"
    client = make_client(client_secret=wrong)
    server.token_replies.append(Reply(401, {"error": "invalid_client", "error_description": wrong}))

    with pytest.raises(ApiError) as caught:
        client.get(RID)

    assert wrong not in str(caught.value)
    assert wrong not in caplog.text
