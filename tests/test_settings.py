"""worker.settings: presets, env prefix, .env, secrets directory, one line per problem."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.settings import (
    DEFAULT_SECRETS_DIR,
    ENV_PREFIX,
    Deployment,
    Settings,
    SettingsError,
    load_settings,
    require_credentials,
    setting_names,
    unknown_settings,
)

SECRET = "cl13nt-s3cr3t-value"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No BATCH_WORKER_* from the outside, no .env from the repo, no real secrets dir."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.setenv(ENV_PREFIX + "SECRETS_DIR", str(tmp_path / "no-secrets-here"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.mark.parametrize(
    ("deployment", "api_url", "token_host"),
    [
        ("sentinel-hub", "https://services.sentinel-hub.com", "services.sentinel-hub.com"),
        (
            "sentinel-hub-us-west",
            "https://services-uswest2.sentinel-hub.com",
            "services.sentinel-hub.com",
        ),
        ("cdse", "https://sh.dataspace.copernicus.eu", "identity.dataspace.copernicus.eu"),
    ],
)
def test_presets_fill_both_urls(
    monkeypatch: pytest.MonkeyPatch, deployment: str, api_url: str, token_host: str
) -> None:
    monkeypatch.setenv("BATCH_WORKER_DEPLOYMENT", deployment)

    settings = load_settings()

    assert settings.deployment == Deployment(deployment)
    assert settings.api_url == api_url
    assert settings.batch_url == api_url + "/api/v2/batch"
    assert settings.token_url.startswith(f"https://{token_host}/auth/realms/")
    assert settings.token_url.endswith("/protocol/openid-connect/token")


def test_the_default_deployment_is_sentinel_hub() -> None:
    assert load_settings().deployment == Deployment.SENTINEL_HUB


def test_an_explicit_url_beats_the_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_WORKER_DEPLOYMENT", "cdse")
    monkeypatch.setenv("BATCH_WORKER_API_URL", "http://127.0.0.1:8080/")

    settings = load_settings()

    assert settings.batch_url == "http://127.0.0.1:8080/api/v2/batch"
    assert "dataspace" in settings.token_url


def test_only_prefixed_variables_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLL_INTERVAL", "5")
    monkeypatch.setenv("BATCH_WORKER_API_BUDGET_PER_MINUTE", "120")
    monkeypatch.setenv("BATCH_WORKER_LOG_LEVEL", "debug")

    settings = load_settings()

    assert settings.poll_interval == 30
    assert settings.api_budget_per_minute == 120
    assert settings.log_level == "DEBUG"


def test_a_dot_env_file_is_read_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, clean_environment: Path
) -> None:
    (clean_environment / ".env").write_text(
        "BATCH_WORKER_FLEET_ID=from-dotenv\nBATCH_WORKER_POLL_INTERVAL=12\n"
    )
    monkeypatch.setenv("BATCH_WORKER_POLL_INTERVAL", "7")

    settings = load_settings()

    assert settings.fleet_id == "from-dotenv"
    assert settings.poll_interval == 7


def test_the_secrets_directory_supplies_the_client_secret(
    monkeypatch: pytest.MonkeyPatch, clean_environment: Path
) -> None:
    secrets = clean_environment / "secrets"
    secrets.mkdir()
    (secrets / "BATCH_WORKER_CLIENT_SECRET").write_text(SECRET)
    monkeypatch.setenv("BATCH_WORKER_SECRETS_DIR", str(secrets))
    monkeypatch.setenv("BATCH_WORKER_CLIENT_ID", "cid")

    settings = load_settings()

    assert settings.client_secret.get_secret_value() == SECRET
    require_credentials(settings)  # complete: does not raise


def _worker_name_of_a_new_process(env: dict[str, str]) -> str:
    script = "from worker.settings import load_settings; print(load_settings().worker_name)"
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_two_workers_on_one_host_have_different_names() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(HOSTNAME="node-7", BATCH_WORKER_SECRETS_DIR="/nonexistent")
    first, second = (_worker_name_of_a_new_process(env) for _ in range(2))
    assert first != second
    for name in (first, second):
        assert re.fullmatch(r"node-7-\d+-[0-9a-f]{4}", name), name


def test_the_default_worker_name_names_the_process() -> None:
    name = load_settings().worker_name
    assert f"-{os.getpid()}-" in name
    assert load_settings().worker_name == name  # every Settings of one process agrees


def test_a_set_worker_name_is_used_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_WORKER_WORKER_NAME", "batch-worker-7c9f-x2k")
    assert load_settings().worker_name == "batch-worker-7c9f-x2k"
    monkeypatch.setenv("BATCH_WORKER_WORKER_NAME", "")
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert caught.value.problems[0].startswith("BATCH_WORKER_WORKER_NAME: ")


def test_every_problem_gets_one_line_naming_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_WORKER_POLL_INTERVAL", "soon")
    monkeypatch.setenv("BATCH_WORKER_DEPLOYMENT", "mars")
    monkeypatch.setenv("BATCH_WORKER_API_URL", "ftp://x")
    monkeypatch.setenv("BATCH_WORKER_FLEET_ID", "no spaces allowed")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    problems = caught.value.problems
    assert len(problems) == 4
    assert str(caught.value).splitlines() == problems
    named = sorted(line.split(":", 1)[0] for line in problems)
    assert named == [
        "BATCH_WORKER_API_URL",
        "BATCH_WORKER_DEPLOYMENT",
        "BATCH_WORKER_FLEET_ID",
        "BATCH_WORKER_POLL_INTERVAL",
    ]


def test_missing_credentials_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError) as caught:
        require_credentials(load_settings())

    assert [p.split(":")[0] for p in caught.value.problems] == [
        "BATCH_WORKER_CLIENT_ID",
        "BATCH_WORKER_CLIENT_SECRET",
    ]


def test_secrets_are_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_WORKER_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("BATCH_WORKER_BROKER_URL", "amqp://worker:brokerpw123@rabbit//")
    monkeypatch.setenv("BATCH_WORKER_DATABASE_URL", "postgresql://pg:dbpw456@db/jobs")

    settings = load_settings()

    for text in (repr(settings), str(settings), repr(settings.model_dump())):
        for secret in (SECRET, "brokerpw123", "dbpw456"):
            assert secret not in text


def test_a_rejected_value_is_not_echoed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_WORKER_BROKER_URL", "http://worker:brokerpw123@rabbit//")
    monkeypatch.setenv("BATCH_WORKER_DATABASE_URL", "mysql://pg:dbpw456@db/jobs")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    text = str(caught.value)
    assert "BATCH_WORKER_BROKER_URL" in text and "BATCH_WORKER_DATABASE_URL" in text
    assert "brokerpw123" not in text and "dbpw456" not in text


def test_a_clusters_nodes_are_a_failover_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "BATCH_WORKER_BROKER_URL", "amqp://w:pw@rabbit-0:5672//; amqp://w:pw@rabbit-1:5672//"
    )
    settings = load_settings()
    assert settings.broker_urls == ["amqp://w:pw@rabbit-0:5672//", "amqp://w:pw@rabbit-1:5672//"]
    assert settings.broker_url.get_secret_value() == ";".join(settings.broker_urls)
    assert not settings.broker_uses_tls
    assert Settings(broker_url="amqps://a:5671//;amqps://b:5671//").broker_uses_tls
    assert Settings(broker_url="amqp://one//").broker_urls == ["amqp://one//"]


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("amqp://w:brokerpw123@a//;http://w:brokerpw123@b//", "each URL of the ;-separated list"),
        ("amqp://w:brokerpw123@a//;", "each URL of the ;-separated list"),
        ("amqps://w:brokerpw123@a//;amqp://w:brokerpw123@b//", "mixes amqp:// and amqps://"),
    ],
)
def test_a_bad_failover_list_is_one_line_without_the_value(
    monkeypatch: pytest.MonkeyPatch, url: str, problem: str
) -> None:
    monkeypatch.setenv("BATCH_WORKER_BROKER_URL", url)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    [line] = caught.value.problems
    assert line.startswith("BATCH_WORKER_BROKER_URL: ")
    assert problem in line
    assert "brokerpw123" not in line


DOCUMENTED = [
    Path(__file__).resolve().parents[1] / "README.md",
    Path(__file__).resolve().parents[1] / "docs" / "contract.md",
]


def documented_defaults(path: Path) -> dict[str, str]:
    """``NAME -> default`` from a configuration table's rows that pair names with literal
    defaults (`` `A`, `B` | `1`, `2` ``); rows whose default is prose are left out."""
    found: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) < 4 or not cells[1].startswith("`"):
            continue
        names = re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[1])
        values = re.findall(r"`([^`]*)`", cells[2])
        if names and len(names) == len(values) and re.fullmatch(r"(`[^`]*`(, )?)+", cells[2]):
            found.update(zip(names, values, strict=True))
    return found


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: p.name)
def test_every_default_the_docs_give_is_the_one_the_settings_have(path: Path) -> None:
    documented = documented_defaults(path)
    assert {"PREFETCH", "MAX_IN_FLIGHT", "POLL_INTERVAL", "DATABASE_URL"} <= set(documented)
    defaults = Settings.model_fields
    for name, value in documented.items():
        if name == "SECRETS_DIR":  # read before the settings are, so not one of their fields
            assert value == DEFAULT_SECRETS_DIR, f"{path.name}: SECRETS_DIR is not {value}"
            continue
        field = defaults[name.lower()]
        default = field.default
        if hasattr(default, "get_secret_value"):
            default = default.get_secret_value()
        if isinstance(default, int | float) and not isinstance(default, bool):
            assert float(value) == default, f"{path.name}: {name} is {default}, not {value}"
            continue
        if isinstance(default, tuple):  # a comma-separated list
            written = tuple(float(part) for part in value.split(","))
            assert written == default, f"{path.name}: {name} is {default}, not {value}"
            continue
        if isinstance(default, bool):  # as it is written in an environment variable
            assert value == str(default).lower(), f"{path.name}: {name} is not {value}"
            continue
        shown = str(default.value if hasattr(default, "value") else default)
        assert shown == value, f"{path.name}: {name} is documented as {value!r}, set to {shown!r}"


def test_a_mistyped_variable_is_named_with_the_closest_setting_and_never_its_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BATCH_WORKER_CLIENTID", SECRET)
    monkeypatch.setenv("BATCH_WORKER_CLIENT_SECRET", SECRET)

    lines = unknown_settings()

    assert lines == [
        "BATCH_WORKER_CLIENTID (in the environment) is not a setting and is ignored;"
        " did you mean BATCH_WORKER_CLIENT_ID?"
    ]
    assert load_settings().client_id == ""  # ignored indeed: that is why it is worth a line


def test_unknown_names_in_the_dot_env_file_and_the_secrets_directory_are_named_too(
    monkeypatch: pytest.MonkeyPatch, clean_environment: Path
) -> None:
    (clean_environment / ".env").write_text(
        f"BATCH_WORKER_FLEET_ID=ok\nBATCH_WORKER_PREFECH=10\nAWS_REGION=eu-central-1\n"
        f"BATCH_WORKER_DATABASE_ULR=postgresql://pg:{SECRET}@db/jobs\n"
    )
    secrets = clean_environment / "secrets"
    secrets.mkdir()
    (secrets / "BATCH_WORKER_CLIENT_SECRET").write_text(SECRET)
    (secrets / "BATCH_WORKER_CLIENT_SECRETS").write_text(SECRET)
    (secrets / "..data").mkdir()  # what a Kubernetes Secret mount holds besides the keys
    monkeypatch.setenv("BATCH_WORKER_SECRETS_DIR", str(secrets))

    lines = unknown_settings()

    assert lines == [
        f"BATCH_WORKER_CLIENT_SECRETS (in the secrets directory {secrets}) is not a setting"
        " and is ignored; did you mean BATCH_WORKER_CLIENT_SECRET?",
        "BATCH_WORKER_DATABASE_ULR (in .env) is not a setting and is ignored;"
        " did you mean BATCH_WORKER_DATABASE_URL?",
        "BATCH_WORKER_PREFECH (in .env) is not a setting and is ignored;"
        " did you mean BATCH_WORKER_PREFETCH?",
    ]
    assert SECRET not in "\n".join(lines)


def test_every_setting_in_any_case_and_the_projects_own_names_are_not_warned_about(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in setting_names():
        monkeypatch.setenv(name, "x")
    monkeypatch.setenv("batch_worker_poll_interval", "5")  # matched case-insensitively
    monkeypatch.setenv("BATCH_WORKER_TEST_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    monkeypatch.setenv("SH_CLIENT_ID", "another program's")

    assert unknown_settings() == []


def test_a_name_like_no_setting_points_to_the_readme(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_WORKER_ZZZ", "1")

    assert unknown_settings() == [
        "BATCH_WORKER_ZZZ (in the environment) is not a setting and is ignored;"
        " see the README's configuration table"
    ]


def test_kubernetes_service_links_are_not_taken_for_mistakes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What Kubernetes injects into every pod of a namespace with a Service named
    # batch-worker (the chart's, for a release called batch-worker).
    injected = {
        "BATCH_WORKER_SERVICE_HOST": "10.0.0.7",
        "BATCH_WORKER_SERVICE_PORT": "9400",
        "BATCH_WORKER_SERVICE_PORT_METRICS": "9400",
        "BATCH_WORKER_PORT": "tcp://10.0.0.7:9400",
        "BATCH_WORKER_PORT_9400_TCP": "tcp://10.0.0.7:9400",
        "BATCH_WORKER_PORT_9400_TCP_PROTO": "tcp",
        "BATCH_WORKER_PORT_9400_TCP_PORT": "9400",
        "BATCH_WORKER_PORT_9400_TCP_ADDR": "10.0.0.7",
    }
    for name, value in injected.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("BATCH_WORKER_METRIC_PORT", "9401")

    assert unknown_settings() == [
        "BATCH_WORKER_METRIC_PORT (in the environment) is not a setting and is ignored;"
        " did you mean BATCH_WORKER_METRICS_PORT?"
    ]
    # Without the service's host, BATCH_WORKER_PORT is somebody's guess at a setting.
    monkeypatch.delenv("BATCH_WORKER_SERVICE_HOST")
    assert any(line.startswith("BATCH_WORKER_PORT ") for line in unknown_settings())


def table_names(path: Path) -> set[str]:
    """Every ``NAME`` in the first cell of the configuration table (the rows whose first
    cell is a list of code-spelled upper-case names)."""
    found: set[str] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.split("|")]
        if len(cells) < 4 or not re.fullmatch(r"(`[A-Z][A-Z0-9_]*`(, )?)+", cells[1]):
            continue
        found.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", cells[1]))
    return found


def test_the_readme_table_lists_every_setting_and_nothing_else() -> None:
    listed = table_names(DOCUMENTED[0])
    settings = {name.removeprefix(ENV_PREFIX) for name in setting_names()}

    assert settings - listed == set(), "settings missing from the README's table"
    assert listed - settings == set(), "names in the README's table that are not settings"


@pytest.mark.parametrize("path", DOCUMENTED, ids=lambda p: p.name)
def test_every_name_a_configuration_table_gives_is_a_setting(path: Path) -> None:
    settings = {name.removeprefix(ENV_PREFIX) for name in setting_names()}
    assert table_names(path) - settings == set()


def test_tenant_tokens_name_configured_tenants_are_long_unique_and_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BATCH_WORKER_TENANTS", '{"team-a": {}}')
    monkeypatch.setenv("BATCH_WORKER_WEB_TENANT_TOKENS", '{"team-a": "a-token-of-team-a-77"}')
    settings = load_settings()
    assert settings.web_tenant_tokens["team-a"].get_secret_value() == "a-token-of-team-a-77"
    assert "a-token-of-team-a-77" not in repr(settings)

    for tokens, problem in (
        ('{"team-b": "a-token-of-team-b-77"}', "tenants not in TENANTS: team-b"),
        ('{"team-a": "short"}', "at least 16 characters"),
    ):
        monkeypatch.setenv("BATCH_WORKER_WEB_TENANT_TOKENS", tokens)
        with pytest.raises(SettingsError) as caught:
            load_settings()
        [line] = caught.value.problems
        assert line.startswith("BATCH_WORKER_WEB_TENANT_TOKENS: ") and problem in line
        assert "token-of" not in line and "short" not in line  # no value echoed
    monkeypatch.setenv("BATCH_WORKER_TENANTS", '{"a": {}, "b": {}}')
    monkeypatch.setenv(
        "BATCH_WORKER_WEB_TENANT_TOKENS", '{"a": "same-token-0000001", "b": "same-token-0000001"}'
    )
    with pytest.raises(SettingsError, match="unique"):
        load_settings()
    monkeypatch.setenv("BATCH_WORKER_WEB_TENANT_HEADER", "X-Bad Header")
    with pytest.raises(SettingsError, match="WEB_TENANT_HEADER"):
        load_settings()
