"""Every knob of the simulator, and the command-line options that set them.

Two kinds of time live here. Job durations (analysis, processing, status lag, the
30-minute restart block) are *API seconds*: realistic values divided by ``speed`` at run
time. Consistency windows, token lifetime, latency and rate limits are *real seconds*:
they model the service's front door, which does not speed up with the jobs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

SearchMode = Literal["substring", "words", "ignored"]
RestartMode = Literal["continue", "reprocess"]
DefaultSort = Literal["created", "created:desc"]


class SimulatorConfig(BaseModel):
    """The simulator's settings; defaults suit the demo (a job takes a minute or so)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # --- time ---------------------------------------------------------------------
    speed: float = Field(20.0, gt=0, description="job durations are divided by this")
    analysis_base: float = Field(60.0, ge=0, description="API seconds of analysis, fixed part")
    analysis_per_feature: float = Field(1.0, ge=0, description="API seconds per feature")
    processing_base: float = Field(120.0, ge=0, description="API seconds of processing, fixed")
    processing_per_feature: float = Field(20.0, ge=0, description="API seconds per feature")
    status_lag: float = Field(
        20.0, ge=0, description="API seconds between an action and its status showing (§3.3)"
    )
    done_lag: float = Field(
        30.0, ge=0, description="API seconds at 100 %% before the status turns DONE (§3.3)"
    )
    restart_block: float = Field(
        1800.0, ge=0, description="API seconds after a stop during which start is refused (§3.2)"
    )
    restart_mode: RestartMode = Field(
        "continue",
        description="START after a stop: continue with the features not yet DONE, or"
        " process (and bill) all of them again; the live API's behaviour is unconfirmed",
    )
    # --- auth -----------------------------------------------------------------------
    client_id: str | None = Field(None, description="accept only this client id (any if unset)")
    client_secret: str | None = Field(None, description="accept only this secret (any if unset)")
    token_lifetime: float = Field(3599.0, gt=0, description="real seconds a token lives (§12)")
    # --- unconfirmed behaviours (§18) ---------------------------------------------
    page_size_max: int = Field(100, ge=1, description="largest list page (§2.1)")
    history: int = Field(300, ge=0, description="finished requests the account already holds")
    list_lag: float = Field(0.0, ge=0, description="real seconds before a new request is listed")
    search_mode: SearchMode = Field("substring", description="what `search` matches")
    default_sort: DefaultSort = Field("created", description="list order without `sort`")
    illegal_action_status: int = Field(
        400, ge=400, le=499, description="HTTP status of an action the state forbids"
    )
    rate_limit_body_wrapped: bool = Field(
        False, description="wrap 429 bodies in {'error': ...} (the docs show them bare, §9.1)"
    )
    # --- faults -----------------------------------------------------------------------
    rate_429: float = Field(0.0, ge=0, le=1, description="share of calls answered 429")
    retry_after_ms: int = Field(1000, ge=0, description="Retry-After of injected 429s (ms)")
    throttle_routes: str = Field(
        "", description="comma-separated routes (create, start, ...) throttle_calls applies to"
    )
    throttle_calls: int = Field(
        0, ge=0, description="the next N calls of throttle_routes answer 429 (retry_after_ms)"
    )
    rate_5xx: float = Field(0.0, ge=0, le=1, description="share of calls answered 5xx")
    not_found_after_create: float = Field(
        0.0, ge=0, description="real seconds a new request answers 404 (§3.3)"
    )
    latency: float = Field(0.0, ge=0, description="real seconds added to every API call")
    create_answer_delay: float = Field(
        0.0, ge=0, description="real seconds a create is answered after the request exists"
    )
    requests_per_minute: int = Field(
        600, ge=0, description="account request limit per minute, 0 = none (§10)"
    )
    rate_fail_analysis: float = Field(0.0, ge=0, le=1, description="share of analyses FAILED")
    rate_out_of_pu: float = Field(0.0, ge=0, le=1, description="share of jobs STOPPED OUT_OF_PU")
    rate_unhealthy: float = Field(0.0, ge=0, le=1, description="share of jobs STOPPED UNHEALTHY")
    rate_fatal_feature: float = Field(
        0.0, ge=0, le=1, description="chance a feature ends FATAL, rolled on each attempt"
    )
    fatal_attempts: int = Field(
        1, ge=1, description="attempts a feature picked by [sim:fatal=N] stays FATAL"
    )
    seed: int | None = Field(None, description="seed of the fault dice (reproducible runs)")
    # --- features and artifacts -----------------------------------------------------
    geopackage_default_features: int = Field(
        5, ge=1, description="features of a GeoPackage input when artifacts are off"
    )
    write_artifacts: bool = Field(
        True, description="write the feature manifest and execution database to S3 (§8)"
    )
    execution_db_interval: float = Field(
        60.0, gt=0, description="API seconds between execution database uploads (§8.3)"
    )
    state_file: Path | None = Field(None, description="keep requests in this JSON file")

    def scaled(self, api_seconds: float) -> float:
        """Real seconds of a duration given in API seconds."""
        return api_seconds / self.speed


def build_parser_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--host``, ``--port`` and one option per knob of :class:`SimulatorConfig`."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=8765, help="port to bind (default %(default)s)")
    group = parser.add_argument_group("simulator settings")
    for name, field in SimulatorConfig.model_fields.items():
        option = "--" + name.replace("_", "-")
        help_text = f"{field.description} (default: {field.default})"
        annotation = field.annotation
        if annotation is bool:
            group.add_argument(
                option,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
            continue
        choices = _literal_choices(annotation)
        group.add_argument(
            option,
            dest=name,
            default=None,
            choices=choices,
            type=str,
            help=help_text,
        )


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """The config named by parsed options (unset options keep their defaults)."""
    given: dict[str, Any] = {
        name: getattr(args, name)
        for name in SimulatorConfig.model_fields
        if getattr(args, name, None) is not None
    }
    # Strings from the command line are coerced by pydantic's lax mode (int, float, Path).
    return SimulatorConfig.model_validate(given)


def _literal_choices(annotation: Any) -> list[str] | None:
    args = get_args(annotation)
    if args and all(isinstance(arg, str) for arg in args):
        return list(args)
    return None
