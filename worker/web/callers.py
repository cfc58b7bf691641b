"""Who asks the status API, and so which jobs it may see (docs/operations.md, "Status API
by tenant").

Three kinds of caller:

- anyone, when no credential is configured (the API as it was before tenancy);
- the fleet's operators, holding ``WEB_TOKEN`` or ``WEB_BASIC_AUTH``: every job;
- a tenant, named by its own bearer token (``WEB_TENANT_TOKENS``) or by the header an
  authenticating proxy in front sets (``WEB_TENANT_HEADER``): that tenant's jobs only,
  or every job for a tenant whose ``TENANTS`` rule manages any job (an operators' tenant).

A tenant token wins over the header: a proxy that passes the caller's own Authorization
on cannot be made to speak for someone else by it.
"""

from __future__ import annotations

import base64
import hmac
import re
from dataclasses import dataclass

from worker.settings import TENANT_PATTERN, Settings


@dataclass(frozen=True)
class Caller:
    """``tenant``: whose jobs it sees, None for all of them; ``name``: the tenant it is,
    None for an operator or anyone."""

    tenant: str | None
    name: str | None = None


EVERYONE = Caller(tenant=None)


class Refused(Exception):
    """No caller the settings accept: ``status`` 401 (no or wrong credentials) or 403 (a
    tenant the settings do not know)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def tenancy_configured(settings: Settings) -> bool:
    return bool(settings.web_tenant_tokens or settings.web_tenant_header)


def _operator(settings: Settings, header: str) -> bool:
    token = settings.web_token.get_secret_value()
    basic = settings.web_basic_auth.get_secret_value()
    scheme, _, value = header.partition(" ")
    if token and scheme.lower() == "bearer":
        return hmac.compare_digest(value.strip().encode(), token.encode())
    if basic and scheme.lower() == "basic":
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(given, basic.encode())
    return False


def _token_tenant(settings: Settings, header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    given = value.strip().encode()
    found = None
    # Every token compared, in constant time each: the answer's timing names no tenant.
    for tenant, token in settings.web_tenant_tokens.items():
        if hmac.compare_digest(given, token.get_secret_value().encode()):
            found = tenant
    return found


def _as_tenant(settings: Settings, name: str) -> Caller:
    rule = settings.tenants.get(name)
    if settings.tenants and rule is None:
        raise Refused(403, "UNKNOWN_TENANT", "the tenant is not one of TENANTS")
    return Caller(tenant=None if rule is not None and rule.manage == "any" else name, name=name)


def identify(settings: Settings, authorization: str, tenant_header: str | None) -> Caller:
    """The caller of one request, from its Authorization header and (with
    ``WEB_TENANT_HEADER``) that header's value; raises Refused."""
    named = _token_tenant(settings, authorization) if settings.web_tenant_tokens else None
    if named is not None:
        return _as_tenant(settings, named)
    guarded = bool(
        settings.web_token.get_secret_value() or settings.web_basic_auth.get_secret_value()
    )
    operator = guarded and _operator(settings, authorization)
    if guarded and not operator:
        raise Refused(401, "UNAUTHORISED", "credentials missing or wrong")
    if settings.web_tenant_header and tenant_header is not None and tenant_header.strip():
        name = tenant_header.strip()
        if not re.fullmatch(TENANT_PATTERN, name):
            raise Refused(403, "UNKNOWN_TENANT", "the tenant is not one of TENANTS")
        return _as_tenant(settings, name)
    if operator or not tenancy_configured(settings):
        return EVERYONE
    raise Refused(401, "UNAUTHORISED", "credentials missing or wrong")
