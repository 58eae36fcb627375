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


def _env_id(request: Request) -> str:
    environment_id: str = request.path_params["environment_id"]
    return environment_id


def _work_id(request: Request) -> str:
    value: str = request.path_params["work_id"]
    return value


class _AdminApi:
    """The admin endpoints, one method each, over one emulator core."""

    def __init__(self, core: EmulatorCore) -> None:
        self.core = core
        self.store = core.store

    async def enqueue(self, request: Request) -> Response:
        body = await _body(request)
        items = self.core.enqueue(
            _env_id(request), body.get("count", 1), body.get("data_type", "session"), body.get("metadata")
        )
        return _Json({"data": items})

    async def list_items(self, request: Request) -> Response:
        return _Json({"data": self.core.item_views(_env_id(request))})

    async def item(self, request: Request) -> Response:
        return _Json(self.core.item_view(_env_id(request), _work_id(request)))

    async def steal(self, request: Request) -> Response:
        return _Json(self.core.steal(_env_id(request), _work_id(request)))

    async def expire(self, request: Request) -> Response:
        return _Json(self.core.expire(_env_id(request), _work_id(request)))

    async def environment(self, request: Request) -> Response:
        if request.method == "GET":
            return _Json(self.store.environment_view(_env_id(request)))
        body = await _body(request)
        unknown = set(body) - {"self_hosted", "permitted"}
        if unknown:
            raise ApiError(400, f"unknown environment fields: {', '.join(sorted(unknown))}")
        for name in ("self_hosted", "permitted"):
            if name in body and not isinstance(body[name], bool):
                raise ApiError(400, f"{name} must be a boolean")
        view = self.store.set_environment(
            _env_id(request), self_hosted=body.get("self_hosted"), permitted=body.get("permitted")
        )
        return _Json(view)

    async def requests(self, request: Request) -> Response:
        since = request.query_params.get("since", "0")
        if not since.isdigit():
            raise ApiError(400, "since must be a non-negative integer")
        return _Json({"data": self.core.log.since(int(since)), "next": self.core.log.next_seq})

    async def clear_requests(self, request: Request) -> Response:
        self.core.log.clear()
        return _Json({"data": [], "next": self.core.log.next_seq})

    async def stats(self, request: Request) -> Response:
        return _Json(self.core.stats())

    async def clear_stats(self, request: Request) -> Response:
        self.core.log.clear_counts()
        return _Json(self.core.stats())

    async def faults(self, request: Request) -> Response:
        faults = self.core.faults
        if request.method == "POST":
            fault = self.core.add_fault(await _body(request))
            return _Json({"data": faults.listing(), "fault": fault})
        if request.method == "DELETE":
            faults.clear()
        return _Json({"data": faults.listing()})

    async def fault(self, request: Request) -> Response:
        fault_id = request.path_params["fault_id"]
        if not self.core.faults.remove(fault_id):
            raise ApiError(404, f"no fault {fault_id}")
        return _Json({"data": self.core.faults.listing()})

    async def settings(self, request: Request) -> Response:
        if request.method == "PATCH":
            body = await _body(request)
            names = {f.name for f in dataclasses.fields(EmulatorSettings)}
            unknown = set(body) - names
            read_only = set(body) & READ_ONLY_SETTINGS
            if unknown or read_only:
                raise ApiError(400, f"unknown or read-only settings: {', '.join(sorted(unknown | read_only))}")
            try:
                self.core.update_settings(body)
            except (TypeError, ValueError) as exc:
                raise ApiError(400, str(exc)) from None
        return _Json(self.core.settings.public_view())

    async def reset(self, request: Request) -> Response:
        self.core.reset()
        return _Json({"reset": True})

    def routes(self) -> list[tuple[str, Endpoint, list[str]]]:
        return [
            ("/_emulator/environments/{environment_id}/work", self.enqueue, ["POST"]),
            ("/_emulator/environments/{environment_id}/work", self.list_items, ["GET"]),
            ("/_emulator/environments/{environment_id}/work/{work_id}", self.item, ["GET"]),
            ("/_emulator/environments/{environment_id}/work/{work_id}/steal", self.steal, ["POST"]),
            ("/_emulator/environments/{environment_id}/work/{work_id}/expire", self.expire, ["POST"]),
            ("/_emulator/environments/{environment_id}", self.environment, ["GET", "PUT"]),
            ("/_emulator/requests", self.requests, ["GET"]),
            ("/_emulator/requests", self.clear_requests, ["DELETE"]),
            ("/_emulator/stats", self.stats, ["GET"]),
            ("/_emulator/stats", self.clear_stats, ["DELETE"]),
            ("/_emulator/faults", self.faults, ["GET", "POST", "DELETE"]),
            ("/_emulator/faults/{fault_id:int}", self.fault, ["DELETE"]),
            ("/_emulator/settings", self.settings, ["GET", "PATCH"]),
            ("/_emulator/reset", self.reset, ["POST"]),
        ]


async def _not_found(scope: Any, receive: Any, send: Any) -> None:
    rid = request_id()
    error = ApiError(404, f"no admin endpoint {scope['method']} {scope['path']}")
    await _Json(error.body(rid), 404, headers={"request-id": rid})(scope, receive, send)


def admin_router(core: EmulatorCore) -> Router:
    """The admin face: HTTP in, `EmulatorCore` controls, JSON out."""
    return Router(
        routes=[
            Route(path, _endpoint(handler), methods=methods) for path, handler, methods in _AdminApi(core).routes()
        ],
        default=_not_found,
    )
