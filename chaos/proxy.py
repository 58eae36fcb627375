"""A fault proxy: a real HTTP server on loopback between the sidecar (`--api-url`) and the Work API emulator.

Every Work API request is classified by operation (poll, ack, heartbeat, stop, get, update, list, stats; a
heartbeat with `expected_last_heartbeat=NO_HEARTBEAT` is also a `claim`) and matched against the rules set at run
time, first match wins; no match passes it through. A rule's action:

| action         | what the sidecar sees                                                                         |
|----------------|-----------------------------------------------------------------------------------------------|
| `pass`         | the emulator's answer (after `latency` seconds, if set)                                        |
| `status`       | `status` (5xx, 429, 401, …) with a Work API error envelope, `retry-after-ms` if set             |
| `drop`         | the connection closes before any answer                                                        |
| `hang`         | no answer until the sidecar gives up (or the proxy closes)                                      |
| `drip`         | the real answer (or `body`), one byte every `interval` seconds                                 |
| `body`         | `body` (raw text, `status`) instead of the answer; `{secret}` becomes the item's secret         |
| `mutate`       | the real answer with a named mutation (`MUTATIONS`): NaN ttl, deep nesting, bad ids, …           |
| `huge`         | 200 and a JSON body of `size` bytes, streamed in 1 MiB chunks                                  |
| `late`         | the real answer, `interval` seconds late (past the sidecar's deadline)                          |
| `twice`        | the real answer, then a stray `200 body` (default `{}`) on that connection (`stray`: when) |
| `framing`      | the real answer, framed against itself (`FRAMINGS`): Content-Length and chunked, two …          |
| `header_block` | the real answer behind a header block of `size` bytes                                          |
| `reset`        | a reused connection only (its second request or later): reset (RST), as a load balancer does    |

`forward_first` sends the request to the emulator before the fault, so the Work API has applied it when the
answer is lost or spoiled: `drop` (the answer lost), `hang` (never answered), `body` (a stray answer instead of the
real one), `status`, `reset` (reset after the request was applied). `pass`, `drip`, `mutate`, `late`, `twice`,
`framing` and `header_block` always forward first. Rules can be limited by `count` (matches), `duration`
(seconds from being set), `probability` (seeded) and `work_id`. Every decision is logged in `Proxy.events` (with
the emulator's status and how long the answer took); every item secret seen in a poll answer is collected in
`Proxy.secrets` (for the leak check).

Admin API (for a proxy run as its own process, `python -m chaos proxy`): `GET/POST/DELETE /_chaos/rules`; every
other path under `/_emulator/` is passed through.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import socket
import struct
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

NO_HEARTBEAT = "NO_HEARTBEAT"
OPERATIONS = ("poll", "ack", "heartbeat", "claim", "stop", "get", "update", "list", "stats")
SELECTORS = (*OPERATIONS, "renew")  # a rule for `heartbeat` matches renewals and claims; `renew` renewals only
ACTIONS = (
    "pass", "status", "drop", "hang", "drip", "body", "mutate", "huge",
    "late", "twice", "framing", "header_block", "reset",
)  # fmt: skip
ALWAYS_FORWARDED = ("pass", "drip", "mutate", "late", "twice", "framing", "header_block")

STALL = 0.25
"""A request that arrives or is answered after the proxy's event loop stalled this long may have waited in it: its
answer is not counted as one the sidecar heard in time (`Proxy.intact_renewals`)."""

_WORK_PATH = re.compile(r"^/(?:v1|api/v1/cloud)/environments/(?P<env>[^/]+)/work(?P<rest>/.*)?$")


def classify(method: str, path: str, query: dict[str, str]) -> tuple[str | None, str | None, str | None]:
    """(operation, environment id, work id) of a Work API request; operation None for anything else."""
    found = _WORK_PATH.match(path)
    if found is None:
        return None, None, None
    env, rest = found["env"], (found["rest"] or "").strip("/")
    parts = rest.split("/") if rest else []
    if not parts:
        return ("list" if method == "GET" else None), env, None
    if parts == ["poll"]:
        return "poll", env, None
    if parts == ["stats"]:
        return "stats", env, None
    work_id = parts[0]
    if len(parts) == 1:
        return ("get" if method == "GET" else "update"), env, work_id
    if parts[1] == "heartbeat":
        claim = query.get("expected_last_heartbeat") == NO_HEARTBEAT
        return ("claim" if claim else "heartbeat"), env, work_id
    return parts[1], env, work_id


def deep_json(depth: int) -> str:
    """A JSON object nested `depth` levels deep (RecursionError for a naive parser)."""
    return '{"type":"work","nested":' + "[" * depth + "]" * depth + "}"


def _set(field_name: str, literal: str) -> Callable[[str], str]:
    def mutate(text: str) -> str:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            return text
        obj[field_name] = "@@LITERAL@@"
        return json.dumps(obj).replace('"@@LITERAL@@"', literal)

    return mutate


def _drop(field_name: str) -> Callable[[str], str]:
    def mutate(text: str) -> str:
        obj = json.loads(text)
        if isinstance(obj, dict):
            obj.pop(field_name, None)
        return json.dumps(obj)

    return mutate


MUTATIONS: dict[str, Callable[[str], str]] = {
    "ttl_nan": _set("ttl_seconds", "NaN"),
    "ttl_inf": _set("ttl_seconds", "Infinity"),
    "ttl_neg_inf": _set("ttl_seconds", "-Infinity"),
    "ttl_huge": _set("ttl_seconds", "1e20"),
    "ttl_5e9": _set("ttl_seconds", "5000000000"),
    "ttl_true": _set("ttl_seconds", "true"),
    "ttl_string": _set("ttl_seconds", '"sixty"'),
    "ttl_negative": _set("ttl_seconds", "-5"),
    "extended_string": _set("lease_extended", '"yes"'),
    "last_heartbeat_number": _set("last_heartbeat", "12345"),
    "last_heartbeat_missing": _drop("last_heartbeat"),
    "state_missing": _drop("state"),
    "state_unknown": _set("state", '"exploded"'),
    "id_invalid": _set("id", '"../../work id\\n with spaces?x=1#"'),
    "id_number": _set("id", "42"),
    "id_missing": _drop("id"),
    "data_string": _set("data", '"not an object"'),
    "metadata_list": _set("metadata", "[1,2,3]"),
    "secret_number": _set("secret", "7"),
    "deep": lambda _text: deep_json(100_000),
    "deep_field": _set("extra", "[" * 50_000 + "]" * 50_000),
    "garbage": lambda _text: "<html>502 bad gateway</html>",
    "truncated": lambda text: text[: max(1, len(text) // 2)],
    "empty": lambda _text: "",
    "array": lambda _text: "[]",
    "null": lambda _text: "null",
    "invalid_utf8": lambda _text: '{"type":"work","id":"\udcff"}',
}


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    reason = {200: "OK"}.get(status, "Status")
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _chunked(body: bytes) -> bytes:
    return (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"


FRAMINGS: dict[str, Callable[[int, bytes], bytes]] = {
    # Content-Length and Transfer-Encoding: chunked (RFC 9112 6.3: a message a client must treat as an error)
    "cl_chunked": lambda status, body: (
        _head(
            status,
            [
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("transfer-encoding", "chunked"),
            ],
        )
        + _chunked(body)
    ),
    # two different Content-Lengths
    "two_cl": lambda status, body: (
        _head(
            status,
            [
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("content-length", str(len(body) + 7)),
            ],
        )
        + body
    ),
    # a Content-Length shorter than the body: bytes after the answer on a kept-alive connection
    "cl_short": lambda status, body: (
        _head(status, [("content-type", "application/json"), ("content-length", str(max(0, len(body) - 2)))]) + body
    ),
}


@dataclass
class Rule:
    """One fault. Matching: `operation` ('*' = any Work API request) and optional `work_id`; `count`,
    `duration` and `probability` limit it."""

    operation: str = "*"
    action: str = "pass"
    status: int = 503
    latency: float = 0.0
    interval: float = 1.0
    body: str | None = None
    mutation: str | None = None
    size: int = 300 * 1024 * 1024
    retry_after_ms: int | None = None
    count: int | None = None
    duration: float | None = None
    probability: float = 1.0
    work_id: str | None = None
    forward_first: bool = False
    framing: str | None = None
    stray: str = "next"
    """`twice`: when the stray second answer is sent: `now` (with the real one), `next` (as the next request on
    that connection arrives, so the client reads it as that request's answer) or `later` (`interval` s after)."""
    id: int = 0
    created: float = field(default_factory=time.monotonic)
    matched: int = 0

    def __post_init__(self) -> None:
        if self.operation != "*" and self.operation not in SELECTORS:
            raise ValueError(f"unknown operation {self.operation!r}")
        if self.action not in ACTIONS:
            raise ValueError(f"unknown action {self.action!r}")
        if self.action == "mutate" and self.mutation not in MUTATIONS:
            raise ValueError(f"unknown mutation {self.mutation!r}")
        if self.stray not in ("now", "next", "later"):
            raise ValueError(f"unknown stray timing {self.stray!r}")
        if self.action == "framing" and self.framing not in FRAMINGS:
            raise ValueError(f"unknown framing {self.framing!r}")

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Rule:
        allowed = {f for f in cls.__dataclass_fields__ if f not in ("id", "created", "matched")}
        unknown = set(obj) - allowed
        if unknown:
            raise ValueError(f"unknown rule fields: {sorted(unknown)}")
        return cls(**obj)

    def to_json(self) -> dict[str, Any]:
        view = asdict(self)
        view.pop("created")
        return view

    def expired(self, now: float) -> bool:
        if self.count is not None and self.matched >= self.count:
            return True
        return self.duration is not None and now - self.created > self.duration

    def matches(self, operation: str, work_id: str | None, rng: random.Random, *, reused: bool = False) -> bool:
        if self.action == "reset" and not reused:
            return False  # a reset is for a kept-alive connection the client reuses
        if self.operation != "*" and self.operation != operation:
            # a rule for `heartbeat` covers the claim too unless it says `claim`; a rule for `claim` only claims
            renewal = self.operation == "renew" and operation == "heartbeat"
            if not renewal and not (self.operation == "heartbeat" and operation == "claim"):
                return False
        if self.work_id is not None and self.work_id != work_id:
            return False
        return self.probability >= 1.0 or rng.random() < self.probability


@dataclass
class Event:
    at: float
    operation: str
    work_id: str | None
    action: str
    rule: int | None
    reused: bool = False
    """The request came on a connection that had carried an earlier one."""
    status: int = 0
    """The emulator's status (0: the request was not forwarded, or forwarding failed)."""
    took: float | None = None
    """Seconds from the request's arrival to its answer handed over intact (`pass` only, and no stall of the proxy
    around it; None otherwise)."""
    refused: bool = False
    """The proxy answered 404, 409 or 412 itself (`status`): a refusal the Work API never made."""


class Proxy:
    """`async with Proxy(upstream).serve() as url:` serves the proxy on loopback."""

    def __init__(self, upstream: str, *, seed: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.rules: list[Rule] = []
        self.events: list[Event] = []
        self.secrets: set[str] = set()
        self.secret_of: dict[str, str] = {}
        self.url: str | None = None
        self._rng = random.Random(seed)
        self._ids = 0
        self._closing = asyncio.Event()
        self._tick = time.monotonic()
        self.stalls: list[float] = []
        """Seconds of each stall of this process's event loop longer than `STALL` (the proxy answered nothing)."""
        self._session: aiohttp.ClientSession | None = None
        self._strays: set[asyncio.Future[None]] = set()
        self._pending_strays: weakref.WeakKeyDictionary[asyncio.BaseTransport, bytes] = weakref.WeakKeyDictionary()
        self._served: weakref.WeakKeyDictionary[asyncio.BaseTransport, int] = weakref.WeakKeyDictionary()

    # -- rules ---------------------------------------------------------------------------------------

    def add(self, rule: Rule | None = None, **fields: Any) -> Rule:
        rule = rule or Rule(**fields)
        self._ids += 1
        rule.id = self._ids
        rule.created = time.monotonic()
        self.rules.append(rule)
        return rule

    def clear(self) -> None:
        self.rules.clear()

    def remove(self, rule: Rule) -> None:
        with contextlib.suppress(ValueError):
            self.rules.remove(rule)

    def _match(self, operation: str, work_id: str | None, reused: bool = False) -> Rule | None:
        now = time.monotonic()
        self.rules = [r for r in self.rules if not r.expired(now)]
        for rule in self.rules:
            if rule.matches(operation, work_id, self._rng, reused=reused):
                rule.matched += 1
                return rule
        return None

    def intact_renewals(self, deadline: float) -> dict[str, list[float]]:
        """Per item, for each claim or renewal answered 200 and passed on intact within `deadline` seconds (a
        success the sidecar heard), when the call it ended began (epoch): the arrival of the first of the attempts
        that failed just before it (a claim's since its first after the item's last ack, a renewal's within
        `deadline`), else its own. A sidecar may count its lease from the start of the call: a failed attempt's
        outcome may be unknown. A claim call begins after an ack: the failed claims of an earlier delivery of the
        item (a hand-over that gave up) are not part of it."""
        out: dict[str, list[float]] = {}
        failed: dict[str, list[Event]] = {}  # per item, the attempts that failed since its last success
        for e in self.events:
            if not e.work_id:
                continue
            if e.operation == "ack":
                failed[e.work_id] = [f for f in failed.get(e.work_id, []) if f.operation != "claim"]
                continue
            if e.operation not in ("claim", "heartbeat"):
                continue
            intact = e.action == "pass" and e.status == 200 and e.took is not None and e.took <= deadline
            if not intact:
                failed.setdefault(e.work_id, []).append(e)
                continue
            before = failed.pop(e.work_id, [])
            same_call = [f.at for f in before if f.operation == e.operation == "claim" or e.at - f.at <= deadline]
            out.setdefault(e.work_id, []).append(min([e.at, *same_call]))
        return out

    def invented_refusals(self) -> dict[str, list[float]]:
        """Per item, the arrival times (epoch) of claims and renewals the proxy itself refused (404, 409, 412)."""
        out: dict[str, list[float]] = {}
        for e in self.events:
            if e.refused and e.operation in ("claim", "heartbeat") and e.work_id:
                out.setdefault(e.work_id, []).append(e.at)
        return out

    def count(self, operation: str, action: str | None = None) -> int:
        return sum(1 for e in self.events if e.operation == operation and (action is None or e.action == action))

    # -- serving -------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/_chaos/rules", self._admin_rules)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        bound = server.sockets[0].getsockname()  # type: ignore[attr-defined]
        self.url = f"http://{host}:{bound[1]}"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False)
        ticker = asyncio.ensure_future(self._ticking())
        try:
            yield self.url
        finally:
            self._closing.set()
            ticker.cancel()
            await self._session.close()
            await runner.cleanup()

    async def _admin_rules(self, request: web.Request) -> web.Response:
        if request.method == "POST":
            try:
                rule = self.add(Rule.from_json(await request.json()))
            except (ValueError, TypeError) as exc:
                return web.json_response({"error": str(exc)}, status=400)
            return web.json_response({"rule": rule.to_json()})
        if request.method == "DELETE":
            self.clear()
        return web.json_response({"data": [r.to_json() for r in self.rules]})

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, dict[str, str], bytes]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body or None
        ) as answer:
            data = await answer.read()
            keep = {
                k: v for k, v in answer.headers.items() if k.lower() in ("content-type", "request-id", "retry-after")
            }
            return answer.status, keep, data

    def _collect_secret(self, data: bytes) -> None:
        try:
            obj = json.loads(data)
        except ValueError:
            return
        secret = obj.get("secret") if isinstance(obj, dict) else None
        if isinstance(secret, str) and secret:
            self.secrets.add(secret)
            if isinstance(obj.get("id"), str):
                self.secret_of[obj["id"]] = secret
            with contextlib.suppress(ValueError, TypeError):
                decoded = json.loads(base64.b64decode(secret + "=" * (-len(secret) % 4)))
                token = decoded.get("sessions_token") if isinstance(decoded, dict) else None
                if isinstance(token, str) and token:
                    self.secrets.add(token)

    async def _ticking(self) -> None:
        """Notes when this process's event loop last ran (and each stall longer than `STALL`)."""
        while True:
            now = time.monotonic()
            if now - self._tick > STALL:
                self.stalls.append(now - self._tick)
            self._tick = now
            await asyncio.sleep(0.05)

    def _stalled(self) -> bool:
        return time.monotonic() - self._tick > STALL

    def _reused(self, request: web.Request) -> bool:
        """Whether this request came on a connection that carried an earlier one (and count it)."""
        transport = request.transport
        if transport is None:
            return False
        served = self._served.get(transport, 0)
        self._served[transport] = served + 1
        stray = self._pending_strays.pop(transport, None)
        if stray is not None and not transport.is_closing():
            transport.write(stray)  # a `twice` answer's stray: read as the answer to this request
        return served > 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        stalled = self._stalled()  # the request may have waited for the loop
        reused = self._reused(request)
        body = await request.read()
        operation, _env, work_id = classify(request.method, request.path, dict(request.query))
        rule = self._match(operation, work_id, reused) if operation is not None else None
        action = rule.action if rule is not None else "pass"
        event = Event(time.time(), operation or "", work_id, action, rule.id if rule else None, reused)
        event.refused = action == "status" and rule is not None and rule.status in (404, 409, 412)
        if operation is not None:
            self.events.append(event)
        if rule is not None and rule.latency:
            await asyncio.sleep(rule.latency)
        if rule is not None and action == "reset" and not rule.forward_first:
            return await self._drop(request, reset=True)
        headers: dict[str, str] = {}
        status, data = 0, b""  # what the emulator answered, when the request is forwarded
        if rule is None or action in ALWAYS_FORWARDED or rule.forward_first:
            try:
                status, headers, data = await self._forward(request, body)
            except aiohttp.ClientError:
                return await self._drop(request)
            event.status = status
            if operation == "poll":
                self._collect_secret(data)
        if rule is None or action == "pass":
            if not (stalled or self._stalled()):
                event.took = time.monotonic() - arrived
            return web.Response(status=status, body=data, headers=headers)
        return await self._answer(request, rule, work_id, status, headers, data)

    async def _answer(
        self, request: web.Request, rule: Rule, work_id: str | None, status: int, headers: dict[str, str], data: bytes
    ) -> web.StreamResponse:
        """The answer a rule makes (`status`, `headers`, `data`: the emulator's answer, when it was forwarded)."""
        action = rule.action
        if action in ("reset", "late", "twice", "framing", "header_block"):
            return await self._spoiled(request, rule, status, headers, data)
        if action == "status":
            envelope = {"type": "error", "error": {"type": "api_error", "message": f"chaos: injected {rule.status}"}}
            extra = {"retry-after-ms": str(rule.retry_after_ms)} if rule.retry_after_ms is not None else {}
            return web.json_response(envelope, status=rule.status, headers=extra)
        if action == "drop":
            return await self._drop(request)
        if action == "hang":
            await self._closing.wait()
            return await self._drop(request)
        if action == "body":
            text = (rule.body or "").replace("{secret}", self.secret_of.get(work_id or "", ""))
            return web.Response(
                status=rule.status, body=text.encode("utf-8", "surrogatepass"), content_type="application/json"
            )
        if action == "mutate":
            assert rule.mutation is not None
            try:
                text = MUTATIONS[rule.mutation](data.decode())
            except ValueError:
                text = data.decode(errors="replace")
            return web.Response(
                status=status, body=text.encode("utf-8", "surrogatepass"), content_type="application/json"
            )
        if action == "drip":
            if rule.body is not None:
                status, data = 200, rule.body.encode()
            return await self._drip(request, status, data, rule.interval)
        return await self._huge(request, rule.size)

    async def _spoiled(
        self, request: web.Request, rule: Rule, status: int, headers: dict[str, str], data: bytes
    ) -> web.StreamResponse:
        """The answers of the actions that spoil the emulator's answer to a request it applied."""
        action = rule.action
        if action == "reset":
            return await self._drop(request, reset=True)
        if action == "late":
            try:
                await asyncio.wait_for(self._closing.wait(), rule.interval)
                return await self._drop(request)
            except TimeoutError:
                return web.Response(status=status, body=data, headers=headers)
        if action == "twice":
            return await self._twice(request, rule, status, headers, data)
        if action == "framing":
            assert rule.framing is not None
            return await self._raw(request, FRAMINGS[rule.framing](status, data))
        padding = [("x-chaos-padding", "a" * max(0, rule.size))]  # header_block
        head = _head(status, [("content-type", "application/json"), ("content-length", str(len(data))), *padding])
        return await self._raw(request, head + data)

    async def _drop(self, request: web.Request, *, reset: bool = False) -> web.StreamResponse:
        """Close the connection without an answer; `reset`: with a TCP RST (SO_LINGER 0), as a load balancer does."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if reset and sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        raise asyncio.CancelledError  # aiohttp treats the handler as cancelled: nothing more is written

    async def _raw(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        """Write `raw` bytes as the answer, then close the connection once they are sent."""
        transport = request.transport
        if transport is not None:
            transport.write(raw)
        raise asyncio.CancelledError  # aiohttp writes nothing more and closes the connection (after the bytes)

    async def _twice(
        self, request: web.Request, rule: Rule, status: int, headers: dict[str, str], data: bytes
    ) -> web.StreamResponse:
        """The real answer, complete; then a stray second answer on the same kept-alive connection."""
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data)
        await response.write_eof()
        stray = (rule.body if rule.body is not None else "{}").encode("utf-8", "surrogatepass")
        raw = _head(200, [("content-type", "application/json"), ("content-length", str(len(stray)))]) + stray
        transport = request.transport
        if transport is None:
            return response
        if rule.stray == "now":
            transport.write(raw)  # in the same burst as the real answer's end
        elif rule.stray == "next":
            self._pending_strays[transport] = raw  # written as the connection's next request arrives
        else:

            async def later() -> None:
                await asyncio.sleep(rule.interval)
                if not transport.is_closing():
                    transport.write(raw)

            task = asyncio.ensure_future(later())
            self._strays.add(task)
            task.add_done_callback(self._strays.discard)
        return response

    async def _drip(self, request: web.Request, status: int, data: bytes, interval: float) -> web.StreamResponse:
        response = web.StreamResponse(status=status, headers={"content-type": "application/json"})
        response.content_length = len(data)
        await response.prepare(request)
        with contextlib.suppress(ConnectionError, RuntimeError):
            for index in range(len(data)):
                await response.write(data[index : index + 1])
                try:
                    await asyncio.wait_for(self._closing.wait(), interval)
                    break
                except TimeoutError:
                    pass
        return response

    async def _huge(self, request: web.Request, size: int) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"content-type": "application/json"})
        response.content_length = size
        await response.prepare(request)
        head = b'{"type":"work","id":"work_huge","environment_id":"e","state":"queued","data":{"type":"session","id":"'
        tail = b'"}}'
        chunk = b"a" * (1 << 20)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await response.write(head)
            left = size - len(head) - len(tail)
            while left > 0 and not self._closing.is_set():
                piece = chunk if left >= len(chunk) else chunk[:left]
                await response.write(piece)
                left -= len(piece)
            await response.write(tail)
        return response
