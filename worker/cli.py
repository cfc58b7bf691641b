"""``batch-worker``: a thin argparse front over the daemon and the tools around it."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from worker import __version__
from worker.settings import (
    Settings,
    SettingsError,
    load_settings,
    require_credentials,
    unknown_settings,
)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_SIGPIPE = 141  # 128 + SIGPIPE, as a shell reports a writer whose reader left


def _settings_or_exit(*, credentials: bool = False, warn: bool = True) -> Settings:
    """The settings, or exit 2 with one line per problem. Names given that are not settings
    are warned about here (``warn``), or by the caller once its logging is set up."""
    try:
        settings = load_settings()
        if credentials:
            require_credentials(settings)
    except SettingsError as exc:
        for problem in exc.problems:
            _problem(f"configuration: {problem}")
        # A mistyped name is often the cause of a missing setting: say so in the same place.
        for line in unknown_settings():
            _problem(f"warning: {line}")
        raise SystemExit(EXIT_CONFIG) from None
    if warn:
        for line in unknown_settings():
            _problem(f"warning: {line}")
    return settings


def _setup_logging(settings: Settings) -> None:
    """The log of a long-running process (the worker, the status API) as configured; names
    that are not settings are warned about in it, where whoever runs it reads the rest of
    its start-up."""
    from worker.logs import setup_logging

    setup_logging(
        settings.log_level,
        settings.log_format,
        wire=settings.log_wire,
        fields={"worker": settings.worker_name},
    )
    for line in unknown_settings():
        logging.getLogger("worker.settings").warning(line)


def _problem(text: str) -> None:
    print(f"batch-worker: {text}", file=sys.stderr)


def _cannot_listen(host: str, port: int, exc: OSError) -> str:
    # The system's words for the errno: asyncio's strerror repeats the address.
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"cannot listen on {host}:{port}: {reason[:1].lower()}{reason[1:]}"


def _run(args: argparse.Namespace) -> int:
    settings = _settings_or_exit(credentials=True, warn=False)
    from worker.daemon.health import ListenError
    from worker.daemon.supervisor import Daemon
    from worker.memory import return_large_frees
    from worker.store.db import DatabaseUnusable

    _setup_logging(settings)
    return_large_frees()
    try:
        return Daemon(settings).run()
    except ListenError as exc:
        # The probe server binds first; a taken port is a configuration problem.
        _problem(
            "configuration: BATCH_WORKER_METRICS_HOST/PORT: "
            + _cannot_listen(exc.host, exc.port, exc)
        )
        return EXIT_CONFIG
    except DatabaseUnusable as exc:
        # A missing database or a refused login is configuration; an unreachable server
        # is not (it may be on its way up), and was waited for.
        _problem(f"{exc} (BATCH_WORKER_DATABASE_URL); giving up")
        return EXIT_CONFIG if exc.configuration else EXIT_FAILURE


def _submit(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    from worker.commands.submit import submit

    return submit(
        settings, Path(args.job), wait=args.wait, timeout=args.timeout, json_out=args.json
    )


def _act(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    from worker.commands.submit import act

    return act(
        settings,
        args.job_id,
        args.command,
        wait=args.wait,
        timeout=args.timeout,
        json_out=args.json,
    )


def _status(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    from worker.commands.status import print_status

    return print_status(settings, args.job_id, as_json=args.json, tenant=args.tenant)


def _instant(text: str) -> str:
    """An ISO 8601 instant with its zone (--since, --until), checked as the options are read."""
    from worker.store.listing import instant

    instant(text)
    return text


def _jobs(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    from worker.commands.jobs import list_jobs
    from worker.store.listing import BadFilter, JobFilter

    # The options as the status API's query: both lists select and page alike.
    query = [("status", value) for value in args.status]
    query += [
        (name, value)
        for name, value in (("q", args.text), ("since", args.since), ("until", args.until))
        if value
    ]
    if args.active or args.ended:
        query.append(("active", "true" if args.active else "false"))
    query += [("limit", str(args.limit)), ("offset", str(args.offset))]
    try:
        spec = JobFilter.from_query(
            query, fleet_id=args.fleet or settings.fleet_id, tenant=args.tenant
        )
    except BadFilter as exc:
        _problem(f"jobs: --{exc}")
        return EXIT_CONFIG
    return list_jobs(settings, spec, as_json=args.json)


def _web(args: argparse.Namespace) -> int:
    settings = _settings_or_exit(warn=False)
    _setup_logging(settings)
    try:
        from worker.web.server import serve
    except ImportError as exc:
        _problem(f"web needs {exc.name or 'its extra'}: pip install 'batch-worker[web]'")
        return EXIT_CONFIG
    from worker.store.db import DatabaseUnusable

    try:
        return serve(settings)
    except OSError as exc:
        _problem(
            "configuration: BATCH_WORKER_WEB_HOST/PORT: "
            + _cannot_listen(str(settings.web_host), settings.web_port, exc)
        )
        return EXIT_CONFIG
    except DatabaseUnusable as exc:
        _problem(f"{exc} (BATCH_WORKER_DATABASE_URL); giving up")
        return EXIT_CONFIG if exc.configuration else EXIT_FAILURE


def _dlq(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    from worker.broker import broker_problem
    from worker.commands import dlq
    from worker.commands.follow import BROKER_ERRORS

    try:
        if args.dlq_command == "list":
            return dlq.list_messages(settings, limit=args.limit, as_json=args.json)
        if args.dlq_command == "show":
            return dlq.show_message(settings, args.message, as_json=args.json)
        if args.dlq_command == "replay":
            return dlq.replay(settings, message=args.message, replay_all=args.all)
        if args.dlq_command == "drop":
            return dlq.drop(settings, args.message)
        return dlq.purge(settings, confirmed=args.yes)
    except BROKER_ERRORS as exc:
        # Whatever was fetched and not acked goes back to the DLQ with the channel.
        url = settings.broker_url.get_secret_value()
        _problem(f"dlq {args.dlq_command}: {broker_problem(url, exc)}")
        return EXIT_FAILURE


def _outbox(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    from worker.commands import outbox

    if args.outbox_command == "parked":
        return outbox.list_parked(settings, limit=args.limit, as_json=args.json)
    if args.outbox_command == "replay":
        return outbox.replay(settings, args.row_id)
    return outbox.drop(settings, args.row_id)


def _simulate(args: argparse.Namespace) -> int:
    from worker.logs import setup_logging
    from worker.simulator import config_from_args, serve

    setup_logging("INFO", "auto")
    try:
        serve(config_from_args(args), host=args.host, port=args.port)
    except OSError as exc:
        _problem(f"simulate: {_cannot_listen(args.host, args.port, exc)}")
        return EXIT_CONFIG
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    try:  # what the demo needs beyond the worker's own dependencies: the `demo` extra
        import moto.server  # noqa: F401
        import pika  # noqa: F401
    except ImportError as exc:
        _problem(f"the demo needs {exc.name or 'its extra'}: pip install 'batch-worker[demo]'")
        return EXIT_CONFIG
    settings = _settings_or_exit()
    from worker.commands.demo import run_demo

    stay = False if args.exit else None  # None: stay on a terminal, end elsewhere
    return run_demo(settings, speed=args.speed, keep_going=args.keep_running, stay=stay)


def _schemas(args: argparse.Namespace) -> int:
    from worker.wire.schemas import stale_schemas, write_schemas

    if args.write:
        for path in write_schemas():
            print(path)
        return EXIT_OK
    stale = stale_schemas()
    for name in stale:
        _problem(f"{name} differs from the models: run batch-worker schemas --write")
    return EXIT_FAILURE if stale else EXIT_OK


def _definitions(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    from worker.wire.topology import render_definitions, write_definitions

    if args.path is None:
        sys.stdout.write(render_definitions(settings, rabbitmq=args.rabbitmq))
    else:
        print(write_definitions(settings, args.path, rabbitmq=args.rabbitmq))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="batch-worker",
        description="Drive Sentinel Hub Batch Processing API V2 jobs from RabbitMQ.",
        epilog="Configuration comes from BATCH_WORKER_* environment variables (see README).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the worker daemon")
    run.set_defaults(handler=_run)

    submit = commands.add_parser("submit", help="publish a job request")
    submit.add_argument("job", metavar="JOB.json", help="a job request (see worker/examples)")
    submit.add_argument("--wait", action="store_true", help="show live progress until it ends")
    submit.add_argument(
        "--timeout", type=float, default=None, help="give up waiting after this many seconds"
    )
    submit.add_argument(
        "--json", action="store_true", help="with --wait: end with the job's state as JSON"
    )
    submit.set_defaults(handler=_submit)

    for verb, does in (
        ("cancel", "stop a job (its batch request too, when one runs)"),
        ("start", "start a job resting after analysis (auto_start false)"),
        ("resume", "go on with a paused job (resume_on) as soon as the restart block allows"),
    ):
        act = commands.add_parser(verb, help=f"{does}: publishes a `{verb}` for JOB_ID")
        act.add_argument("job_id", metavar="JOB_ID")
        act.add_argument("--wait", action="store_true", help="show live progress until it ends")
        act.add_argument(
            "--timeout", type=float, default=None, help="give up waiting after this many seconds"
        )
        act.add_argument(
            "--json", action="store_true", help="with --wait: end with the job's state as JSON"
        )
        act.set_defaults(handler=_act)

    status = commands.add_parser("status", help="a job's latest state, from the durable state")
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.add_argument(
        "--tenant", metavar="TENANT", help="only this tenant's jobs: another's is not shown"
    )
    status.set_defaults(handler=_status)

    jobs = commands.add_parser(
        "jobs", help="the fleet's jobs, newest first, from the durable state"
    )
    jobs.add_argument(
        "--status", action="append", default=[], help="a status or phase (repeat, or a,b)"
    )
    jobs.add_argument("--text", help="part of the job id or batch request id (any case)")
    jobs.add_argument("--since", type=_instant, help="accepted at or after (ISO 8601, zoned)")
    jobs.add_argument("--until", type=_instant, help="accepted before (ISO 8601, zoned)")
    state = jobs.add_mutually_exclusive_group()
    state.add_argument("--active", action="store_true", help="only jobs not ended")
    state.add_argument("--ended", action="store_true", help="only ended jobs")
    jobs.add_argument("--fleet", help="another fleet than FLEET_ID")
    jobs.add_argument("--tenant", metavar="TENANT", help="only this tenant's jobs")
    jobs.add_argument("--limit", type=int, default=50, choices=range(1, 501), metavar="1..500")
    jobs.add_argument("--offset", type=int, default=0)
    jobs.add_argument("--json", action="store_true", help="the status API's JSON")
    jobs.set_defaults(handler=_jobs)

    web = commands.add_parser(
        "web", help="serve the read-only status API and pages (WEB_HOST, WEB_PORT)"
    )
    web.set_defaults(handler=_web)

    dlq = commands.add_parser("dlq", help="look at, replay or drop dead-lettered requests")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")
    dlq_list = dlq_commands.add_parser("list", help="one line per dead-lettered message")
    dlq_list.add_argument("--limit", type=int, default=100)
    dlq_list.add_argument("--json", action="store_true", help="one JSON object instead")
    dlq_show = dlq_commands.add_parser("show", help="one message whole")
    named = "its id as `dlq list` prints it: the message id, or sha256:... for one without"
    dlq_show.add_argument("message", help=named)
    dlq_show.add_argument("--json", action="store_true", help="one JSON object, body in base64 too")
    dlq_replay = dlq_commands.add_parser("replay", help="send messages back to the jobs queue")
    target = dlq_replay.add_mutually_exclusive_group(required=True)
    target.add_argument("message", nargs="?", help=named)
    target.add_argument("--all", action="store_true", help="replay every message")
    dlq_drop = dlq_commands.add_parser("drop", help="drop one dead-lettered message")
    dlq_drop.add_argument("message", help=named)
    dlq_purge = dlq_commands.add_parser("purge", help="drop every dead-lettered message")
    dlq_purge.add_argument("--yes", action="store_true", help="really drop them")
    dlq.set_defaults(handler=_dlq)

    box = commands.add_parser("outbox", help="list, replay or drop parked outbox rows")
    box_commands = box.add_subparsers(dest="outbox_command", required=True, metavar="ACTION")
    box_parked = box_commands.add_parser("parked", help="one line per parked row")
    box_parked.add_argument("--limit", type=int, default=1000)
    box_parked.add_argument("--json", action="store_true", help="a JSON array instead")
    box_replay = box_commands.add_parser("replay", help="put a parked row back in line")
    box_replay.add_argument("row_id", type=int, metavar="ID", help="its id in `outbox parked`")
    box_drop = box_commands.add_parser("drop", help="delete a parked row for good")
    box_drop.add_argument("row_id", type=int, metavar="ID", help="its id in `outbox parked`")
    box.set_defaults(handler=_outbox)

    simulate = commands.add_parser("simulate", help="serve the bundled Batch V2 API simulator")
    _add_simulator_arguments(simulate)
    simulate.set_defaults(handler=_simulate)

    demo = commands.add_parser("demo", help="simulator + worker + the example jobs, live")
    demo.add_argument(
        "--speed",
        type=float,
        default=None,
        help="simulator speed factor, higher is faster (default: the demo takes about a minute)",
    )
    after = demo.add_mutually_exclusive_group()
    after.add_argument(
        "--keep-running",
        action="store_true",
        help="keep the worker and the status page up after the jobs have ended, until Ctrl-C"
        " (the default on a terminal)",
    )
    after.add_argument(
        "--exit",
        action="store_true",
        help="end once the jobs have ended (the default when not on a terminal)",
    )
    demo.set_defaults(handler=_demo)

    schemas = commands.add_parser(
        "schemas", help="the JSON Schemas of the wire formats: check them, or write them anew"
    )
    what = schemas.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true", help="exit 1 when a file drifts")
    what.add_argument("--write", action="store_true", help="regenerate the files")
    schemas.set_defaults(handler=_schemas)

    definitions = commands.add_parser(
        "definitions", help="write the RabbitMQ definitions file for the current settings"
    )
    definitions.add_argument(
        "path", nargs="?", type=Path, help="write them there (default: print them)"
    )
    definitions.add_argument(
        "--rabbitmq",
        type=int,
        choices=(3, 4),
        default=3,
        help="the broker's major version (4: the DLQ's delivery limit set to -1, unlimited)",
    )
    definitions.set_defaults(handler=_definitions)
    return parser


def _add_simulator_arguments(parser: argparse.ArgumentParser) -> None:
    from worker.simulator import build_parser_arguments

    build_parser_arguments(parser)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`batch-worker status JOB | head`): nothing of ours failed.
        # What is still buffered would raise again at exit; it goes nowhere instead.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGPIPE
