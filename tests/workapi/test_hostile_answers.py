"""Issue #11, "every answer is validated" and "one overall deadline per attempt", client side.

Answers the emulator cannot produce (NaN, deep nesting, 300 MB, drip-fed bodies, bad ids) come from a small real
HTTP server on loopback (aiohttp.web) that speaks the Work API's paths; the rest runs against the real emulator.
Every test runs over both HTTP backends. Each names the point of #11 it proves.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import psutil
import pytest
from aiohttp import web
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from sidecar.workapi import (
    NO_HEARTBEAT,
    RequestTimeout,
    ResponseError,
    RetryPolicies,
    RetryPolicy,
    ServerError,
    Timeouts,
    WorkApiClient,
)
from sidecar.workapi import _telemetry as workapi_telemetry

from .conftest import ClientFactory, enqueue, fault
from .test_client import Emu

ENV = "env_hostile"
PREFIX = f"/v1/environments/{ENV}/work"
ONCE = RetryPolicies(default=RetryPolicy(max_attempts=1, deadline=30.0), per_operation={})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def work_object(work_id: Any = "work_1") -> dict[str, Any]:
    return {
        "type": "work",
        "id": work_id,
        "environment_id": ENV,
        "data": {"type": "session", "id": "sesn_1"},
        "state": "queued",
        "metadata": {},
        "secret": None,
    }


def heartbeat_answer(**overrides: Any) -> dict[str, Any]:
    return {
        "type": "work_heartbeat",
        "last_heartbeat": "2026-01-01T00:00:00Z",
        "lease_extended": True,
        "state": "active",
        "ttl_seconds": 60,
        **overrides,
    }


class HostileApi:
    """A Work API on loopback whose answer to each operation the test chooses."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}
        self.url = ""

    def answer(self, operation: str, handler: Handler) -> None:
        self.handlers[operation] = handler

    def answer_raw(self, operation: str, body: bytes, status: int = 200) -> None:
        async def handler(_: web.Request) -> web.StreamResponse:
            return web.Response(body=body, status=status, content_type="application/json")

        self.answer(operation, handler)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = request.path.removeprefix(PREFIX).strip("/").split("/")
        if parts == [""]:
            operation = "list"
        elif len(parts) == 2:
            operation = parts[1]
        elif parts[0] in ("poll", "stats"):
            operation = parts[0]
        else:
            operation = "update" if request.method == "POST" else "get"
        return await self.handlers[operation](request)

    async def __aenter__(self) -> HostileApi:
        app = web.Application()
        app.router.add_route("*", PREFIX + "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()


@pytest.fixture
async def hostile(http_backend: str) -> AsyncIterator[tuple[HostileApi, Callable[..., WorkApiClient]]]:
    clients: list[WorkApiClient] = []

    def make(**overrides: Any) -> WorkApiClient:
        options: dict[str, Any] = {
            "provider": "anthropic",
            "api_key": "k",
            "environment_id": ENV,
            "base_url": api.url,
            "retry": ONCE,
            "http_backend": http_backend,
            **overrides,
        }
        client = WorkApiClient(**options)
        clients.append(client)
        return client

    async with HostileApi() as api:
        yield api, make
    for client in clients:
        await client.aclose()


Hostile = tuple[HostileApi, Callable[..., WorkApiClient]]


@pytest.mark.parametrize(
    ("ttl", "why"),
    [
        ("NaN", "NaN"),
        ("Infinity", "an infinity"),
        ("-Infinity", "an infinity"),
        ("1e999", "a float that overflows"),
        ("1e20", "out of range"),
        ("-5", "negative"),
        ("true", "a boolean where a number belongs"),
        ('"60"', "a string where a number belongs"),
        ("60.5", "not a whole number"),
    ],
)
async def test_11_1_a_heartbeat_ttl_that_is_not_a_sane_number_is_a_response_error(
    hostile: Hostile, ttl: str, why: str
) -> None:
    """#11.1: NaN, Infinity, 1e20, true in ttl_seconds → ResponseError (the core's unknown outcome), no crash."""
    api, make = hostile
    body = json.dumps(heartbeat_answer()).replace('"ttl_seconds": 60', f'"ttl_seconds": {ttl}')
    api.answer_raw("heartbeat", body.encode())
    with pytest.raises(ResponseError):
        await make().heartbeat("work_1", expected_last_heartbeat=NO_HEARTBEAT)


@pytest.mark.parametrize("extended", ['"false"', "1", "null"])
async def test_11_1_lease_extended_must_be_a_boolean(hostile: Hostile, extended: str) -> None:
    """#11.1: `"false"` (truthy as a string) must not read as an extended lease."""
    api, make = hostile
    body = json.dumps(heartbeat_answer()).replace('"lease_extended": true', f'"lease_extended": {extended}')
    api.answer_raw("heartbeat", body.encode())
    with pytest.raises(ResponseError):
        await make().heartbeat("work_1", expected_last_heartbeat=NO_HEARTBEAT)


async def test_11_1_a_sane_heartbeat_answer_still_parses(hostile: Hostile) -> None:
    """#11.1 (control): the checks refuse only what is wrong; 60.0 is a whole number."""
    api, make = hostile
    api.answer_raw("heartbeat", json.dumps(heartbeat_answer(ttl_seconds=60.0)).encode())
    result = await make().heartbeat("work_1", expected_last_heartbeat=NO_HEARTBEAT)
    assert result.ttl_seconds == 60 and result.lease_extended is True


@pytest.mark.parametrize("operation", ["poll", "heartbeat", "stats"])
async def test_11_2_a_deeply_nested_answer_is_a_response_error(hostile: Hostile, operation: str) -> None:
    """#11.2: 100,000 nested arrays (RecursionError in json) and 40 nested objects (past the depth limit)."""
    api, make = hostile
    client = make()
    call = {
        "poll": lambda: client.poll(block_ms=100),
        "heartbeat": lambda: client.heartbeat("work_1"),
        "stats": client.stats,
    }[operation]
    api.answer_raw(operation, b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(ResponseError, match="nests deeper"):
        await call()
    nested: Any = 1
    for _ in range(40):
        nested = {"x": nested}
    api.answer_raw(operation, json.dumps({**heartbeat_answer(), **work_object(), "extra": nested}).encode())
    with pytest.raises(ResponseError, match="nests deeper"):
        await call()


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_11_5_a_300_mb_answer_is_refused_without_being_read(hostile: Hostile, declared: bool) -> None:
    """#11.5: a 300 MB poll answer is never read into memory: the client stops at the cap (1 MiB by default)."""
    api, make = hostile
    size = 300 * 1024 * 1024
    chunk = b" " * (1024 * 1024)
    sent = 0

    async def huge(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse(headers={"content-type": "application/json"})
        if declared:
            response.content_length = size
        else:
            response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            while sent < size:
                await response.write(chunk)
                sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should
        return response

    api.answer("poll", huge)
    process = psutil.Process()
    rss_before = process.memory_info().rss
    started = time.monotonic()
    with pytest.raises(ResponseError, match="larger than"):
        await make().poll(block_ms=100)
    assert time.monotonic() - started < 5
    assert process.memory_info().rss - rss_before < 50 * 1024 * 1024
    assert sent < 100 * 1024 * 1024, f"the server could send {sent} bytes: the client kept reading"


async def test_11_5_the_size_cap_is_configurable(hostile: Hostile) -> None:
    """#11.5: `max_response_bytes` sets the cap; an answer under it is read."""
    api, make = hostile
    body = json.dumps(work_object() | {"metadata": {"k": "v" * 3000}}).encode()
    api.answer_raw("poll", body)
    with pytest.raises(ResponseError, match="larger than 2048 bytes"):
        await make(max_response_bytes=2048).poll(block_ms=100)
    work = await make(max_response_bytes=8192).poll(block_ms=100)
    assert work is not None and work.id == "work_1"


@pytest.mark.parametrize("operation", ["poll", "heartbeat"])
async def test_11_5_a_drip_fed_answer_ends_at_the_attempt_deadline(hostile: Hostile, operation: str) -> None:
    """#11.5: an answer dripping one byte every 0.1 s (a read timeout never fires) ends at the attempt's overall
    deadline: block_ms + poll_margin for a poll, `read` for the rest."""
    api, make = hostile
    body = json.dumps(work_object()).encode()

    async def drip(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        try:
            for byte in body:
                await response.write(bytes([byte]))
                await asyncio.sleep(0.1)
        except (ConnectionError, RuntimeError):
            pass
        return response

    api.answer(operation, drip)
    client = make(timeouts=Timeouts(read=0.5, poll_margin=0.4))
    # deadline 0.1 + 0.4 s for the poll, 0.5 s for the heartbeat
    call = client.poll(block_ms=100) if operation == "poll" else client.heartbeat("work_1")
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        await call
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("bad_id", ["../../etc", "work 1", "", "x" * 129, 42, None, "wörk"], ids=lambda v: repr(v)[:12])
async def test_11_10_a_polled_item_with_an_invalid_id_is_a_response_error(hostile: Hostile, bad_id: Any) -> None:
    """#11.10: the item id is validated before anyone uses it (the hand-over would build URLs from it)."""
    api, make = hostile
    api.answer_raw("poll", json.dumps(work_object(bad_id)).encode())
    with pytest.raises(ResponseError):
        await make().poll(block_ms=100)


async def test_11_10_an_ack_answer_about_another_item_is_a_response_error(hostile: Hostile) -> None:
    """#11.10: the ack's answer must be about the item acked."""
    api, make = hostile
    api.answer_raw("ack", json.dumps(work_object("work_2")).encode())
    with pytest.raises(ResponseError, match="another work item"):
        await make().ack("work_1")


@pytest.mark.parametrize("body", [b"", b"{", b"\xff\xfe", b"null"], ids=["empty", "truncated", "not-utf8", "null"])
async def test_11_a_heartbeat_answer_that_is_not_a_heartbeat_is_a_response_error(hostile: Hostile, body: bytes) -> None:
    """#11 ("a malformed answer is a typed client error"): never a ValueError or UnicodeDecodeError."""
    api, make = hostile
    api.answer_raw("heartbeat", body)
    with pytest.raises(ResponseError):
        await make().heartbeat("work_1")


# -- against the real emulator --------------------------------------------------------------------------------


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(workapi_telemetry, "_tracer", provider.get_tracer("test"))
    return exporter


async def test_11_10_the_work_apis_error_message_stays_out_of_span_status(
    emulator: Emu, make_client: ClientFactory, spans: InMemorySpanExporter
) -> None:
    """#11.10: the Work API's own error message (which may quote the item's secret) is not copied into span status
    descriptions, events or attributes."""
    _, _, admin = emulator
    secret = "sk-ant-si-QUOTED-SECRET-1234567890"
    await fault(admin, operation="stats", status=500, message=f"boom: {secret}", count=1, should_retry=False)
    client = await make_client()
    with pytest.raises(ServerError) as caught:
        await client.stats()
    assert secret in caught.value.server_message  # the client keeps it (the caller decides what to log)
    finished = spans.get_finished_spans()
    assert finished, "no span recorded"
    for span in finished:
        text = repr((span.status.description, span.attributes, [(e.name, e.attributes) for e in span.events]))
        assert secret not in text and "boom" not in text
    assert finished[-1].status.description == "HTTP 500"


async def test_11_the_emulators_answers_pass_validation(emulator: Emu, make_client: ClientFactory) -> None:
    """#11 (control, real emulator): a whole item's life passes every check: poll, ack, claim, renew, stop."""
    _, _, admin = emulator
    await enqueue(admin, 1)
    client = await make_client()
    work = await client.poll(block_ms=500)
    assert work is not None
    assert (await client.ack(work.id)).id == work.id
    beat = await client.heartbeat(work.id, expected_last_heartbeat=NO_HEARTBEAT, desired_ttl_seconds=30)
    beat = await client.heartbeat(work.id, expected_last_heartbeat=beat.last_heartbeat, desired_ttl_seconds=30)
    assert beat.lease_extended and beat.ttl_seconds == 30
    assert (await client.stop(work.id, force=True)).id == work.id
    assert (await client.stats()).depth == 0
