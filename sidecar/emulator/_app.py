"""The HTTP face of the emulator: both Work API flavours on one ASGI app, plus the admin API under /_emulator/.

The Work API path is a plain ASGI handler (no framework routing, headers read once, compact JSON) so that a
heartbeat costs little, and so that a fault can drop the connection without any response. The admin API is a
Starlette router (see `_admin.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections import Counter, deque
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from typing import Any
from urllib.parse import unquote_plus

from starlette.routing import Router
from starlette.types import Receive, Scope, Send

from ._errors import ApiError
from ._faults import Faults
from ._ids import parse_rfc3339, request_id, rfc3339, utcnow
from ._settings import EmulatorSettings
from ._store import NO_HEARTBEAT, Store, decode_cursor, encode_cursor

log = logging.getLogger("sidecar.emulator")

BETA = "managed-agents-2026-04-01"
ANTHROPIC_PREFIX = "/v1/environments/"
QODER_PREFIX = "/api/v1/cloud/environments/"
WORKER_HEADER = {"anthropic": "anthropic-worker-id", "qoder": "worker-id"}
PRECONDITION_TYPE = {"anthropic": "invalid_request_error", "qoder": "precondition_failed_error"}
LIST_LIMITS = {"anthropic": (20, 1000), "qoder": (20, 100)}
ENVIRONMENT_KEY_OPERATIONS = frozenset({"poll", "ack", "heartbeat", "stop", "list"})
MANAGEMENT_KEY_OPERATIONS = frozenset({"get", "update"})
ITEM_TOKEN_OPERATIONS = frozenset({"heartbeat", "stop"})
_HEADERS = frozenset(
    {b"authorization", b"x-api-key", b"anthropic-version", b"anthropic-beta", b"anthropic-worker-id", b"worker-id"}
    | {b"x-request-id"}
)
_DIGITS = re.compile(r"[0-9]+")
_SIGNED_DIGITS = re.compile(r"-?[0-9]+")
_JSON = (b"content-type", b"application/json")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(slots=True)
class Route:
    flavour: str
    environment_id: str
    operation: str
    work_id: str | None


def route(method: str, path: str) -> Route | ApiError:
    """The Work API operation a request names, or the error it gets (404 unknown path, 405 wrong method)."""
    if path.startswith(ANTHROPIC_PREFIX):
        flavour, rest = "anthropic", path[len(ANTHROPIC_PREFIX) :]
    elif path.startswith(QODER_PREFIX):
        flavour, rest = "qoder", path[len(QODER_PREFIX) :]
    else:
        return ApiError(404, f"no such endpoint: {method} {path}")
    parts = rest.split("/")
    if len(parts) < 2 or parts[1] != "work" or not parts[0] or len(parts) > 4 or not all(parts):
        return ApiError(404, f"no such endpoint: {method} {path}")
    env = parts[0]
    if len(parts) == 2:
        return Route(flavour, env, "list", None) if method == "GET" else _not_allowed(method, path)
    name = parts[2]
    if len(parts) == 3:
        if name in ("poll", "stats"):
            return Route(flavour, env, name, None) if method == "GET" else _not_allowed(method, path)
        if method == "GET":
            return Route(flavour, env, "get", name)
        if method == "POST":
            return Route(flavour, env, "update", name)
        return _not_allowed(method, path)
    action = parts[3]
    if action not in ("ack", "heartbeat", "stop"):
        return ApiError(404, f"no such endpoint: {method} {path}")
    return Route(flavour, env, action, name) if method == "POST" else _not_allowed(method, path)


def _not_allowed(method: str, path: str) -> ApiError:
    return ApiError(405, f"method {method} is not allowed on {path}")


class RequestLog:
    """Every Work API request in arrival order (bounded), and cheap counts per operation and status."""

    def __init__(self, limit: int) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=limit)
        self.next_seq = 0
        self.counts: Counter[tuple[str, int]] = Counter()
        self.in_flight = 0

    def resize(self, limit: int) -> None:
        if limit != self.entries.maxlen:
            self.entries = deque(self.entries, maxlen=limit)

    def open(self, entry: dict[str, Any]) -> dict[str, Any]:
        entry["seq"] = self.next_seq
        self.next_seq += 1
        self.in_flight += 1
        self.entries.append(entry)
        return entry

    def close(self, entry: dict[str, Any], status: int, started: float) -> None:
        entry["status"] = status
        entry["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
        self.in_flight -= 1
        self.counts[(entry["operation"], status)] += 1

    def since(self, seq: int) -> list[dict[str, Any]]:
        if not self.entries:
            return []
        first = self.entries[0]["seq"]
        return [
            {**entry, "at": rfc3339(datetime.fromtimestamp(entry["at"], UTC))}
            for entry in islice(self.entries, max(0, seq - first), None)
        ]

    def clear(self) -> None:
        """Forget the logged requests (the counts stay: `clear_counts`)."""
        self.entries.clear()

    def clear_counts(self) -> None:
        self.counts.clear()


class EmulatorApp:
    """The ASGI application. All state lives in `store`; `settings` can be replaced at any time."""

    def __init__(self, settings: EmulatorSettings) -> None:
        self.store = Store(settings)
        self.faults = Faults()
        self.log = RequestLog(settings.request_log_limit)
        self.started_at = rfc3339(utcnow())
        from ._admin import admin_router

        self.admin: Router = admin_router(self)

    @property
    def settings(self) -> EmulatorSettings:
        return self.store.settings

    def replace_settings(self, settings: EmulatorSettings) -> None:
        self.store.settings = settings
        self.log.resize(settings.request_log_limit)

    def reset(self) -> None:
        self.store.reset()
        self.faults.clear()
        self.log.clear()
        self.log.clear_counts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"].startswith("/_emulator/"):
                await self.admin(scope, receive, _with_request_id(send))
            else:
                await self._work_api(scope, receive, send)
        elif scope["type"] == "lifespan":  # only when a host server runs lifespan: nothing to set up
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    # -- the Work API -------------------------------------------------------------------------------------

    async def _work_api(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        method: str = scope["method"]
        path: str = scope["path"]
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in _HEADERS:
                headers[name] = value.decode("latin-1")
        raw_query: bytes = scope.get("query_string", b"")
        query = _parse_query(raw_query) if raw_query else {}
        found = route(method, path)
        flavour = found.flavour if isinstance(found, Route) else ("qoder" if path.startswith("/api/") else "anthropic")
        client_request_id = headers.get(b"x-request-id")
        rid = client_request_id if flavour == "qoder" and client_request_id else request_id()
        worker_id = headers.get(WORKER_HEADER[flavour].encode(), "")
        entry = self.log.open(
            {
                "method": method,
                "path": path,
                "query": query,
                "status": None,
                "at": time.time(),  # formatted when read
                "operation": found.operation if isinstance(found, Route) else "unknown",
                "flavour": flavour,
                "environment_id": found.environment_id if isinstance(found, Route) else None,
                "work_id": found.work_id if isinstance(found, Route) else None,
                "worker_id": worker_id or None,
                "request_id": rid,
            }
        )
        extra_headers: dict[str, str] = {}
        status = 500
        try:
            if isinstance(found, ApiError):
                raise found
            if self.faults:
                latency_ms, fault = self.faults.take(found.operation, found.environment_id)
                if latency_ms:
                    await asyncio.sleep(latency_ms / 1000)
                if fault is not None and fault.drop:
                    status = 0
                    await _drop_connection(send)
                    return
                if fault is not None:
                    raise fault.error()
            self._authorize(headers, found)
            status, body = 200, _dumps(await self._dispatch(found, query, worker_id, receive))
        except ApiError as error:
            status, body, extra_headers = error.status, _dumps(error.body(rid)), error.headers
            if error.status == 405:
                extra_headers = {**extra_headers, "allow": "POST" if method == "GET" else "GET"}
        except Exception:
            log.exception("emulator: unexpected error on %s %s", method, path)
            status, body = 500, _dumps(ApiError(500, "internal error in the emulator").body(rid))
        finally:
            self.log.close(entry, status, started)
        response_headers = [_JSON, (b"content-length", str(len(body)).encode()), (b"request-id", rid.encode())]
        if flavour == "qoder":
            response_headers.append((b"x-request-id", rid.encode()))
        response_headers.extend((k.encode(), v.encode()) for k, v in extra_headers.items())
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})

    def _authorize(self, headers: dict[bytes, str], found: Route) -> None:
        settings = self.settings
        flavour, operation = found.flavour, found.operation
        credential: str | None = None
        scheme, _, token = headers.get(b"authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            credential = token.strip()
        elif flavour == "anthropic":  # Qoder takes no X-Api-Key
            credential = headers.get(b"x-api-key", "").strip() or None
        if credential is None:
            hint = " (Qoder takes a personal access token as Authorization: Bearer only)" if flavour == "qoder" else ""
            raise ApiError(401, f"missing credentials{hint}")
        if secrets.compare_digest(credential, settings.key):
            kind = "environment"
        elif settings.management_key is not None and secrets.compare_digest(credential, settings.management_key):
            kind = "management"
        elif flavour == "anthropic" and settings.accept_item_token and credential in self.store.tokens:
            kind = "item"
        else:
            raise ApiError(401, "invalid credentials")
        if kind == "item":
            item = self.store.tokens[credential]
            if operation not in ITEM_TOKEN_OPERATIONS or (item.id, item.environment_id) != (
                found.work_id,
                found.environment_id,
            ):
                raise ApiError(403, f"a work item's secret is not valid for {operation} here")
        elif settings.management_key is not None:
            if kind == "environment" and operation in MANAGEMENT_KEY_OPERATIONS:
                raise ApiError(403, f"{operation} takes an API key; it rejects the environment key")
            if kind == "management" and operation in ENVIRONMENT_KEY_OPERATIONS:
                raise ApiError(403, f"{operation} takes the environment key; it rejects an API key")
        if flavour == "anthropic" and settings.require_anthropic_headers:
            if not headers.get(b"anthropic-version"):
                raise ApiError(400, "anthropic-version: header is required")
            betas = headers.get(b"anthropic-beta", "")
            if BETA not in (b.strip() for b in betas.split(",")):
                raise ApiError(400, f"anthropic-beta: this endpoint requires the {BETA} beta")

    async def _dispatch(self, found: Route, query: dict[str, str], worker_id: str, receive: Receive) -> Any:
        flavour, operation, work_id = found.flavour, found.operation, found.work_id or ""
        store, settings = self.store, self.settings
        # Parameters first (400), then the environment (404, 403, 400 not self-hosted), then the item.
        if operation == "poll":
            block_ms = _int_param(query, "block_ms")
            if block_ms is not None and not 1 <= block_ms <= 999:
                raise ApiError(400, "block_ms must be between 1 and 999 (omit it for a non-blocking poll)")
            reclaim_ms = _int_param(query, "reclaim_older_than_ms")
            if reclaim_ms is not None and reclaim_ms < 0:
                raise ApiError(400, "reclaim_older_than_ms must not be negative")
            self._environment(found)
            item = await store.poll(found.environment_id, worker_id, block_ms, reclaim_ms)
            if item is None:
                return None
            if flavour == "anthropic":
                store.issue_secret(item)
                return item.to_json(with_secret=True)
            return item.to_json()
        if operation == "heartbeat":
            expected = query.get("expected_last_heartbeat")
            if (
                flavour == "qoder"
                and expected is not None
                and expected != NO_HEARTBEAT
                and parse_rfc3339(expected) is None
            ):
                raise ApiError(400, "expected_last_heartbeat must be NO_HEARTBEAT or an RFC 3339 timestamp")
            desired = query.get("desired_ttl_seconds")
            ttl: int | None = None
            if desired is not None:
                if not _DIGITS.fullmatch(desired) or int(desired) <= 0:
                    raise ApiError(400, "desired_ttl_seconds must be a positive integer")
                ttl = int(desired)
            self._environment(found)
            return store.heartbeat(
                found.environment_id,
                work_id,
                expected=expected,
                desired_ttl=ttl,
                flavour=flavour,
                precondition_type=PRECONDITION_TYPE[flavour],
            )
        if operation == "ack":
            self._environment(found)
            same_worker = flavour == "qoder" or settings.ack_requires_polling_worker
            return store.ack(found.environment_id, work_id, worker_id, same_worker=same_worker).to_json()
        if operation == "stop":
            body = await _json_body(receive, required=False)
            force = False
            if body is not None:
                if not isinstance(body, dict):
                    raise ApiError(400, 'the body is {"force": true|false}')
                force_value = body.get("force", False)
                if not isinstance(force_value, bool):
                    raise ApiError(400, "force must be a boolean")
                force = force_value
            self._environment(found)
            return store.stop(found.environment_id, work_id, force=force).to_json()
        if operation == "get":
            self._environment(found)
            return store.item(found.environment_id, work_id).to_json()
        if operation == "update":
            body = await _json_body(receive, required=True)
            if not isinstance(body, dict):
                raise ApiError(400, 'the body is {"metadata": {"key": "value" | null}}')
            self._environment(found)
            return store.update(found.environment_id, work_id, body.get("metadata")).to_json()
        if operation == "list":
            return self._list(found, query)
        if operation == "stats":
            self._environment(found)
            return store.stats(found.environment_id)
        raise ApiError(404, f"unknown operation {operation}")  # pragma: no cover - route() names only these

    def _environment(self, found: Route) -> None:
        env = self.store.environment(found.environment_id)
        if not env.permitted:
            raise ApiError(403, f"this credential is not authorized for environment {found.environment_id}")
        if not env.self_hosted:
            raise ApiError(400, f"environment {found.environment_id} is not self_hosted")

    def _list(self, found: Route, query: dict[str, str]) -> dict[str, Any]:
        default, maximum = LIST_LIMITS[found.flavour]
        limit = _int_param(query, "limit")
        if limit is None:
            limit = default
        if not 1 <= limit <= maximum:
            raise ApiError(400, f"limit must be between 1 and {maximum}")
        page = query.get("page") or None
        after_id = before_id = None
        if found.flavour == "qoder":
            after_id, before_id = query.get("after_id") or None, query.get("before_id") or None
            if page is not None and (after_id or before_id):
                raise ApiError(400, "use either page or after_id/before_id")
        self._environment(found)
        env = self.store.environment(found.environment_id)
        after_seq = decode_cursor(page) if page is not None else None
        before_seq = None
        for name, work_id in (("after_id", after_id), ("before_id", before_id)):
            if work_id is not None:
                anchor = env.items.get(work_id)
                if anchor is None:
                    raise ApiError(400, f"{name}: no work item {work_id} in environment {found.environment_id}")
                if name == "after_id":
                    after_seq = anchor.seq
                else:
                    before_seq = anchor.seq
        items, has_more = self.store.list_page(
            found.environment_id, limit=limit, after_seq=after_seq, before_seq=before_seq
        )
        forward_more = has_more if before_seq is None or after_seq is not None else bool(items)
        result: dict[str, Any] = {
            "data": [item.to_json() for item in items],
            "next_page": encode_cursor(items[-1].seq) if items and forward_more else None,
        }
        if found.flavour == "qoder":
            result["first_id"] = items[0].id if items else None
            result["last_id"] = items[-1].id if items else None
            result["has_more"] = has_more
        return result


def _parse_query(raw: bytes) -> dict[str, str]:
    """The query string as a dict (the last value of a repeated name wins), blank values kept."""
    query = {}
    for pair in raw.decode("latin-1").split("&"):
        if not pair:
            continue
        name, _, value = pair.partition("=")
        if "%" in pair or "+" in pair:
            name, value = unquote_plus(name), unquote_plus(value)
        query[name] = value
    return query


def _int_param(query: dict[str, str], name: str) -> int | None:
    value = query.get(name)
    if value is None:
        return None
    if not _SIGNED_DIGITS.fullmatch(value):
        raise ApiError(400, f"{name} must be an integer")
    return int(value)


async def _json_body(receive: Receive, *, required: bool) -> Any:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > 1_000_000:
            raise ApiError(413, "the request body is larger than 1 MB")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    raw = b"".join(chunks)
    if not raw.strip():
        if required:
            raise ApiError(400, "a JSON body is required")
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError(400, "the body is not valid JSON") from None


def _with_request_id(send: Send) -> Send:
    """`send` that adds a `request-id` header to a response that has none (admin answers)."""

    async def sending(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if not any(name.lower() == b"request-id" for name, _ in headers):
                headers.append((b"request-id", request_id().encode()))
            message = {**message, "headers": headers}
        await send(message)

    return sending


async def _drop_connection(send: Send) -> None:
    """Close the connection without any response, so the client sees a transport error."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()
        # Let the server's protocol see the connection lost before this app returns, so that it does not try to
        # answer the request itself.
        for _ in range(3):
            await asyncio.sleep(0)
        return
    # Another server: start a response it cannot finish; servers close such a connection.
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]})
    await send({"type": "http.response.body", "body": b"{", "more_body": True})
