"""The admin face: the admin API under /_emulator/ (no auth), for tests, demos and benchmarks. Every path is
documented in ADMIN.md (next to this file) and a public contract; `admin_client.py` is its client.

Fixed (other tools rely on them): `POST /_emulator/environments/{environment_id}/work` and
`GET /_emulator/requests`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router

from ._core import EmulatorCore
from ._errors import ApiError
from ._ids import request_id
from ._settings import EmulatorSettings

Endpoint = Callable[[Request], Awaitable[Response]]
READ_ONLY_SETTINGS = frozenset({"key"})


class _Json(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()


def _endpoint(handler: Endpoint) -> Endpoint:
    """Errors as the Work API's envelope, and a `request-id` header on every answer."""

    async def wrapped(request: Request) -> Response:
        rid = request_id()
        try:
            response = await handler(request)
        except ApiError as error:
            response = _Json(error.body(rid), error.status)
        response.headers["request-id"] = rid
        return response

    return wrapped


async def _body(request: Request) -> dict[str, Any]:
    """The JSON object body (any content type, so `curl -d '{…}'` works); empty body: {}."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


def admin_router(core: EmulatorCore) -> Router:
    """The admin face: HTTP in, `EmulatorCore` controls, JSON out."""
    store = core.store

    def env_id(request: Request) -> str:
        environment_id: str = request.path_params["environment_id"]
        return environment_id

    def work_id(request: Request) -> str:
        value: str = request.path_params["work_id"]
        return value

    async def enqueue(request: Request) -> Response:
        body = await _body(request)
        items = core.enqueue(
            env_id(request), body.get("count", 1), body.get("data_type", "session"), body.get("metadata")
        )
        return _Json({"data": items})

    async def list_items(request: Request) -> Response:
        return _Json({"data": core.item_views(env_id(request))})

    async def item(request: Request) -> Response:
        return _Json(core.item_view(env_id(request), work_id(request)))

    async def steal(request: Request) -> Response:
        return _Json(core.steal(env_id(request), work_id(request)))

    async def expire(request: Request) -> Response:
        return _Json(core.expire(env_id(request), work_id(request)))

    async def environment(request: Request) -> Response:
        if request.method == "GET":
            return _Json(store.environment_view(env_id(request)))
        body = await _body(request)
        unknown = set(body) - {"self_hosted", "permitted"}
        if unknown:
            raise ApiError(400, f"unknown environment fields: {', '.join(sorted(unknown))}")
        for name in ("self_hosted", "permitted"):
            if name in body and not isinstance(body[name], bool):
                raise ApiError(400, f"{name} must be a boolean")
        view = store.set_environment(
            env_id(request), self_hosted=body.get("self_hosted"), permitted=body.get("permitted")
        )
        return _Json(view)

    async def requests(request: Request) -> Response:
        since = request.query_params.get("since", "0")
        if not since.isdigit():
            raise ApiError(400, "since must be a non-negative integer")
        return _Json({"data": core.log.since(int(since)), "next": core.log.next_seq})

    async def clear_requests(request: Request) -> Response:
        core.log.clear()
        return _Json({"data": [], "next": core.log.next_seq})

    async def stats(request: Request) -> Response:
        return _Json(core.stats())

    async def clear_stats(request: Request) -> Response:
        core.log.clear_counts()
        return _Json(core.stats())

    async def faults(request: Request) -> Response:
        if request.method == "POST":
            fault = core.add_fault(await _body(request))
            return _Json({"data": core.faults.listing(), "fault": fault})
        if request.method == "DELETE":
            core.faults.clear()
        return _Json({"data": core.faults.listing()})

    async def fault(request: Request) -> Response:
        fault_id = request.path_params["fault_id"]
        if not core.faults.remove(fault_id):
            raise ApiError(404, f"no fault {fault_id}")
        return _Json({"data": core.faults.listing()})

    async def settings(request: Request) -> Response:
        if request.method == "PATCH":
            body = await _body(request)
            names = {f.name for f in dataclasses.fields(EmulatorSettings)}
            unknown = set(body) - names
            read_only = set(body) & READ_ONLY_SETTINGS
            if unknown or read_only:
                raise ApiError(400, f"unknown or read-only settings: {', '.join(sorted(unknown | read_only))}")
            try:
                core.update_settings(body)
            except (TypeError, ValueError) as exc:
                raise ApiError(400, str(exc)) from None
        return _Json(core.settings.public_view())

    async def reset(request: Request) -> Response:
        core.reset()
        return _Json({"reset": True})

    routes: list[tuple[str, Endpoint, list[str]]] = [
        ("/_emulator/environments/{environment_id}/work", enqueue, ["POST"]),
        ("/_emulator/environments/{environment_id}/work", list_items, ["GET"]),
        ("/_emulator/environments/{environment_id}/work/{work_id}", item, ["GET"]),
        ("/_emulator/environments/{environment_id}/work/{work_id}/steal", steal, ["POST"]),
        ("/_emulator/environments/{environment_id}/work/{work_id}/expire", expire, ["POST"]),
        ("/_emulator/environments/{environment_id}", environment, ["GET", "PUT"]),
        ("/_emulator/requests", requests, ["GET"]),
        ("/_emulator/requests", clear_requests, ["DELETE"]),
        ("/_emulator/stats", stats, ["GET"]),
        ("/_emulator/stats", clear_stats, ["DELETE"]),
        ("/_emulator/faults", faults, ["GET", "POST", "DELETE"]),
        ("/_emulator/faults/{fault_id:int}", fault, ["DELETE"]),
        ("/_emulator/settings", settings, ["GET", "PATCH"]),
        ("/_emulator/reset", reset, ["POST"]),
    ]

    async def not_found(scope: Any, receive: Any, send: Any) -> None:
        rid = request_id()
        error = ApiError(404, f"no admin endpoint {scope['method']} {scope['path']}")
        await _Json(error.body(rid), 404, headers={"request-id": rid})(scope, receive, send)

    return Router(
        routes=[Route(path, _endpoint(handler), methods=methods) for path, handler, methods in routes],
        default=not_found,
    )
