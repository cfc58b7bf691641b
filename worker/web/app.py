"""The status API and its pages: read-only JSON over the durable state, served by aiohttp.

Every answer comes from PostgreSQL (jobs, their events' history) or the delivery bucket
(a job's features); nothing here writes either. Database and S3 work is blocking, so it
runs in threads; the event loop only routes. The routes and their answers are documented
in ``openapi.json`` beside this module, served at ``/api/openapi.json``; the tests hold
the answers to it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
from aiohttp import web
from psycopg_pool import ConnectionPool, PoolTimeout

from worker.redact import redact
from worker.settings import Settings
from worker.store import listing
from worker.web import callers
from worker.web.features import FeatureReader

API = "/api/v1"
STATIC = Path(str(resources.files("worker.web") / "static"))
OPENAPI = Path(str(resources.files("worker.web") / "openapi.json"))
# How often the pages ask again while a job runs (seconds); the API says it in /config.
REFRESH_SECONDS = 2.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
POOL: web.AppKey[ConnectionPool] = web.AppKey("pool", ConnectionPool)
READER: web.AppKey[FeatureReader] = web.AppKey("reader", FeatureReader)
SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
CALLER: web.RequestKey[callers.Caller] = web.RequestKey("caller", callers.Caller)


class Problem(web.HTTPException):
    """An error answer as JSON: ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, **headers: str) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": {"code": code, "message": message}}),
            content_type="application/json",
            headers=headers or None,
        )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=partial(json.dumps, default=str))


# --- auth --------------------------------------------------------------------------------

# The pages, their scripts and the API's document hold no data: open to all, so a page can
# ask for a token before its first call.
_OPEN = ("/healthz", "/api/openapi.json")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    if not request.path.startswith("/api/") or request.path in _OPEN:
        return await handler(request)
    header = settings.web_tenant_header
    try:
        request[CALLER] = callers.identify(
            settings,
            request.headers.get("Authorization", ""),
            request.headers.get(header) if header else None,
        )
    except callers.Refused as refused:
        challenge = "Basic" if settings.web_basic_auth.get_secret_value() else "Bearer"
        headers = {"WWW-Authenticate": f'{challenge} realm="batch-worker"'}
        raise Problem(
            refused.status,
            refused.code,
            refused.message,
            **(headers if refused.status == 401 else {}),
        ) from None
    return await handler(request)


def _caller(request: web.Request) -> callers.Caller:
    caller: callers.Caller = request.get(CALLER, callers.EVERYONE)
    return caller


def _tenant(request: web.Request) -> str | None:
    """Whose jobs this request may see: None for all of them."""
    return _caller(request).tenant


# --- reading -----------------------------------------------------------------------------


async def _in_thread(request: web.Request, read: Callable[[psycopg.Connection[Any]], Any]) -> Any:
    pool = request.app[POOL]

    def run() -> Any:
        with pool.connection(timeout=10) as conn:
            try:
                return read(conn)
            finally:
                conn.rollback()

    try:
        return await asyncio.to_thread(run)
    except psycopg.errors.UndefinedTable:
        return None  # no worker has made the tables yet: no job
    except (psycopg.OperationalError, PoolTimeout):
        raise Problem(
            503, "DATABASE_UNAVAILABLE", "the job-state database is not answering"
        ) from None


def _fleet(request: web.Request) -> str:
    return request.query.get("fleet") or request.app[SETTINGS].fleet_id


def job_filter(request: web.Request) -> listing.JobFilter:
    try:
        return listing.JobFilter.from_query(
            request.query.items(), fleet_id=_fleet(request), tenant=_tenant(request)
        )
    except listing.BadFilter as exc:
        raise Problem(400, "BAD_QUERY", str(exc)) from None


async def _jobs(request: web.Request) -> web.Response:
    spec = job_filter(request)
    found = await _in_thread(request, lambda conn: listing.list_jobs(conn, spec))
    page, total = found if found is not None else ([], 0)
    return _json(spec.page(page, total))


async def _overview(request: web.Request) -> web.Response:
    fleet = _fleet(request)
    tenant = _tenant(request)
    overview = await _in_thread(
        request, lambda conn: listing.fleet_overview(conn, fleet, tenant=tenant)
    )
    if overview is None:
        overview = listing.empty_overview(fleet)
    return _json(overview)


async def _fleets(request: web.Request) -> web.Response:
    tenant = _tenant(request)
    found = await _in_thread(request, lambda conn: listing.fleets(conn, tenant=tenant)) or []
    configured = request.app[SETTINGS].fleet_id
    return _json({"configured": configured, "fleets": sorted({configured, *found})})


async def _detail(request: web.Request, job_id: str) -> dict[str, Any]:
    fleet = _fleet(request)
    tenant = _tenant(request)
    detail = await _in_thread(
        request, lambda conn: listing.job_detail(conn, fleet, job_id, tenant=tenant)
    )
    if detail is None:
        raise Problem(404, "NO_SUCH_JOB", f"no job {job_id!r} in fleet {fleet!r}")
    result: dict[str, Any] = detail
    return result


async def _job(request: web.Request) -> web.Response:
    return _json(await _detail(request, request.match_info["job_id"]))


async def _features(request: web.Request) -> web.Response:
    job_id = request.match_info["job_id"]
    fleet = _fleet(request)
    # The request whole, credentials in it included: the reader needs only its delivery
    # url, and nothing of it is answered but that url and the paths derived from it.
    tenant = _tenant(request)
    found = await _in_thread(
        request, lambda conn: listing.job_request(conn, fleet, job_id, tenant=tenant)
    )
    if found is None:
        raise Problem(404, "NO_SUCH_JOB", f"no job {job_id!r} in fleet {fleet!r}")
    payload, request_id = found
    if request_id is None:
        collection = {
            "type": "FeatureCollection",
            "features": [],
            "counts": {"DONE": 0, "FATAL": 0, "PENDING": 0},
            "truncated": False,
            "delivery": None,
            "problems": ["the job has no batch request yet"],
        }
    else:
        reader = request.app[READER]
        collection = await asyncio.to_thread(reader.collection, payload, request_id)
    collection["job_id"] = job_id
    collection["batch_request_id"] = request_id
    return _json(redact(collection))


async def _config(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    return _json(
        {
            "fleet_id": settings.fleet_id,
            "tenant": _caller(request).name,
            "basemap_url": settings.web_basemap_url or None,
            "refresh_seconds": REFRESH_SECONDS,
        }
    )


async def _openapi(_: web.Request) -> web.Response:
    return web.Response(body=OPENAPI.read_bytes(), content_type="application/json")


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def _page(name: str) -> Handler:
    async def page(_: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / name)

    return page


async def _not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPNotFound:
        if request.path.startswith("/api/"):
            raise Problem(404, "NOT_FOUND", f"no such path: {request.path}") from None
        raise


def build_app(settings: Settings, pool: ConnectionPool, reader: FeatureReader) -> web.Application:
    app = web.Application(middlewares=[_auth, web.middleware(_not_found)])
    app[SETTINGS] = settings
    app[POOL] = pool
    app[READER] = reader
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/api/openapi.json", _openapi)
    app.router.add_get(f"{API}/config", _config)
    app.router.add_get(f"{API}/fleets", _fleets)
    app.router.add_get(f"{API}/fleet", _overview)
    app.router.add_get(f"{API}/jobs", _jobs)
    app.router.add_get(f"{API}/jobs/{{job_id}}", _job)
    app.router.add_get(f"{API}/jobs/{{job_id}}/features", _features)
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/job", _page("job.html"))
    app.router.add_static("/static/", STATIC, follow_symlinks=False)
    return app
