"""An answer that does not belong to its request is not trusted, and every error says whether the request may have
been applied. Against a real server on loopback that writes the bytes each test scripts, over every HTTP backend.

- an answer whose `type` is another operation's (or about another item) is a `ResponseError`, and on the lean
  exchange its connection is closed: the real answer may still come on it;
- an answer's header block is capped (64 KiB) in every backend: a huge one is refused, never read whole;
- a refusal (412) by a retry after an attempt whose outcome was unknown carries `maybe_applied`; one that follows
  nothing doubtful, or a connection that never opened, does not.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sidecar.workapi import (
    NO_HEARTBEAT,
    ConnectError,
    LeaseLostError,
    ResponseError,
    RetryPolicies,
    RetryPolicy,
    TransportError,
    WorkApiClient,
)

from .test_lean import Script, ScriptedServer, ok

ENV = "env_untrusted"
ONCE = RetryPolicies(default=RetryPolicy(max_attempts=1, deadline=10.0), per_operation={})
RETRIES = RetryPolicies(default=RetryPolicy(max_attempts=3, initial_backoff=0.01, deadline=10.0), per_operation={})
STATS = {"type": "work_queue_stats", "depth": 1, "pending": 0, "oldest_queued_at": None, "workers_polling": 0}
BEAT = {"type": "work_heartbeat", "last_heartbeat": "2026-01-01T00:00:01Z", "lease_extended": True, "state": "active"}
WORK = {"type": "work", "id": "work_1", "environment_id": ENV, "data": {"type": "session", "id": "sesn_1"}}
REFUSED = {
    "type": "error",
    "error": {
        "type": "invalid_request_error",
        "message": "expected_last_heartbeat does not match",
        "details": {"current_state": {"state": "active", "last_heartbeat": "2026-01-01T00:00:01Z"}},
    },
}

Start = Callable[..., Awaitable[tuple[ScriptedServer, WorkApiClient]]]


@pytest.fixture
async def start(http_backend: str) -> AsyncIterator[Start]:
    stack: list[tuple[ScriptedServer, WorkApiClient]] = []

    async def begin(script: Script, retry: RetryPolicies = ONCE) -> tuple[ScriptedServer, WorkApiClient]:
        server = await ScriptedServer(script).__aenter__()
        client = WorkApiClient(
            provider="anthropic",
            api_key="k-short",
            environment_id=ENV,
            base_url=server.url,
            retry=retry,
            http_backend=http_backend,
        )
        stack.append((server, client))
        return server, client

    yield begin
    for server, client in stack:
        await client.aclose()
        await server.__aexit__()


def answers(*bodies: object, status: int = 200) -> Script:
    """Answer request n with bodies[n-1] (the last one for the rest)."""

    async def script(number: int, _: bytes, writer: asyncio.StreamWriter) -> None:
        body = bodies[min(number, len(bodies)) - 1]
        raw = ok(json.dumps(body).encode())
        writer.write(raw if status == 200 else raw.replace(b"200 OK", b"%d Error" % status, 1))

    return script


@pytest.mark.parametrize(
    ("operation", "wrong"),
    [("heartbeat", STATS), ("heartbeat", {}), ("stats", BEAT), ("ack", BEAT), ("ack", {**WORK, "id": "work_2"})],
    ids=["heartbeat-got-stats", "heartbeat-got-empty", "stats-got-heartbeat", "ack-got-heartbeat", "ack-other-item"],
)
async def test_an_answer_that_does_not_belong_is_a_response_error_and_its_connection_closed(
    start: Start, http_backend: str, operation: str, wrong: dict[str, object]
) -> None:
    """A late second answer is taken as the answer to the next request on that connection: so an answer of
    another operation's type (or about another item) is not trusted, and the lean exchange closes its
    connection, because the real answer may still come on it."""
    server, client = await start(answers(wrong, STATS))
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "heartbeat": lambda: client.heartbeat("work_1", expected_last_heartbeat=NO_HEARTBEAT),
        "stats": client.stats,
        "ack": lambda: client.ack("work_1"),
    }
    with pytest.raises(ResponseError) as caught:
        await calls[operation]()
    assert caught.value.outcome_unknown and caught.value.maybe_applied
    assert (await client.stats()).depth == 1
    if http_backend == "httptools":
        assert server.connections == 2, "the untrusted answer's connection was not used again"


@pytest.mark.parametrize("size", [100 * 1024, 8 * 1024 * 1024], ids=["100KiB", "8MiB"])
async def test_a_header_block_over_the_cap_is_refused_without_being_read(start: Start, size: int) -> None:
    """Finding 3.
    The default exchange had no limit on the answer's header block: a huge one was read whole into memory and
    accepted. Every backend refuses it now, before reading it whole."""
    written = 0

    async def huge_head(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n")
        line = b"x-filler: " + b"a" * 1000 + b"\r\n"
        try:
            while written < size:
                writer.write(line)
                written += len(line)
                await writer.drain()
            body = json.dumps(STATS).encode()
            writer.write(b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        except ConnectionError:
            return

    _, client = await start(huge_head)
    started = time.monotonic()
    with pytest.raises((ResponseError, TransportError)):
        await client.stats()
    assert time.monotonic() - started < 5
    assert written < 4 * 1024 * 1024, f"stopped reading early ({written} bytes written)"


async def test_a_header_block_under_the_cap_is_read(start: Start) -> None:
    head = [f"x-filler-{n}: {'a' * 1000}" for n in range(30)]
    body = json.dumps(STATS).encode()

    async def big_head(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(ok(body, *head))

    _, client = await start(big_head)
    assert (await client.stats()).depth == 1


async def test_a_refusal_after_an_unknown_outcome_is_marked_maybe_applied(start: Start) -> None:
    """Finding 1.
    The first attempt's connection closes after the request was sent (the API may have applied it); the
    retry is refused with 412. The refusal says so: it may be the work of the first attempt."""

    async def lost_then_refused(number: int, _: bytes, writer: asyncio.StreamWriter) -> None:
        if number == 1:
            writer.close()
            return
        writer.write(ok(json.dumps(REFUSED).encode()).replace(b"200 OK", b"412 Precondition Failed", 1))

    _, client = await start(lost_then_refused, RETRIES)
    with pytest.raises(LeaseLostError) as caught:
        await client.heartbeat("work_1", expected_last_heartbeat="2026-01-01T00:00:00Z")
    assert caught.value.attempts == 2 and caught.value.maybe_applied
    assert not caught.value.outcome_unknown, "the refusal itself is a definite answer"
    assert caught.value.current_state is not None and caught.value.current_state.state == "active"


async def test_a_refusal_that_follows_nothing_doubtful_is_not_marked(start: Start) -> None:
    _, client = await start(answers(REFUSED, status=412), RETRIES)
    with pytest.raises(LeaseLostError) as caught:
        await client.heartbeat("work_1", expected_last_heartbeat="2026-01-01T00:00:00Z")
    assert caught.value.attempts == 1 and not caught.value.maybe_applied


async def test_a_connection_that_never_opened_was_not_applied(http_backend: str) -> None:
    client = WorkApiClient(
        provider="anthropic",
        api_key="k",
        environment_id=ENV,
        base_url="http://127.0.0.1:1",
        retry=RETRIES,
        http_backend=http_backend,
    )
    try:
        with pytest.raises(ConnectError) as caught:
            await client.heartbeat("work_1", expected_last_heartbeat=NO_HEARTBEAT)
        assert not caught.value.outcome_unknown and not caught.value.maybe_applied
    finally:
        await client.aclose()
