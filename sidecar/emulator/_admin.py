"""The admin API under /_emulator/ (no auth): for tests, demos and benchmarks. Documented in ADMIN.md.

Fixed (other tools rely on them): `POST /_emulator/environments/{environment_id}/work` and
`GET /_emulator/requests`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router

from ._errors import ApiError
from ._faults import Fault
from ._ids import request_id
from ._settings import EmulatorSettings

if TYPE_CHECKING:
    from ._app import EmulatorApp

Endpoint = Callable[[Request], Awaitable[Response]]
READ_ONLY_SETTINGS = frozenset({"key"})
DATA_TYPES = ("session", "healthcheck")
MAX_ENQUEUE = 100_000


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


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer from {low} to {high}")
    return value


def admin_router(app: EmulatorApp) -> Router:
    store = app.store

    async def enqueue(request: Request) -> Response:
        body = await _body(request)
        count = _int(body.get("count", 1), "count", 1, MAX_ENQUEUE)
        data_type = body.get("data_type", "session")
        if data_type not in DATA_TYPES:
            raise ApiError(400, "data_type is session or healthcheck")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) and k for k, v in metadata.items()):
            raise ApiError(400, "metadata maps non-empty strings to strings")
        items = store.enqueue(request.path_params["environment_id"], count, data_type, metadata)
        return _Json({"data": [item.to_json() for item in items]})

    async def list_items(request: Request) -> Response:
        env = store.environment(request.path_params["environment_id"], create=False)
        return _Json({"data": [store.internal(item) for item in env.items.values()]})

    async def item(request: Request) -> Response:
        found = store.item(request.path_params["environment_id"], request.path_params["work_id"])
        return _Json(store.internal(found))

    async def steal(request: Request) -> Response:
        found = store.steal(request.path_params["environment_id"], request.path_params["work_id"])
        return _Json(store.internal(found))

    async def expire(request: Request) -> Response:
        found = store.expire(request.path_params["environment_id"], request.path_params["work_id"])
        return _Json(store.internal(found))

    async def environment(request: Request) -> Response:
        environment_id = request.path_params["environment_id"]
        if request.method == "GET":
            return _Json(store.environment(environment_id, create=False).view())
        body = await _body(request)
        unknown = set(body) - {"self_hosted", "permitted"}
        if unknown:
            raise ApiError(400, f"unknown environment fields: {', '.join(sorted(unknown))}")
        for name in ("self_hosted", "permitted"):
            if name in body and not isinstance(body[name], bool):
                raise ApiError(400, f"{name} must be a boolean")
        env = store.environment(environment_id, create=True)
        env.self_hosted = body.get("self_hosted", env.self_hosted)
        env.permitted = body.get("permitted", env.permitted)
        return _Json(env.view())

    async def requests(request: Request) -> Response:
        since = request.query_params.get("since", "0")
        if not since.isdigit():
            raise ApiError(400, "since must be a non-negative integer")
        data = app.log.since(int(since))
        return _Json({"data": data, "next": app.log.next_seq})

    async def clear_requests(request: Request) -> Response:
        app.log.clear()
        return _Json({"data": [], "next": app.log.next_seq})

    async def stats(request: Request) -> Response:
        by_operation: dict[str, dict[str, int]] = {}
        for (operation, status), count in app.log.counts.items():
            by_operation.setdefault(operation, {})[str(status)] = count
        return _Json(
            {
                "requests": by_operation,
                "total": sum(app.log.counts.values()),
                "in_flight": app.log.in_flight,
                "environments": len(store.environments),
                "started_at": app.started_at,
            }
        )

    async def clear_stats(request: Request) -> Response:
        app.log.clear_counts()
        return await stats(request)

    async def faults(request: Request) -> Response:
        if request.method == "POST":
            fault = app.faults.add(Fault.from_json(await _body(request)))
            return _Json({"data": app.faults.listing(), "fault": fault.to_json()})
        if request.method == "DELETE":
            app.faults.clear()
        return _Json({"data": app.faults.listing()})

    async def fault(request: Request) -> Response:
        fault_id = request.path_params["fault_id"]
        if not app.faults.remove(fault_id):
            raise ApiError(404, f"no fault {fault_id}")
        return _Json({"data": app.faults.listing()})

    async def settings(request: Request) -> Response:
        if request.method == "PATCH":
            body = await _body(request)
            names = {f.name for f in dataclasses.fields(EmulatorSettings)}
            unknown = set(body) - names
            read_only = set(body) & READ_ONLY_SETTINGS
            if unknown or read_only:
                raise ApiError(400, f"unknown or read-only settings: {', '.join(sorted(unknown | read_only))}")
            try:
                app.replace_settings(dataclasses.replace(app.settings, **body))
            except (TypeError, ValueError) as exc:
                raise ApiError(400, str(exc)) from None
        return _Json(app.settings.public_view())

    async def reset(request: Request) -> Response:
        app.reset()
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
