"""The Work API face of the emulator, and the ASGI app that puts it and the admin face on one server.

The Work API path is a plain ASGI handler (no framework routing, headers read once, compact JSON) so that a
heartbeat costs little, and so that a fault can drop the connection without any response. Requests are routed by
a table built once from the flavour table (`_flavours.py`: each provider's path prefix) and the wire's operation
table (`sidecar.wire.OPERATIONS`: method and route of each operation). The admin face is a Starlette router
(`_admin.py`); the state behind both is the `EmulatorCore` (`_core.py`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from starlette.routing import Router
from starlette.types import Receive, Scope, Send

from ..wire import (
    MAX_BLOCK_MS,
    MIN_BLOCK_MS,
    NO_HEARTBEAT,
    OPERATIONS,
    REQUEST_ID_HEADER,
    CredentialStyle,
    Pagination,
    Provider,
)
from ._admin import admin_router
from ._backend import Store
from ._core import EmulatorCore
from ._errors import ApiError
from ._faults import Fault
from ._flavours import FLAVOURS, Flavour
from ._ids import parse_rfc3339, request_id
from ._settings import EmulatorSettings
from ._spoil import spoil_answer
from ._store import Item, decode_cursor, encode_cursor

log = logging.getLogger("sidecar.emulator")

ADMIN_PREFIX = "/_emulator/"
ENVIRONMENT_KEY_OPERATIONS = frozenset({"poll", "ack", "heartbeat", "stop", "list"})
MANAGEMENT_KEY_OPERATIONS = frozenset({"get", "update"})
ITEM_TOKEN_OPERATIONS = frozenset({"heartbeat", "stop"})
_DIGITS = re.compile(r"[0-9]+")
_SIGNED_DIGITS = re.compile(r"-?[0-9]+")
_JSON = (b"content-type", b"application/json")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(slots=True)
class Route:
    flavour: Flavour
    environment_id: str
    operation: str
    work_id: str | None


@dataclass(frozen=True, slots=True)
class _Prefix:
    """A flavour's work path split around `{environment_id}`: `head` + id + `/` + `tail`."""

    flavour: Flavour
    head: str
    tail: str


_ITEM = "/{work_id}"


class RouteTable:
    """Method and path to (flavour, environment, operation, work id), from the flavours' path prefixes and the
    wire's operation table: string slicing and two dict lookups, no regular expressions.

    Below a prefix, a route is either fixed (`""`, `/poll`, `/stats`) or an item's (`/{work_id}` + an action:
    `""`, `/ack`, …); each maps methods to operation names.
    """

    def __init__(self, flavours: Sequence[Flavour]) -> None:
        self.flavours = tuple(flavours)
        self.prefixes: list[_Prefix] = []
        for flavour in self.flavours:
            head, marker, tail = flavour.provider.path_prefix.partition("{environment_id}")
            if not marker or not tail.startswith("/"):
                raise ValueError(f"{flavour.name}: path_prefix needs {{environment_id}} followed by a path")
            self.prefixes.append(_Prefix(flavour, head, tail[1:]))
        self.fixed: dict[str, dict[str, str]] = {}
        self.item: dict[str, dict[str, str]] = {}
        for operation in OPERATIONS.values():
            route = operation.route
            if route.startswith(_ITEM):
                self.item.setdefault(route[len(_ITEM) :], {})[operation.method] = operation.name
            else:
                self.fixed.setdefault(route, {})[operation.method] = operation.name

    def flavour_of(self, path: str) -> Flavour:
        """The flavour a path belongs to, or looks most like (the first segment), for logging unknown paths."""
        for prefix in self.prefixes:
            if path.startswith(prefix.head):
                return prefix.flavour
        first = path.lstrip("/").split("/", 1)[0]
        for prefix in self.prefixes:
            if prefix.head.lstrip("/").split("/", 1)[0] == first:
                return prefix.flavour
        return self.flavours[0]

    def route(self, method: str, path: str) -> Route | ApiError:
        """The Work API operation a request names, or the error it gets (404 unknown path, 405 wrong method)."""
        for prefix in self.prefixes:
            if path.startswith(prefix.head):
                break
        else:
            return ApiError(404, f"no such endpoint: {method} {path}")
        environment_id, _, below = path[len(prefix.head) :].partition("/")
        suffix = below[len(prefix.tail) :]
        work_id = None
        methods = None
        if environment_id and below.startswith(prefix.tail):
            methods = self.fixed.get(suffix)
            if methods is None and suffix.startswith("/"):
                work_id, sep, action = suffix[1:].partition("/")
                methods = self.item.get("/" + action if sep else "") if work_id else None
        if methods is None:
            return ApiError(404, f"no such endpoint: {method} {path}")
        operation = methods.get(method)
        if operation is None:
            return ApiError(
                405, f"method {method} is not allowed on {path}", headers={"allow": ", ".join(sorted(methods))}
            )
        return Route(prefix.flavour, environment_id, operation, work_id)


@dataclass(frozen=True, slots=True)
class _FlavourHeaders:
    """A flavour's header names as the ASGI scope carries them (lower-case bytes), computed once."""

    worker_id: bytes
    request_id: bytes | None
    required: tuple[tuple[str, bytes, str, bool], ...]
    """(name, key, value, is it the beta list) of each header every request must carry."""

    @classmethod
    def of(cls, flavour: Flavour) -> _FlavourHeaders:
        provider = flavour.provider
        return cls(
            worker_id=provider.worker_id_header.lower().encode(),
            request_id=provider.request_id_header.lower().encode() if provider.request_id_header else None,
            required=tuple(
                (name, name.lower().encode(), value, name == provider.beta_header)
                for name, value in provider.extra_headers.items()
            ),
        )


_Operation = Callable[[Route, dict[str, str], str, Receive], Awaitable[Any]]
"""One Work API operation: (route, query, worker id, the request body's receive) -> the JSON answer."""


class EmulatorApp:
    """The ASGI application: the Work API face, and the admin face under `/_emulator/`, over one core."""

    def __init__(self, settings: EmulatorSettings | EmulatorCore, flavours: Sequence[Flavour] = FLAVOURS) -> None:
        self.core = settings if isinstance(settings, EmulatorCore) else EmulatorCore(settings)
        self.routes = RouteTable(flavours)
        self.admin: Router = admin_router(self.core)
        self._store = self.core.store
        self._faults = self.core.faults
        self._log = self.core.log
        read: set[str] = {"authorization", "x-api-key"}
        for flavour in self.routes.flavours:
            provider = flavour.provider
            read |= {name.lower() for name in (provider.worker_id_header, *provider.extra_headers)}
            if provider.request_id_header:
                read.add(provider.request_id_header.lower())
        self._headers = frozenset(name.encode() for name in read)
        self._wire = {f.name: _FlavourHeaders.of(f) for f in self.routes.flavours}
        self._operations: dict[str, _Operation] = {
            "poll": self._poll,
            "heartbeat": self._heartbeat,
            "ack": self._ack,
            "stop": self._stop,
            "get": self._get,
            "update": self._update,
            "list": self._list_page,
            "stats": self._stats,
        }

    @property
    def store(self) -> Store:
        """The core's store (for tests that drive it directly)."""
        return self._store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            if scope["path"].startswith(ADMIN_PREFIX):
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
        wanted = self._headers
        for name, value in scope["headers"]:
            if name in wanted:
                headers[name] = value.decode("latin-1")
        raw_query: bytes = scope.get("query_string", b"")
        query = _parse_query(raw_query) if raw_query else {}
        found = self.routes.route(method, path)
        flavour = found.flavour if isinstance(found, Route) else self.routes.flavour_of(path)
        wire = self._wire[flavour.name]
        client_request_id = headers.get(wire.request_id) if wire.request_id else None
        rid = client_request_id or request_id()
        worker_id = headers.get(wire.worker_id, "")
        entry = self._log.open(
            {
                "method": method,
                "path": path,
                "query": query,
                "status": None,
                "at": time.time(),  # formatted when read
                "operation": found.operation if isinstance(found, Route) else "unknown",
                "flavour": flavour.name,
                "environment_id": found.environment_id if isinstance(found, Route) else None,
                "work_id": found.work_id if isinstance(found, Route) else None,
                "worker_id": worker_id or None,
                "request_id": rid,
            }
        )
        extra_headers: Mapping[str, str] = {}
        status = 500
        fault: Fault | None = None
        try:
            if isinstance(found, ApiError):
                raise found
            if self._faults:
                latency_ms, fault = self._faults.take(found.operation, found.environment_id)
                if latency_ms:
                    await asyncio.sleep(latency_ms / 1000)
                if fault is not None and fault.drop:
                    status = 0
                    await _drop_connection(send)
                    return
                if fault is not None and fault.after_apply is None:
                    raise fault.error()
            self._authorize(headers, found)
            status, body = 200, _dumps(await self._dispatch(found, query, worker_id, receive))
        except ApiError as error:
            status, body, extra_headers = error.status, _dumps(error.body(rid)), error.headers
        except Exception:
            log.exception("emulator: unexpected error", extra={"method": method, "path": path})
            status, body = 500, _dumps(ApiError(500, "internal error in the emulator").body(rid))
        finally:
            self._log.close(entry, status, started)
        response_headers = [_JSON, (b"content-length", str(len(body)).encode()), (_REQUEST_ID, rid.encode())]
        if wire.request_id:
            response_headers.append((wire.request_id, rid.encode()))
        response_headers.extend((k.encode(), v.encode()) for k, v in extra_headers.items())
        if fault is not None and fault.after_apply is not None:
            await spoil_answer(send, fault, status, response_headers, body)
            return
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})

    def _authorize(self, headers: dict[bytes, str], found: Route) -> None:
        settings = self._store.settings
        credential = _credential(headers, found.flavour)
        kind, item = self._caller(credential, found.flavour.provider, settings)
        _check_scope(kind, item, found, settings)
        self._check_required_headers(headers, found.flavour, settings)

    def _caller(self, credential: str, provider: Provider, settings: EmulatorSettings) -> tuple[str, Item | None]:
        """Who the credential names: the environment key, the management key, or an item's secret (401 if none)."""
        if secrets.compare_digest(credential, settings.key):
            return "environment", None
        if settings.management_key is not None and secrets.compare_digest(credential, settings.management_key):
            return "management", None
        if (
            provider.secret_on_poll
            and settings.accept_item_token
            and (item := self._store.item_for_token(credential)) is not None
        ):
            return "item", item
        raise ApiError(401, "invalid credentials")

    def _check_required_headers(self, headers: dict[bytes, str], flavour: Flavour, settings: EmulatorSettings) -> None:
        required = self._wire[flavour.name].required
        if required and settings.require_anthropic_headers:
            for name, key, value, is_beta in required:
                sent = headers.get(key, "")
                if not is_beta:
                    if not sent:
                        raise ApiError(400, f"{name}: header is required")
                elif value not in (b.strip() for b in sent.split(",")):
                    raise ApiError(400, f"{name}: this endpoint requires the {value} beta")

    async def _dispatch(self, found: Route, query: dict[str, str], worker_id: str, receive: Receive) -> Any:
        # Each operation checks its parameters first (400), then the environment (404, 403, 400 not self-hosted),
        # then the item.
        handler = self._operations.get(found.operation)
        if handler is None:  # pragma: no cover - the route table names only these
            raise ApiError(404, f"unknown operation {found.operation}")
        return await handler(found, query, worker_id, receive)

    async def _poll(self, found: Route, query: dict[str, str], worker_id: str, receive: Receive) -> Any:
        store = self._store
        block_ms = _int_param(query, "block_ms")
        if block_ms is not None and not MIN_BLOCK_MS <= block_ms <= MAX_BLOCK_MS:
            raise ApiError(
                400,
                f"block_ms must be between {MIN_BLOCK_MS} and {MAX_BLOCK_MS} (omit it for a non-blocking poll)",
            )
        reclaim_ms = _int_param(query, "reclaim_older_than_ms")
        if reclaim_ms is not None and reclaim_ms < 0:
            raise ApiError(400, "reclaim_older_than_ms must not be negative")
        store.check_access(found.environment_id)
        item = await store.poll(found.environment_id, worker_id, block_ms, reclaim_ms)
        if item is None:
            return None
        if found.flavour.provider.secret_on_poll:
            store.issue_secret(item)
            return item.to_json(with_secret=True)
        return item.to_json()

    async def _heartbeat(self, found: Route, query: dict[str, str], worker_id: str, receive: Receive) -> Any:
        flavour = found.flavour
        expected = query.get("expected_last_heartbeat")
        if (
            flavour.strict_heartbeats
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
        self._store.check_access(found.environment_id)
        return self._store.heartbeat(
            found.environment_id,
            found.work_id or "",
            expected=expected,
            desired_ttl=ttl,
            strict=flavour.strict_heartbeats,
            precondition_type=flavour.provider.precondition_error_type,
        )

    async def _ack(self, found: Route, query: dict[str, str], worker_id: str, receive: Receive) -> Any:
        store = self._store
        store.check_access(found.environment_id)
        same_worker = found.flavour.ack_requires_polling_worker or store.settings.ack_requires_polling_worker
        return store.ack(found.environment_id, found.work_id or "", worker_id, same_worker=same_worker).to_json()

    async def _stop(self, found: Route, query: dict[str, str], worker_id: str, receive: Receive) -> Any:
        body = await _json_body(receive, required=False)
        force = False
        if body is not None:
            if not isinstance(body, dict):
                raise ApiError(400, 'the body is {"force": true|false}')
            force_value = body.get("force", False)
            if not isinstance(force_value, bool):
                raise ApiError(400, "force must be a boolean")
            force = force_value
        self._store.check_access(found.environment_id)
        return self._store.stop(found.environment_id, found.work_id or "", force=force).to_json()

    async def _get(self, found: Route, query: dict[str, str], worker_id: str, receive: Receive) -> Any:
        self._store.check_access(found.environment_id)
        return self._store.item(found.environment_id, found.work_id or "").to_json()

    async def _update(self, found: Route, query: dict[str, str], worker_id: str, receive: Receive) -> Any:
        body = await _json_body(receive, required=True)
        if not isinstance(body, dict):
            raise ApiError(400, 'the body is {"metadata": {"key": "value" | null}}')
        self._store.check_access(found.environment_id)
        return self._store.update(found.environment_id, found.work_id or "", body.get("metadata")).to_json()

    async def _list_page(self, found: Route, query: dict[str, str], worker_id: str, receive: Receive) -> Any:
        return self._list(found, query)

    async def _stats(self, found: Route, query: dict[str, str], worker_id: str, receive: Receive) -> Any:
        self._store.check_access(found.environment_id)
        return self._store.stats(found.environment_id)

    def _list(self, found: Route, query: dict[str, str]) -> dict[str, Any]:
        provider, store = found.flavour.provider, self._store
        limit = _int_param(query, "limit")
        if limit is None:
            limit = provider.list_default_limit
        if not 1 <= limit <= provider.list_max_limit:
            raise ApiError(400, f"limit must be between 1 and {provider.list_max_limit}")
        page = query.get("page") or None
        by_id = provider.pagination is Pagination.PAGE_OR_AFTER_ID
        after_id = before_id = None
        if by_id:
            after_id, before_id = query.get("after_id") or None, query.get("before_id") or None
            if page is not None and (after_id or before_id):
                raise ApiError(400, "use either page or after_id/before_id")
        store.check_access(found.environment_id)
        after_seq = decode_cursor(page) if page is not None else None
        before_seq = None
        for name, work_id in (("after_id", after_id), ("before_id", before_id)):
            if work_id is not None:
                anchor = store.seq_of(found.environment_id, work_id)
                if anchor is None:
                    raise ApiError(400, f"{name}: no work item {work_id} in environment {found.environment_id}")
                if name == "after_id":
                    after_seq = anchor
                else:
                    before_seq = anchor
        items, has_more = store.list_page(found.environment_id, limit=limit, after_seq=after_seq, before_seq=before_seq)
        forward_more = has_more if before_seq is None or after_seq is not None else bool(items)
        result: dict[str, Any] = {
            "data": [item.to_json() for item in items],
            "next_page": encode_cursor(items[-1].seq) if items and forward_more else None,
        }
        if by_id:
            result["first_id"] = items[0].id if items else None
            result["last_id"] = items[-1].id if items else None
            result["has_more"] = has_more
        return result


_REQUEST_ID = REQUEST_ID_HEADER.encode()


def _credential(headers: dict[bytes, str], flavour: Flavour) -> str:
    """The bearer token, else (where the provider takes one) the x-api-key header; 401 when neither is there."""
    scheme, _, token = headers.get(b"authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    if CredentialStyle.X_API_KEY in flavour.provider.credential_styles:
        credential = headers.get(b"x-api-key", "").strip()
        if credential:
            return credential
    raise ApiError(401, f"missing credentials{flavour.credential_hint}")


def _check_scope(kind: str, item: Item | None, found: Route, settings: EmulatorSettings) -> None:
    """403 when the credential may not call this operation: an item's secret works on its own item only; with a
    management key configured, each key type calls only its own operations."""
    operation = found.operation
    if item is not None:
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
