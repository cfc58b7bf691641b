"""The HTTP surface: token endpoint, every Batch V2 endpoint of batch-v2-api.md §2 under both
path spellings (§1.2), and the unauthenticated ``/admin`` endpoints.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import BodyPartReader, web
from pydantic import ValidationError

from worker.simulator.grids import GRIDS
from worker.simulator.jobs import Conflict, IllegalAction
from worker.simulator.service import Simulator
from worker.simulator.store import valid_token
from worker.simulator.validation import PayloadError, validate_create

logger = logging.getLogger(__name__)

TOKEN_PATH = "/auth/realms/main/protocol/openid-connect/token"  # noqa: S105 - a path
API_PREFIXES = ("/api/v2/batch", "/batch/v2")
SIMULATOR: web.AppKey[Simulator] = web.AppKey("simulator", Simulator)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
}
_UNAUTHORIZED = (
    "You are not authorized! Please provide a valid access token within the header"
    " [Authorization: Bearer <accessToken>] of your request."
)


def error(
    status: int,
    message: str,
    code: str,
    *,
    wrapped: bool = True,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """The API's error body (§9.1): ``{"error": {status, reason, message, code}}``."""
    body: dict[str, Any] = {
        "status": status,
        "reason": _REASONS.get(status, "Error"),
        "message": message,
        "code": code,
    }
    return web.json_response({"error": body} if wrapped else body, status=status, headers=headers)


def _guarded(name: str, handler: Handler) -> Handler:
    """Latency, bearer auth, the account limit and injected faults, then the handler."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        sim = request.app[SIMULATOR]
        config = sim.config
        if config.latency:
            await asyncio.sleep(config.latency)
        now = time.time()
        response: web.StreamResponse
        if not sim.tokens.valid(request.headers.get("Authorization"), now):
            response = error(401, _UNAUTHORIZED, "COMMON_UNAUTHORIZED")
        elif (wait_ms := sim.limit.take(config.requests_per_minute)) is not None:
            response = _too_many(sim, wait_ms)
        elif config.throttle_calls and name in config.throttle_routes.split(","):
            config.throttle_calls -= 1
            response = _too_many(sim, config.retry_after_ms)
        elif config.rate_429 and sim.dice.random() < config.rate_429:
            response = _too_many(sim, config.retry_after_ms)
        elif config.rate_5xx and sim.dice.random() < config.rate_5xx:
            status = sim.dice.choice((500, 502, 503))
            response = error(status, "Simulated server error.", "COMMON_EXCEPTION")
        else:
            response = await handler(request)
        sim.stats[f"{name} {response.status}"] += 1
        return response

    return guarded


def _too_many(sim: Simulator, wait_ms: int) -> web.Response:
    # §10: Retry-After is in milliseconds; the documented body is not wrapped (§9.1).
    return error(
        429,
        "You have exceeded your rate limit",
        "RATE_LIMIT_EXCEEDED",
        wrapped=sim.config.rate_limit_body_wrapped,
        headers={"Retry-After": str(wait_ms)},
    )


def _not_found(job_id: str) -> web.Response:
    return error(404, f"Batch processing request with id {job_id} not found.", "COMMON_NOT_FOUND")


# --- OAuth2 (§12) ----------------------------------------------------------------------------
async def token(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    form = await request.post()
    client_id, client_secret = form.get("client_id"), form.get("client_secret")
    if request.headers.get("Authorization", "").startswith("Basic "):
        decoded = base64.b64decode(request.headers["Authorization"][6:]).decode()
        client_id, _, client_secret = decoded.partition(":")
    if form.get("grant_type") != "client_credentials":
        sim.stats["token 400"] += 1
        return web.json_response(
            {"error": "unsupported_grant_type", "error_description": "Unsupported grant_type"},
            status=400,
        )
    config = sim.config
    good = (
        isinstance(client_id, str)
        and client_id
        and isinstance(client_secret, str)
        and (config.client_id is None or client_id == config.client_id)
        and (config.client_secret is None or client_secret == config.client_secret)
    )
    if not good:
        sim.stats["token 401"] += 1
        return web.json_response(
            {
                "error": "invalid_client",
                "error_description": "Invalid client or Invalid client credentials",
            },
            status=401,
        )
    lifetime = config.token_lifetime
    access = sim.tokens.issue(str(client_id), lifetime, time.time())
    sim.stats["token 200"] += 1
    return web.json_response(
        {
            "access_token": access,
            "expires_in": int(lifetime),
            "refresh_expires_in": 0,
            "token_type": "Bearer",
            "not-before-policy": 0,
            "scope": "email profile",
        }
    )


# --- batch requests (§2) ----------------------------------------------------------------------
async def create(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    try:
        payload = await _create_payload(request)
        validate_create(payload)
    except PayloadError as exc:
        return error(400, str(exc), "COMMON_BAD_PAYLOAD")
    job = sim.create(payload, time.time())
    if sim.config.create_answer_delay:
        # The request exists (and is listed) before its creator hears of it: a client that
        # times out, or dies, here must find it again rather than create another.
        await asyncio.sleep(sim.config.create_answer_delay)
    return web.json_response(job.to_api(time.time()), status=201)


async def _create_payload(request: web.Request) -> Any:
    """JSON body, or multipart with ``request`` and ``evalscript`` parts (§2, §5)."""
    if request.content_type.startswith("multipart/"):
        parts: dict[str, str] = {}
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, BodyPartReader) and part.name:
                parts[part.name] = await part.text()
        try:
            payload = json.loads(parts.get("request", ""))
        except ValueError as exc:
            raise PayloadError("The 'request' part is not valid JSON.") from exc
        if "evalscript" in parts and isinstance(payload, dict):
            process = payload.get("processRequest")
            if isinstance(process, dict):
                process["evalscript"] = parts["evalscript"]
        return payload
    try:
        return await request.json()
    except ValueError as exc:
        raise PayloadError("The request body is not valid JSON.") from exc


async def list_requests(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    query = request.query
    count, problem = _count(query.get("count"), sim.config.page_size_max)
    if problem:
        return error(400, problem, "COMMON_BAD_PAYLOAD")
    sort = query.get("sort")
    if sort not in {None, "created", "created:desc", "status", "status:desc"}:
        return error(400, f"Invalid sort '{sort}'.", "COMMON_BAD_PAYLOAD")
    token_in = query.get("viewtoken")
    if token_in is not None and not valid_token(token_in):
        return error(400, "Invalid view token.", "COMMON_BAD_PAYLOAD")
    now = time.time()
    jobs, next_token = sim.store.page(
        now, sim.config, count=count, token=token_in, sort=sort, search=query.get("search")
    )
    # Each job's request is serialised once (``to_api_json``): a page repeats 100 of them.
    data = ", ".join(job.to_api_json(now) for job in jobs)
    links = json.dumps(_links(request, token_in, next_token))
    return web.Response(
        text=f'{{"data": [{data}], "links": {links}}}', content_type="application/json"
    )


def _count(raw: str | None, maximum: int) -> tuple[int, str | None]:
    if raw is None:
        return maximum, None
    try:
        value = int(raw)
    except ValueError:
        return 0, f"Invalid count '{raw}'."
    if value < 1:
        return 0, "Count must be positive."
    return min(value, maximum), None  # §2.1: count cannot exceed the endpoint's maximum


def _links(request: web.Request, current: str | None, following: str | None) -> dict[str, str]:
    links = {"@id": str(request.url)}
    if current:
        links["currentToken"] = current
    if following:
        links["nextToken"] = following
        links["next"] = str(request.url.update_query(viewtoken=following))
    return links


async def get_request(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    now = time.time()
    job = sim.visible(request.match_info["id"], now)
    if job is None:
        return _not_found(request.match_info["id"])
    return web.Response(text=job.to_api_json(now), content_type="application/json")


async def update_request(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    now = time.time()
    job = sim.visible(request.match_info["id"], now)
    if job is None:
        return _not_found(request.match_info["id"])
    try:
        body = await request.json()
    except ValueError:
        return error(400, "The request body is not valid JSON.", "COMMON_BAD_PAYLOAD")
    description = body.get("description") if isinstance(body, dict) else None
    if description is not None and not isinstance(description, str):
        return error(400, "Field 'description' must be a string.", "COMMON_BAD_PAYLOAD")
    if description is not None:
        try:
            job.update_description(now, description)
        except Conflict as exc:
            return error(409, str(exc), "COMMON_BAD_PAYLOAD")
        sim.changed()
    return web.json_response(job.to_api(now))


def _action(name: str) -> Handler:
    async def act(request: web.Request) -> web.Response:
        sim = request.app[SIMULATOR]
        job = sim.visible(request.match_info["id"], time.time())
        if job is None:
            return _not_found(request.match_info["id"])
        if name in {"analyse", "start"}:
            await sim.prepare_analysis(job)
        try:
            getattr(job, name)(time.time(), sim.config)
        except IllegalAction as exc:
            return error(sim.config.illegal_action_status, str(exc), "COMMON_BAD_PAYLOAD")
        sim.after_action(job)
        return web.Response(status=204)

    return act


async def method_not_allowed(request: web.Request) -> web.Response:
    return error(405, f"Method {request.method} is not allowed here.", "COMMON_METHOD_NOT_ALLOWED")


# --- tiling grids (§7) -----------------------------------------------------------------------
async def list_grids(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    count, problem = _count(request.query.get("count"), sim.config.page_size_max)
    if problem:
        return error(400, problem, "COMMON_BAD_PAYLOAD")
    token_in = request.query.get("viewtoken")
    offset = 0
    if token_in is not None:
        if not token_in.isdigit():
            return error(400, "Invalid view token.", "COMMON_BAD_PAYLOAD")
        offset = int(token_in)
    grids = list(GRIDS.values())
    chunk = grids[offset : offset + count]
    end = offset + len(chunk)
    following = str(end) if end < len(grids) else None
    return web.json_response(
        {"data": [g.descriptor() for g in chunk], "links": _links(request, token_in, following)}
    )


async def get_grid(request: web.Request) -> web.Response:
    raw = request.match_info["id"]
    if not raw.lstrip("-").isdigit():
        return error(400, f"Invalid tiling grid id '{raw}'.", "COMMON_BAD_PAYLOAD")
    grid = GRIDS.get(int(raw))
    if grid is None:
        return error(404, f"Tiling grid with id {raw} not found.", "COMMON_NOT_FOUND")
    return web.json_response(grid.descriptor())


# --- admin (no auth; documented in docs/simulator.md) -------------------------------------------
async def admin_config(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    if request.method in {"PUT", "PATCH", "POST"}:
        try:
            changes = await request.json()
            if not isinstance(changes, dict):
                raise ValueError("expected a JSON object")
            sim.configure(changes)
        except ValidationError as exc:
            return web.json_response(
                {"error": exc.errors(include_url=False, include_context=False)}, status=400
            )
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(sim.config.model_dump(mode="json"))


async def admin_stats(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR]
    return web.json_response({"requests": dict(sim.stats), "batch_requests": len(sim.store.order)})


async def admin_revoke(request: web.Request) -> web.Response:
    request.app[SIMULATOR].tokens.revoke_all()
    return web.Response(status=204)


def build_app(sim: Simulator) -> web.Application:
    app = web.Application(client_max_size=32 * 1024**2)
    app[SIMULATOR] = sim
    app.router.add_post(TOKEN_PATH, token)
    routes: list[tuple[str, str, str, Handler]] = [
        ("POST", "/process", "create", create),
        ("GET", "/process", "list", list_requests),
        ("GET", "/process/{id}", "get", get_request),
        ("PUT", "/process/{id}", "update", update_request),
        ("POST", "/process/{id}/analyse", "analyse", _action("analyse")),
        ("POST", "/process/{id}/start", "start", _action("start")),
        ("POST", "/process/{id}/stop", "stop", _action("stop")),
        ("DELETE", "/process/{id}", "delete", method_not_allowed),
        ("GET", "/tilinggrids", "grids", list_grids),
        ("GET", "/tilinggrids/{id}", "grid", get_grid),
    ]
    for prefix in API_PREFIXES:
        for method, path, name, handler in routes:
            guarded = _guarded(name, handler)
            app.router.add_route(method, prefix + path, guarded)
            if not path.endswith("}"):  # collections also answer with a trailing slash (§1.2)
                app.router.add_route(method, prefix + path + "/", guarded)
    app.router.add_route("*", "/admin/config", admin_config)
    app.router.add_get("/admin/stats", admin_stats)
    app.router.add_post("/admin/revoke-tokens", admin_revoke)
    return app
