"""The admin API under /_emulator/ (no auth): for tests, demos and benchmarks.

Fixed (other tools rely on it): POST /_emulator/environments/{environment_id}/work and
GET /_emulator/requests. The rest is documented in the README.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ._errors import ApiError
from ._faults import Fault
from ._settings import EmulatorSettings

if TYPE_CHECKING:
    from ._app import EmulatorApp

Endpoint = Callable[[Request], Awaitable[Response]]


def _guard(handler: Endpoint) -> Endpoint:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as error:
            return JSONResponse(error.body("req_admin"), error.status)

    return wrapped


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "the body is not JSON") from None


def admin_routes(app: EmulatorApp) -> list[tuple[str, Endpoint, list[str]]]:
    store = app.store

    async def enqueue(request: Request) -> Response:
        body = await _body(request)
        count = body.get("count", 1)
        data_type = body.get("data_type", "session")
        metadata = body.get("metadata") or {}
        if not isinstance(count, int) or not 1 <= count <= 100_000:
            raise ApiError(400, "count must be an integer from 1 to 100000")
        if data_type not in ("session", "healthcheck"):
            raise ApiError(400, "data_type is session or healthcheck")
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ApiError(400, "metadata maps strings to strings")
        items = store.enqueue(request.path_params["environment_id"], count, data_type, metadata)
        return JSONResponse({"data": [item.to_json() for item in items]})

    async def requests(request: Request) -> Response:
        since = int(request.query_params.get("since", "0") or 0)
        entries = list(app.requests)[since:]
        data = [{k: v for k, v in e.items() if k != "t"} for e in entries]
        return JSONResponse({"data": data, "next": since + len(data), "dropped": app.requests_dropped})

    async def clear_requests(request: Request) -> Response:
        app.requests.clear()
        app.counts.clear()
        return JSONResponse({"data": []})

    async def stats(request: Request) -> Response:
        by_op: dict[str, dict[str, int]] = {}
        for (operation, status), count in app.counts.items():
            by_op.setdefault(operation, {})[str(status)] = count
        return JSONResponse({"requests": by_op, "total": sum(app.counts.values())})

    async def item(request: Request) -> Response:
        found = store.item(request.path_params["environment_id"], request.path_params["work_id"])
        return JSONResponse(found.internal())

    async def steal(request: Request) -> Response:
        found = store.steal(request.path_params["environment_id"], request.path_params["work_id"])
        return JSONResponse(found.internal())

    async def environment(request: Request) -> Response:
        body = await _body(request)
        env = store.environment(request.path_params["environment_id"])
        if "self_hosted" in body:
            env.self_hosted = bool(body["self_hosted"])
        return JSONResponse({"id": env.id, "self_hosted": env.self_hosted, "items": len(env.items)})

    async def faults(request: Request) -> Response:
        if request.method == "POST":
            app.faults.add(Fault.from_json(await _body(request)))
        elif request.method == "DELETE":
            app.faults.clear()
        return JSONResponse({"data": app.faults.listing()})

    async def settings(request: Request) -> Response:
        if request.method == "PATCH":
            body = await _body(request)
            names = {f.name for f in dataclasses.fields(EmulatorSettings)} - {"key"}
            unknown = set(body) - names
            if unknown:
                raise ApiError(400, f"unknown or read-only settings: {', '.join(sorted(unknown))}")
            try:
                app.update_settings(dataclasses.replace(app.settings, **body))
            except (TypeError, ValueError) as exc:
                raise ApiError(400, str(exc)) from None
        view = {f.name: getattr(app.settings, f.name) for f in dataclasses.fields(EmulatorSettings)}
        view["key"] = "<redacted>"
        if view["management_key"]:
            view["management_key"] = "<redacted>"
        return JSONResponse(view)

    async def reset(request: Request) -> Response:
        store.reset()
        app.faults.clear()
        app.requests.clear()
        app.counts.clear()
        return JSONResponse({"reset": True})

    routes: list[tuple[str, Endpoint, list[str]]] = [
        ("/_emulator/environments/{environment_id}/work", enqueue, ["POST"]),
        ("/_emulator/environments/{environment_id}/work/{work_id}", item, ["GET"]),
        ("/_emulator/environments/{environment_id}/work/{work_id}/steal", steal, ["POST"]),
        ("/_emulator/environments/{environment_id}", environment, ["PUT"]),
        ("/_emulator/requests", requests, ["GET"]),
        ("/_emulator/requests", clear_requests, ["DELETE"]),
        ("/_emulator/stats", stats, ["GET"]),
        ("/_emulator/faults", faults, ["GET", "POST", "DELETE"]),
        ("/_emulator/settings", settings, ["GET", "PATCH"]),
        ("/_emulator/reset", reset, ["POST"]),
    ]
    return [(path, _guard(handler), methods) for path, handler, methods in routes]
