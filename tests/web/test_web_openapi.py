"""The status API's OpenAPI document: valid OpenAPI 3.1 (openapi-spec-validator), and it
names every API route the application serves, and no other."""

from __future__ import annotations

import copy
import json

import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from worker.settings import Settings
from worker.web.app import API, OPENAPI, build_app
from worker.web.features import FeatureReader

DOCUMENT = json.loads(OPENAPI.read_text())


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1")
    validate(DOCUMENT)


def test_a_broken_copy_is_refused() -> None:
    broken = copy.deepcopy(DOCUMENT)
    broken["paths"]["/api/v1/jobs"]["get"]["responses"]["200"]["content"] = "JSON"
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_every_api_route_is_documented() -> None:
    app = build_app(Settings(), pool=None, reader=FeatureReader())  # type: ignore[arg-type]
    served = {r.canonical for r in app.router.resources() if r.canonical.startswith(API)}
    assert served == set(DOCUMENT["paths"])
