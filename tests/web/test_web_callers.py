"""Who a request's caller is, from its headers and the settings (worker.web.callers)."""

from __future__ import annotations

import base64

import pytest

from worker.settings import Settings, TenantRule
from worker.web.callers import EVERYONE, Caller, Refused, identify

TENANTS = {"team-a": TenantRule(), "team-b": TenantRule(), "ops": TenantRule(manage="any")}
A = "token-of-team-a-0001"


def _settings(**changes: object) -> Settings:
    return Settings.model_validate({"tenants": TENANTS, **changes})


def test_without_tenancy_anyone_sees_everything_as_before() -> None:
    assert identify(_settings(), "", None) == EVERYONE
    guarded = _settings(web_token="operator-token-0003")
    assert identify(guarded, "Bearer operator-token-0003", None) == EVERYONE
    with pytest.raises(Refused) as refused:
        identify(guarded, "", None)
    assert refused.value.status == 401


def test_a_tenant_token_wins_over_the_header_a_proxy_passed_on() -> None:
    both = _settings(web_tenant_tokens={"team-a": A}, web_tenant_header="X-User")
    assert identify(both, f"Bearer {A}", "team-b") == Caller(tenant="team-a", name="team-a")
    assert identify(both, "", "team-b") == Caller(tenant="team-b", name="team-b")


def test_an_operators_tenant_sees_every_job_and_an_unknown_one_is_forbidden() -> None:
    proxied = _settings(web_tenant_header="X-User")
    assert identify(proxied, "", "ops") == Caller(tenant=None, name="ops")
    for name in ("team-z", "../etc", "a" * 70):
        with pytest.raises(Refused) as refused:
            identify(proxied, "", name)
        assert (refused.value.status, refused.value.code) == (403, "UNKNOWN_TENANT")


def test_with_tenancy_on_no_credential_is_refused_never_shown_everything() -> None:
    for settings in (
        _settings(web_tenant_header="X-User"),
        _settings(web_tenant_tokens={"team-a": A}),
        _settings(web_tenant_tokens={"team-a": A}, web_basic_auth="ops:pw"),
    ):
        for authorization, header in (("", None), ("", " "), ("Bearer wrong-token-xxxxxx", None)):
            with pytest.raises(Refused) as refused:
                identify(settings, authorization, header)
            assert refused.value.status == 401
    basic = "Basic " + base64.b64encode(b"ops:pw").decode()
    operators = _settings(web_tenant_tokens={"team-a": A}, web_basic_auth="ops:pw")
    assert identify(operators, basic, None) == EVERYONE
