"""The HTTP face of the emulator: both Work API flavours, and the admin API under /_emulator/.

A plain ASGI callable (for speed and for dropping connections on purpose) that uses Starlette's request
and response types, and a Starlette router for the admin API.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections import Counter, deque
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, Router
from starlette.types import Receive, Scope, Send

from ._errors import ApiError
from ._faults import Faults
from ._settings import EmulatorSettings
from ._store import Store, parse_rfc3339

NO_HEARTBEAT = "NO_HEARTBEAT"
BETA = "managed-agents-2026-04-01"
PREFIXES = (
    ("anthropic", re.compile(r"^/v1/environments/(?P<env>[^/]+)/work(?P<rest>(/[^/]*){0,2})$")),
    ("qoder", re.compile(r"^/api/v1/cloud/environments/(?P<env>[^/]+)/work(?P<rest>(/[^/]*){0,2})$")),
)
WORKER_HEADER = {"anthropic": "anthropic-worker-id", "qoder": "worker-id"}
PRECONDITION_TYPE = {"anthropic": "invalid_request_error", "qoder": "precondition_failed_error"}
LIST_LIMITS = {"anthropic": (20, 1000), "qoder": (20, 100)}
MANAGEMENT_OPERATIONS = ("get", "update")


def classify(method: str, path: str) -> tuple[str, str, str, str | None] | None:
    """(flavour, environment_id, operation, work_id) of a Work API request, or None."""
    for flavour, pattern in PREFIXES:
        match = pattern.match(path)
        if not match:
            continue
        env, parts = match["env"], [p for p in match["rest"].split("/") if p]
        if not parts:
            return (flavour, env, "list", None) if method == "GET" else None
        if len(parts) == 1:
            if parts[0] == "poll":
                return (flavour, env, "poll", None) if method == "GET" else None
            if parts[0] == "stats":
                return (flavour, env, "stats", None) if method == "GET" else None
            return flavour, env, "get" if method == "GET" else "update", parts[0]
        if method == "POST" and parts[1] in ("ack", "heartbeat", "stop"):
            return flavour, env, parts[1], parts[0]
    return None


class DropConnection(Exception):
    """Raised to close the connection without a complete response."""


class EmulatorApp:
    def __init__(self, settings: EmulatorSettings) -> None:
        self.settings = settings
        self.store = Store(settings)
        self.faults = Faults()
        self.requests: deque[dict[str, Any]] = deque(maxlen=settings.request_log_limit)
        self.requests_dropped = 0
        self.counts: Counter[tuple[str, int]] = Counter()
        from ._admin import admin_routes

        self.admin = Router(
            routes=[Route(path, endpoint, methods=methods) for path, endpoint, methods in admin_routes(self)]
        )

    def update_settings(self, settings: EmulatorSettings) -> None:
        self.settings = settings
        self.store.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if path.startswith("/_emulator/"):
            await self.admin(scope, receive, send)
            return
        await self._work_api(scope, receive, send)

    # -- the Work API -------------------------------------------------------------------------------

    async def _work_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        method, path = request.method, scope["path"]
        query = dict(parse_qsl(scope.get("query_string", b"").decode(), keep_blank_values=True))
        found = classify(method, path)
        flavour = found[0] if found else ("qoder" if path.startswith("/api/") else "anthropic")
        client_request_id = request.headers.get("x-request-id")
        request_id = client_request_id if flavour == "qoder" and client_request_id else f"req_{secrets.token_hex(12)}"
        operation = found[2] if found else "unknown"
        environment_id = found[1] if found else None
        worker_id = request.headers.get(WORKER_HEADER[flavour])
        status = 500
        try:
            if found is None:
                raise ApiError(404, f"no route for {method} {path}")
            fault = self.faults.take(operation, found[1])
            if fault is not None:
                if fault.latency_ms:
                    await asyncio.sleep(fault.latency_ms / 1000)
                if fault.drop:
                    raise DropConnection
                if fault.status is not None:
                    error = ApiError(fault.status, f"injected fault: HTTP {fault.status}")
                    status = fault.status
                    response: Response = JSONResponse(error.body(request_id), status, headers=fault.headers())
                    raise _Respond(response)
            self._authenticate(request, flavour, operation)
            body = await self._dispatch(request, query, flavour, found[1], operation, found[3], worker_id)
            status = 200
            response = JSONResponse(body)
        except _Respond as ready:
            response = ready.response
        except ApiError as error:
            status = error.status
            response = JSONResponse(error.body(request_id), error.status)
        except DropConnection:
            status = 0
            self._log(method, path, query, status, operation, environment_id, worker_id)
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]})
            await send({"type": "http.response.body", "body": b"{", "more_body": True})
            return  # the server closes a connection whose response is incomplete
        response.headers["request-id"] = request_id
        self._log(method, path, query, status, operation, environment_id, worker_id)
        await response(scope, receive, send)

    def _log(
        self,
        method: str,
        path: str,
        query: dict[str, str],
        status: int,
        operation: str,
        environment_id: str | None,
        worker_id: str | None,
    ) -> None:
        if len(self.requests) == self.requests.maxlen:
            self.requests_dropped += 1
        self.requests.append(
            {
                "method": method,
                "path": path,
                "query": query,
                "status": status,
                "at": datetime.now(UTC).isoformat(),
                "t": time.monotonic(),
                "operation": operation,
                "environment_id": environment_id,
                "worker_id": worker_id,
            }
        )
        self.counts[(operation, status)] += 1

    def _authenticate(self, request: Request, flavour: str, operation: str) -> None:
        authorization = request.headers.get("authorization", "")
        key = authorization[7:] if authorization.lower().startswith("bearer ") else None
        if key is None and flavour == "anthropic":
            key = request.headers.get("x-api-key")
        settings = self.settings
        known = {settings.key, settings.management_key} - {None}
        if not key or key not in known:
            raise ApiError(401, "invalid or missing credentials")
        if settings.management_key:
            wants_management = operation in MANAGEMENT_OPERATIONS
            if wants_management and key != settings.management_key:
                raise ApiError(403, f"{operation} needs an API key, not the environment key")
            if not wants_management and key != settings.key:
                raise ApiError(403, f"{operation} needs the environment key")
        if flavour == "anthropic" and settings.require_anthropic_headers:
            if not request.headers.get("anthropic-version"):
                raise ApiError(400, "anthropic-version header is required")
            betas = [b.strip() for b in request.headers.get("anthropic-beta", "").split(",")]
            if BETA not in betas:
                raise ApiError(400, f"the anthropic-beta header must include {BETA}")

    async def _dispatch(
        self,
        request: Request,
        query: dict[str, str],
        flavour: str,
        environment_id: str,
        operation: str,
        work_id: str | None,
        worker_id: str | None,
    ) -> Any:
        store = self.store
        env = store.environment(environment_id)
        if not env.self_hosted:
            raise ApiError(400, f"environment {environment_id} is not self_hosted")
        if operation == "poll":
            block_ms = _int_param(query, "block_ms")
            if block_ms is not None and not 1 <= block_ms <= 999:
                raise ApiError(400, "block_ms must be between 1 and 999")
            reclaim = _int_param(query, "reclaim_older_than_ms")
            if reclaim is not None and reclaim < 0:
                raise ApiError(400, "reclaim_older_than_ms must not be negative")
            item = await store.poll(environment_id, worker_id or "anonymous", block_ms, reclaim)
            if item is None:
                return None
            if flavour == "anthropic" and item.secret is None:
                item.secret = store._secret()
            return item.to_json(with_secret=flavour == "anthropic")
        assert_work = work_id or ""
        if operation == "ack":
            strict = flavour == "qoder" or self.settings.ack_requires_polling_worker
            return store.ack(environment_id, assert_work, worker_id, strict).to_json()
        if operation == "heartbeat":
            expected = query.get("expected_last_heartbeat")
            if flavour == "qoder" and expected not in (None, NO_HEARTBEAT) and parse_rfc3339(expected) is None:
                raise ApiError(400, "expected_last_heartbeat must be NO_HEARTBEAT or an RFC 3339 timestamp")
            desired = query.get("desired_ttl_seconds")
            ttl: int | None = None
            if desired is not None:
                if not desired.isdigit() or int(desired) <= 0:
                    raise ApiError(400, "desired_ttl_seconds must be a positive integer")
                ttl = int(desired)
            return store.heartbeat(
                environment_id,
                assert_work,
                expected=expected,
                desired_ttl=ttl,
                flavour=flavour,
                precondition_type=PRECONDITION_TYPE[flavour],
            )
        if operation == "stop":
            body = await _json_body(request, allow_empty=True)
            force = False
            if body is not None:
                if not isinstance(body, dict) or not isinstance(body.get("force", False), bool):
                    raise ApiError(400, 'the body is {"force": true|false}')
                force = body.get("force", False)
            return store.stop(environment_id, assert_work, force).to_json()
        if operation == "get":
            return store.item(environment_id, assert_work).to_json()
        if operation == "update":
            body = await _json_body(request, allow_empty=False)
            if not isinstance(body, dict):
                raise ApiError(400, 'the body is {"metadata": {...}}')
            return store.update(environment_id, assert_work, body.get("metadata")).to_json()
        if operation == "list":
            return self._list(flavour, environment_id, query)
        if operation == "stats":
            return store.stats(environment_id)
        raise ApiError(404, "unknown operation")  # pragma: no cover

    def _list(self, flavour: str, environment_id: str, query: dict[str, str]) -> dict[str, Any]:
        default, maximum = LIST_LIMITS[flavour]
        limit = _int_param(query, "limit")
        if limit is None:
            limit = default
        if not 1 <= limit <= maximum:
            raise ApiError(400, f"limit must be between 1 and {maximum}")
        items = self.store.listing(environment_id)
        ids = [item.id for item in items]
        start = 0
        page = query.get("page")
        if page:
            if not page.startswith("p") or not page[1:].isdigit():
                raise ApiError(400, "invalid page cursor")
            start = int(page[1:])
        after_id, before_id = query.get("after_id"), query.get("before_id")
        end = len(items)
        if after_id:
            if after_id not in ids:
                raise ApiError(400, "after_id is not an item of this environment")
            start = ids.index(after_id) + 1
        if before_id:
            if before_id not in ids:
                raise ApiError(400, "before_id is not an item of this environment")
            end = ids.index(before_id)
            start = max(start, end - limit) if not after_id else start
        chosen = items[start : min(start + limit, end)]
        has_more = start + limit < end
        result: dict[str, Any] = {
            "data": [item.to_json() for item in chosen],
            "next_page": f"p{start + limit}" if has_more else None,
        }
        if flavour == "qoder":
            result.update(
                first_id=chosen[0].id if chosen else None,
                last_id=chosen[-1].id if chosen else None,
                has_more=has_more,
            )
        return result


class _Respond(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _int_param(query: dict[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None


async def _json_body(request: Request, *, allow_empty: bool) -> Any:
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise DropConnection from None
    if not raw.strip():
        if allow_empty:
            return None
        raise ApiError(400, "a JSON body is required")
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "the body is not JSON") from None
