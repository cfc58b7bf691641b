"""The front door: OAuth2 tokens (batch-v2-api.md §12) and the account's request limit (§10)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import secrets
import time


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class Tokens:
    """Issues JWT-shaped bearer tokens (clients may read ``exp``) and checks them."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._expiry: dict[str, float] = {}

    def issue(self, client_id: str, lifetime: float, now: float) -> str:
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = {
            "sub": client_id,
            "iat": int(now),
            "exp": int(now + lifetime),
            "jti": secrets.token_hex(8),
            "azp": client_id,
        }
        payload = _b64(json.dumps(claims).encode())
        signature = _b64(
            hmac.new(self._key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        )
        token = f"{header}.{payload}.{signature}"
        if len(self._expiry) > 10_000:
            self._expiry = {t: e for t, e in self._expiry.items() if e > now}
        self._expiry[token] = now + lifetime
        return token

    def valid(self, authorization: str | None, now: float) -> bool:
        if not authorization or not authorization.startswith("Bearer "):
            return False
        expiry = self._expiry.get(authorization[7:].strip())
        return expiry is not None and now < expiry

    def revoke_all(self) -> None:
        self._expiry.clear()


class RequestLimit:
    """A token bucket per account: ``per_minute`` requests, bursts of ten seconds' worth.

    §10: bursting a minute's allowance at once gets requests limited; the 429 says in
    ``Retry-After`` (milliseconds) when the next request is possible.
    """

    def __init__(self) -> None:
        self._tokens = 0.0
        self._stamp = time.monotonic()
        self._per_minute = 0

    def take(self, per_minute: int) -> int | None:
        """None when allowed, else the milliseconds to wait."""
        if per_minute <= 0:
            return None
        now = time.monotonic()
        rate = per_minute / 60.0
        capacity = max(1.0, rate * 10.0)
        if per_minute != self._per_minute:
            self._per_minute, self._tokens = per_minute, capacity
        self._tokens = min(capacity, self._tokens + (now - self._stamp) * rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return max(1, math.ceil((1.0 - self._tokens) / rate * 1000.0))
