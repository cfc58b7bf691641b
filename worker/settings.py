"""One settings object for the whole process, read by pydantic-settings.

Sources, highest priority first: keyword arguments, the environment (prefix
``BATCH_WORKER_``), an optional ``.env`` file, and a secrets directory (Kubernetes
mounts a Secret as one file per key: ``/run/secrets/batch-worker/BATCH_WORKER_CLIENT_SECRET``).
"""

from __future__ import annotations

import difflib
import os
import re
import secrets
from collections.abc import Mapping
from enum import StrEnum
from functools import cache
from ipaddress import IPv4Address
from pathlib import Path
from typing import Annotated, Any, Literal

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "BATCH_WORKER_"
DEFAULT_SECRETS_DIR = "/run/secrets/batch-worker"


class Deployment(StrEnum):
    SENTINEL_HUB = "sentinel-hub"
    SENTINEL_HUB_US_WEST = "sentinel-hub-us-west"
    CDSE = "cdse"


# batch-v2-api.md §1.1: US-West authenticates against the main (EU) token endpoint.
_SH_AUTH_URL = "https://services.sentinel-hub.com/auth/realms/main/protocol/openid-connect/token"
PRESETS: dict[Deployment, tuple[str, str]] = {
    Deployment.SENTINEL_HUB: ("https://services.sentinel-hub.com", _SH_AUTH_URL),
    Deployment.SENTINEL_HUB_US_WEST: ("https://services-uswest2.sentinel-hub.com", _SH_AUTH_URL),
    Deployment.CDSE: (
        "https://sh.dataspace.copernicus.eu",
        "https://identity.dataspace.copernicus.eu/auth/realms/CDSE/protocol/openid-connect/token",
    ),
}


@cache
def _process_name(pid: int) -> str:
    host = os.environ.get("HOSTNAME") or os.uname().nodename
    return f"{host}-{pid}-{secrets.token_hex(2)}"


def default_worker_name() -> str:
    """This process's name when ``WORKER_NAME`` is not set: host name, pid, a random part.

    Two workers on one host must differ (the name owns job leases and signs events and
    logs), and so must two containers sharing a host name, both pid 1: hence the random
    part. The same for every Settings of one process, so it names the process.
    """
    return _process_name(os.getpid())


class SettingsError(Exception):
    """Invalid configuration: one human-readable line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
# Tenants become a metric label: their number is bounded (docs/contract.md "Tenancy").
MAX_TENANTS = 100


class TenantRule(BaseModel):
    """What one tenant may do (``TENANTS``; docs/contract.md "Tenancy").

    ``adopt``: which batch requests its submits may adopt by ``batch_request_id``:
    ``own`` (created by one of its own jobs), ``fleet`` (by any job of the fleet), ``any``.
    ``manage``: whose jobs its start, cancel and re-submits may name: ``own`` or ``any``
    (an operators' tenant).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    adopt: Literal["own", "fleet", "any"] = "own"
    manage: Literal["own", "any"] = "own"


# The default progress freshness, in poll intervals: 2 minutes at the default interval, the
# official SDK's own pace while processing.
PROGRESS_FRESHNESS_POLLS = 4


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    # --- the API -------------------------------------------------------------------
    deployment: Deployment = Deployment.SENTINEL_HUB
    api_url: str = Field(default="", description="API base; batch endpoints under /api/v2/batch")
    token_url: str = Field(default="", description="OAuth2 client-credentials endpoint")
    client_id: str = ""
    client_secret: SecretStr = SecretStr("")
    api_budget_per_minute: int = Field(default=300, ge=1, le=100_000)
    api_timeout: float = Field(default=30.0, gt=0, le=600)

    # --- the fleet and its jobs ----------------------------------------------------
    fleet_id: str = Field(default="default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
    poll_interval: float = Field(default=30.0, ge=0.1, le=3600)
    # A processing job is read at least this often (its progress events are at most this
    # old); between, only when its completion's rate says its end is near, and the short
    # statuses around processing every half poll_interval (worker/lifecycle/schedule.py).
    # Unset: PROGRESS_FRESHNESS_POLLS poll intervals.
    progress_freshness: float | None = Field(default=None, ge=0.1, le=86_400)
    max_in_flight: int = Field(default=10_000, ge=1, le=1_000_000)
    # Follow-up requests a job makes over its FATAL features, unless its request says.
    retry_failed: int = Field(default=0, ge=0, le=10)
    # Advanced timings (seconds). The API's habits (batch-v2-api.md §3.3): a status lags an
    # action by up to a minute, a new task may answer 404 for a while, the list lags.
    rest_poll_interval: float = Field(default=600.0, ge=0.1, le=86_400)
    action_lag: float = Field(default=90.0, ge=0, le=3600)
    not_found_window: float = Field(default=120.0, ge=0, le=3600)
    # Inside that window, the n-th 404 in a row is read again (an action that answered it
    # sent again) this many seconds later; the last repeats. Comma-separated.
    not_found_retries: Annotated[tuple[float, ...], NoDecode] = (0.0, 2.0, 5.0, 10.0, 20.0)
    list_lag_window: float = Field(default=60.0, ge=0, le=3600)
    lease_seconds: float = Field(default=15.0, ge=1, le=3600)
    # How a dead worker's leases are known before they run out (worker/store/presence.py):
    # "lock", a session advisory lock that dies with the process; "heartbeat", a registry
    # row older than LEASE_SECONDS / 3 (behind PgBouncer in transaction mode); "off".
    presence: Literal["lock", "heartbeat", "off"] = "lock"

    # Resume by policy (docs/lifecycle.md "Paused"): the fleet's default for a job request's
    # resume_on (JSON, e.g. {"UNHEALTHY": {"attempts": 2}}); START is refused for
    # RESTART_BLOCK seconds after a stop (30 minutes on the live API), and a resume comes
    # up to RESTART_JITTER seconds after it.
    resume_on: dict[str, Any] | None = None
    restart_block: float = Field(default=1800.0, ge=0, le=86_400)
    restart_jitter: float = Field(default=300.0, ge=0, le=86_400)

    # --- tenancy (docs/contract.md "Tenancy") ---------------------------------------
    # JSON, tenant -> rule: '{"team-a": {}, "ops": {"manage": "any"}}'. Empty: no tenancy
    # (a message's tenant, if any, is kept and owns its jobs, but is not checked).
    tenants: dict[str, TenantRule] = Field(default_factory=dict)
    # Where a message's tenant comes from: its ``tenant`` field, or the AMQP ``user_id``
    # property, which RabbitMQ checks against the publishing connection's user.
    tenant_source: Literal["message", "user_id"] = "message"
    # Without tenancy: may a submit adopt a batch request no job of the fleet created?
    adopt_foreign: bool = False
    # What a job's max_cost_pu is held to when its request names no cost_guard
    # (docs/contract.md "Cost guard"): "spent" (COST_LIMIT once spent) or "forecast" (also
    # COST_FORECAST once forecast above the cap x (1 + COST_GUARD_MARGIN), the forecast made
    # from COST_GUARD_MIN_COMPLETION percent done on).
    cost_guard: Literal["spent", "forecast"] = "spent"
    cost_guard_margin: float = Field(default=0.1, ge=0, le=10)
    cost_guard_min_completion: float = Field(default=5.0, gt=0, le=100)

    # --- the broker ------------------------------------------------------------------
    broker_url: SecretStr = SecretStr("amqp://guest:guest@localhost:5672//")
    broker_ca_file: Path | None = None
    broker_cert_file: Path | None = None
    broker_key_file: Path | None = None
    jobs_queue: str = "batch.jobs"
    dlq: str = "batch.jobs.dlq"
    events_exchange: str = "batch.events"
    jobs_delivery_limit: int = Field(default=5, ge=1, le=1000)
    unrouted_max_length: int = Field(default=100_000, ge=1)
    # Twice intake's batch of 200: the next batch arrives while one is in its transaction.
    prefetch: int = Field(default=400, ge=1, le=65_535)
    heartbeat: int = Field(default=30, ge=0, le=600)
    # Refusals of one outbox row by the broker (a channel closed on it, a nack) before the
    # relay parks it and goes on with the rows behind it (docs/operations.md "Parked rows").
    outbox_max_attempts: int = Field(default=5, ge=1, le=1000)

    # --- durable job state ---------------------------------------------------------------
    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/postgres")

    # --- the process ---------------------------------------------------------------------
    grace_period: float = Field(default=20.0, ge=0, le=3600)
    # Multiplies every loop's progress bound (docs/operations.md "Liveness"): above 1 where
    # pauses are legitimately longer than the defaults allow for; tests go below.
    liveness_factor: float = Field(default=1.0, ge=0.01, le=100)
    # The probe server's address: all interfaces by default, since a kubelet probes and
    # Prometheus scrapes the pod's IP; 127.0.0.1 keeps it to the host (docs/deployment.md).
    metrics_host: IPvAnyAddress = Field(default=IPv4Address("0.0.0.0"))
    metrics_port: int = Field(default=9400, ge=0, le=65_535)
    # How long each job's events are kept for the status API (bw_event_history).
    event_history_days: float = Field(default=7.0, gt=0, le=3660)
    # The status API and page (``batch-worker web``): a port of its own, apart from the
    # probes, and the loopback by default (its answers describe every job of the fleet).
    web_host: IPvAnyAddress = Field(default=IPv4Address("127.0.0.1"))
    web_port: int = Field(default=8080, ge=0, le=65_535)
    # Either opens the API to whoever knows it: a bearer token, or ``user:password``.
    web_token: SecretStr = SecretStr("")
    web_basic_auth: SecretStr = SecretStr("")
    # The API scoped by tenant (docs/operations.md "Status API by tenant"): a bearer token
    # per tenant (JSON, tenant -> token; a Secret), and/or the name of a header an
    # authenticating proxy in front sets to the caller's tenant. Either set: a caller with
    # neither a tenant nor WEB_TOKEN / WEB_BASIC_AUTH is refused; neither: as before.
    web_tenant_tokens: dict[str, SecretStr] = Field(default_factory=dict)
    web_tenant_header: str = Field(default="", pattern=r"^([A-Za-z0-9-]{1,64})?$")
    # A tile URL template ({z}/{x}/{y}) under the job page's map; none: a graticule.
    web_basemap_url: str = ""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"
    # The libraries' wire logging (botocore, urllib3, kombu, ...) at LOG_LEVEL too: off, so
    # DEBUG shows the worker's own decisions, not every request and frame.
    log_wire: bool = False
    # The chart sets it to the pod name (unique per pod, kept across container restarts).
    worker_name: str = Field(default_factory=default_worker_name, min_length=1, max_length=253)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("not_found_retries", mode="before")
    @classmethod
    def _seconds_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("not_found_retries")
    @classmethod
    def _retry_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if not value or not all(0 <= delay <= 3600 for delay in value):
            raise ValueError("must be one or more delays of 0 to 3600 seconds, comma-separated")
        return value

    @field_validator("resume_on")
    @classmethod
    def _resume_reasons(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # The rules' shape is the lifecycle's (lifecycle/resume_rules.py), checked in full
        # by intake at start; the reasons are checked here, where a typo is plain.
        unknown = sorted(set(value or {}) - {"UNHEALTHY", "OUT_OF_PU"})
        if unknown:
            raise ValueError("keys must be UNHEALTHY or OUT_OF_PU")
        return value

    @field_validator("api_url", "token_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("broker_url")
    @classmethod
    def _amqp_url(cls, value: SecretStr) -> SecretStr:
        # A cluster's nodes as a failover list, "amqp://h1//;amqp://h2//": kombu connects to
        # the first that answers, and on to the next when one is lost.
        urls = [url.strip() for url in value.get_secret_value().split(";")]
        listed = " (each URL of the ;-separated list)" if len(urls) > 1 else ""
        if not all(url.startswith(("amqp://", "amqps://")) for url in urls):
            raise ValueError("must start with amqp:// or amqps://" + listed)
        if len({url.partition("://")[0] for url in urls}) > 1:
            # The TLS options hold for every connection: a failover must never drop TLS.
            raise ValueError("mixes amqp:// and amqps:// URLs: use one scheme for all")
        return SecretStr(";".join(urls))

    @field_validator("database_url")
    @classmethod
    def _pg_url(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        return value

    @field_validator("web_basic_auth")
    @classmethod
    def _user_password(cls, value: SecretStr) -> SecretStr:
        text = value.get_secret_value()
        if text and (":" not in text or text.startswith(":")):
            raise ValueError("must be user:password")
        return value

    @field_validator("web_tenant_tokens")
    @classmethod
    def _tenant_tokens(
        cls, value: dict[str, SecretStr], info: ValidationInfo
    ) -> dict[str, SecretStr]:
        tokens = [token.get_secret_value() for token in value.values()]
        configured = info.data.get("tenants") or {}
        if not all(re.fullmatch(TENANT_PATTERN, name) for name in value):
            raise ValueError("keys must be tenant names (as in TENANTS)")
        unknown = sorted(set(value) - set(configured)) if configured else []
        if unknown:
            raise ValueError(f"tenants not in TENANTS: {', '.join(unknown)}")
        # Shorter tokens can be guessed; a token shared by two tenants names neither.
        if any(len(token) < 16 for token in tokens) or len(set(tokens)) < len(tokens):
            raise ValueError("each token must be at least 16 characters, and unique")
        return value

    @field_validator("web_basemap_url")
    @classmethod
    def _tile_url(cls, value: str) -> str:
        if value and not (
            value.startswith(("http://", "https://", "/"))
            and all(part in value for part in ("{z}", "{x}", "{y}"))
        ):
            raise ValueError("must be an http(s) tile URL template with {z}, {x} and {y}")
        return value

    @field_validator("broker_ca_file", "broker_cert_file", "broker_key_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, value: dict[str, TenantRule]) -> dict[str, TenantRule]:
        if len(value) > MAX_TENANTS:
            raise ValueError(f"at most {MAX_TENANTS} tenants (each is a metric label)")
        for name in value:
            if not re.fullmatch(TENANT_PATTERN, name):
                raise ValueError(
                    "a tenant name is 1-63 letters, digits, '_', '.' or '-', starting with a"
                    " letter or digit"
                )
        return value

    @model_validator(mode="after")
    def _presets(self) -> Settings:
        api_url, token_url = PRESETS[self.deployment]
        if not self.api_url:
            self.api_url = api_url
        if not self.token_url:
            self.token_url = token_url
        return self

    @property
    def batch_url(self) -> str:
        return f"{self.api_url}/api/v2/batch"

    @property
    def broker_urls(self) -> list[str]:
        """BROKER_URL's URLs: one, or a cluster's nodes in the order they are tried."""
        return self.broker_url.get_secret_value().split(";")

    @property
    def broker_uses_tls(self) -> bool:
        return self.broker_url.get_secret_value().startswith("amqps://")


def _field_env_name(loc: tuple[int | str, ...]) -> str:
    return ENV_PREFIX + "_".join(str(part) for part in loc).upper() if loc else ENV_PREFIX


def _secrets_dir(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(ENV_PREFIX + "SECRETS_DIR", DEFAULT_SECRETS_DIR))


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, or raise SettingsError with one line per problem.

    Values never appear in the message: a mistyped secret must not be printed.
    """
    secrets_dir = _secrets_dir()
    kwargs: dict[str, Any] = dict(overrides)
    if secrets_dir.is_dir():
        kwargs["_secrets_dir"] = str(secrets_dir)
    try:
        return Settings(**kwargs)
    except ValidationError as exc:
        problems = [
            f"{_field_env_name(err['loc'])}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors(include_input=False, include_url=False)
        ]
        raise SettingsError(problems) from None


def require_credentials(settings: Settings) -> None:
    """The daemon cannot talk to the API without a client; other commands can."""
    problems = []
    if not settings.client_id:
        problems.append(f"{ENV_PREFIX}CLIENT_ID: required to run the worker")
    if not settings.client_secret.get_secret_value():
        problems.append(f"{ENV_PREFIX}CLIENT_SECRET: required to run the worker")
    if problems:
        raise SettingsError(problems)


def setting_names() -> list[str]:
    """Every variable the worker reads: one per setting, and the secrets directory."""
    return [ENV_PREFIX + name.upper() for name in Settings.model_fields] + [
        ENV_PREFIX + "SECRETS_DIR"
    ]


# BATCH_WORKER_* names that are not settings and not mistakes: the tests' and benches' own
# service URLs, and what Kubernetes injects for a Service named batch-worker (the Helm
# chart's, when the release is called batch-worker): BATCH_WORKER_SERVICE_HOST,
# BATCH_WORKER_PORT_9400_TCP_ADDR, ... Those come as a set, always with SERVICE_HOST.
_NOT_SETTINGS = re.compile(ENV_PREFIX + r"TEST_[A-Z0-9_]+")
_SERVICE_LINK = re.compile(
    ENV_PREFIX + r"(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT(_\d+_(TCP|UDP|SCTP)(_[A-Z]+)?)?)"
)


def unknown_settings(environ: Mapping[str, str] | None = None) -> list[str]:
    """One line per ``BATCH_WORKER_*`` name that no setting reads, wherever it was given (the
    environment, the ``.env`` file, the secrets directory), with the closest known name.

    pydantic-settings ignores such names without a word, so a mistyped variable (say
    ``BATCH_WORKER_CLIENTID``) would leave its setting at the default. Only names appear,
    never values: the value of a mistyped ``CLIENT_SECRET`` is still a secret.
    """
    environ = os.environ if environ is None else environ
    given: dict[str, str] = {}
    env_file = Path(str(Settings.model_config.get("env_file") or ".env"))
    if env_file.is_file():
        for name in dotenv_values(env_file):
            given.setdefault(name, f"in {env_file}")
    secrets_dir = _secrets_dir(environ)
    if secrets_dir.is_dir():
        for entry in sorted(secrets_dir.iterdir()):
            given.setdefault(entry.name, f"in the secrets directory {secrets_dir}")
    for name in environ:
        given[name] = "in the environment"  # the first place anyone looks
    known = setting_names()
    service_links = ENV_PREFIX + "SERVICE_HOST" in {name.upper() for name in environ}
    lines = []
    for name, where in sorted(given.items()):
        upper = name.upper()  # pydantic-settings matches names case-insensitively
        if not upper.startswith(ENV_PREFIX) or upper in known or _NOT_SETTINGS.fullmatch(upper):
            continue
        if service_links and _SERVICE_LINK.fullmatch(upper) and where == "in the environment":
            continue
        # Compared without the prefix, which every name shares and which would make any
        # name look close to any other.
        close = difflib.get_close_matches(
            upper.removeprefix(ENV_PREFIX), [k.removeprefix(ENV_PREFIX) for k in known], n=1
        )
        hint = (
            f"did you mean {ENV_PREFIX}{close[0]}?"
            if close
            else "see the README's configuration table"
        )
        lines.append(f"{name} ({where}) is not a setting and is ignored; {hint}")
    return lines
