"""The HTTP exchanges (the lean one, `sidecar/workapi/_transports/_lean.py`, the default, and httpx)
against a real server on loopback that answers each request with bytes the test scripts: what a client library
does for its users, the lean exchange must do itself; each test that does not look inside the lean exchange runs
over both backends. Guarantees attacked here:

- an answer never reaches the wrong request (a late answer after a deadline, a second answer to one request, bytes
  on an idle connection): a connection whose exchange did not end cleanly is closed, never reused;
- keep-alive connections are reused (one connection for many requests), and at most `max_connections` are open;
- every way an answer can be delimited (length, chunked, end of connection, interim 100) is read whole;
- a connection the server closed, before or during an answer, is a `TransportError` or a new connection, never a
  hang; the size cap holds on this path too (and in tests/workapi/test_hostile_answers.py, over every backend).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sidecar.workapi import (
    RequestTimeout,
    ResponseError,
    RetryPolicies,
    RetryPolicy,
    Timeouts,
    TransportError,
    WorkApiClient,
)
from sidecar.workapi._transports import AnswerTooLarge, ConnectFailed, ExchangeTimeout, make_exchange
from sidecar.workapi._transports._httpx import HttpxExchange
from sidecar.workapi._transports._lean import LeanExchange

ENV = "env_lean"
STATS = json.dumps(
    {"type": "work_queue_stats", "depth": 7, "pending": 0, "oldest_queued_at": None, "workers_polling": 1}
).encode()
ONCE = RetryPolicies(default=RetryPolicy(max_attempts=1, deadline=30.0), per_operation={})

Script = Callable[[int, bytes, asyncio.StreamWriter], Awaitable[None]]
"""(request number, the request's bytes, the connection) -> write the answer (or not)."""


def ok(body: bytes = STATS, *extra: str) -> bytes:
    head = "".join(f"{line}\r\n" for line in extra)
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body),
        head.encode(),
        body,
    )


class ScriptedServer:
    """Reads whole requests (head, then content-length bytes) and lets the script answer each one."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.connections = 0
        self.open_now = 0
        self.most_open = 0
        self.url = ""
        self._handlers: set[tuple[asyncio.Task[None], asyncio.StreamWriter]] = set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add((task, writer))
        self.connections += 1
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                await self.script(len(self.requests), request, writer)
                if writer.is_closing():
                    return
        finally:
            self.open_now -= 1
            writer.close()

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        for _, writer in self._handlers:
            writer.close()
        await asyncio.gather(*(task for task, _ in self._handlers), return_exceptions=True)


Serve = Callable[..., Awaitable[tuple[ScriptedServer, WorkApiClient]]]


async def _serving(backend: str) -> AsyncIterator[Serve]:
    stack: list[tuple[ScriptedServer, WorkApiClient]] = []

    async def start(script: Script, **options: object) -> tuple[ScriptedServer, WorkApiClient]:
        server = await ScriptedServer(script).__aenter__()
        client = WorkApiClient(
            provider="anthropic",
            api_key="sk-ant-lean-secret",
            environment_id=ENV,
            base_url=server.url,
            retry=ONCE,
            http_backend=backend,
            **options,  # type: ignore[arg-type]
        )
        stack.append((server, client))
        return server, client

    yield start
    for server, client in stack:
        await client.aclose()
        await server.__aexit__()


@pytest.fixture
async def serve(
    http_backend: str,
) -> AsyncIterator[Callable[[Script], Awaitable[tuple[ScriptedServer, WorkApiClient]]]]:
    """A scripted server and a client over each backend: what the lean exchange must do, httpx does too."""
    async for start in _serving(http_backend):
        yield start


@pytest.fixture
async def serve_lean() -> AsyncIterator[Serve]:
    """The same over the lean exchange only (for tests that look inside it)."""
    async for start in _serving("httptools"):
        yield start


async def answer_ok(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
    writer.write(ok())


def test_the_default_backend_is_the_lean_exchange_unless_a_proxy_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    options = {"base_url": "http://api.example:8080", "max_connections": 4, "connect_timeout": 1.0}
    assert isinstance(make_exchange("httptools", **options), LeanExchange)  # type: ignore[arg-type]
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    assert isinstance(make_exchange("httptools", **options), HttpxExchange)  # type: ignore[arg-type]
    monkeypatch.setenv("NO_PROXY", "api.example")
    assert isinstance(make_exchange("httptools", **options), LeanExchange)  # type: ignore[arg-type]


async def test_one_keep_alive_connection_carries_every_request_and_the_request_is_well_formed(serve: Serve) -> None:
    server, client = await serve(answer_ok)
    for _ in range(20):
        assert (await client.stats()).depth == 7
    assert server.connections == 1, "each request opened its own connection: keep-alive is broken"
    first = server.requests[0].decode()
    request_line, *headers = first.split("\r\n")
    headers = [line.lower() for line in headers]
    assert request_line == f"GET /v1/environments/{ENV}/work/stats HTTP/1.1"
    names = {line.split(":", 1)[0] for line in headers if line}
    assert {"host", "anthropic-version", "user-agent"} <= names
    assert "authorization" in names or "x-api-key" in names
    assert f"host: 127.0.0.1:{server.url.rsplit(':', 1)[1]}" in headers


async def test_a_post_without_a_body_declares_a_zero_length(serve: Serve) -> None:
    async def heartbeat(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        body = json.dumps(
            {
                "type": "work_heartbeat",
                "last_heartbeat": "2026-01-01T00:00:00Z",
                "lease_extended": True,
                "state": "active",
                "ttl_seconds": 60,
            }
        ).encode()
        writer.write(ok(body))

    server, client = await serve(heartbeat)
    result = await client.heartbeat("work_1", desired_ttl_seconds=60)
    assert result.lease_extended
    assert b"content-length: 0\r\n" in server.requests[0].lower()
    assert server.requests[0].startswith(b"POST /v1/environments/env_lean/work/work_1/heartbeat?")


async def test_connection_close_is_honoured_and_the_next_request_opens_a_new_connection(serve: Serve) -> None:
    async def close_each(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(ok(STATS, "connection: close"))
        await writer.drain()
        writer.close()

    server, client = await serve(close_each)
    for _ in range(3):
        assert (await client.stats()).depth == 7
    assert server.connections == 3


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\n"
            + STATS[:5]
            + b"\r\n"
            + b"%x\r\n" % (len(STATS) - 5)
            + STATS[5:]
            + b"\r\n0\r\n\r\n",
            id="chunked",
        ),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(), id="interim-100-first"),
        pytest.param(ok()[: len(ok()) - len(STATS)] + STATS, id="length"),
    ],
)
async def test_every_framing_of_an_answer_is_read_whole(serve: Serve, answer: bytes) -> None:
    async def framed(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        for at in range(0, len(answer), 7):  # in small pieces: the parser must carry state across reads
            writer.write(answer[at : at + 7])
            await writer.drain()

    server, client = await serve(framed)
    assert (await client.stats()).depth == 7
    assert (await client.stats()).depth == 7
    assert server.connections == 1


async def test_an_answer_delimited_by_the_end_of_the_connection_is_read_whole(serve: Serve) -> None:
    async def until_close(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + STATS)
        await writer.drain()
        writer.close()

    server, client = await serve(until_close)
    assert (await client.stats()).depth == 7
    assert (await client.stats()).depth == 7
    assert server.connections == 2


async def test_a_late_answer_never_reaches_the_next_request(serve: Serve) -> None:
    """The first request's deadline passes; its answer comes later on the same connection. The second request must
    get its own answer (depth 2), not the first one's (depth 1): the timed-out connection is closed."""
    release = asyncio.Event()

    async def late_then_prompt(number: int, _: bytes, writer: asyncio.StreamWriter) -> None:
        if number == 1:
            await release.wait()
        body = json.dumps(
            {"type": "work_queue_stats", "depth": number, "pending": 0, "oldest_queued_at": None, "workers_polling": 0}
        ).encode()
        writer.write(ok(body))

    server, client = await serve(late_then_prompt, timeouts=Timeouts(read=0.3))
    with pytest.raises(RequestTimeout):
        await client.stats()
    release.set()
    assert (await client.stats()).depth == 2
    assert server.connections == 2


async def test_a_second_answer_to_one_request_makes_the_connection_unusable(serve: Serve, http_backend: str) -> None:
    """A late second answer is taken as the answer to the next request on that connection. The lean exchange sees
    the bytes after the first answer and closes the connection; httpx keeps them buffered, and the client refuses
    the stray answer when it is read (it is no stats answer) and shuts that connection down."""

    async def twice(number: int, _: bytes, writer: asyncio.StreamWriter) -> None:
        body = json.dumps(
            {"type": "work_queue_stats", "depth": number, "pending": 0, "oldest_queued_at": None, "workers_polling": 0}
        ).encode()
        writer.write(ok(body) + ok(b'{"depth": 999}'))

    server, client = await serve(twice)
    assert (await client.stats()).depth == 1
    if http_backend == "httpx":
        with pytest.raises(ResponseError):
            await client.stats()  # read the stray: not trusted
    depth = (await client.stats()).depth
    assert depth == len(server.requests), "the answer to this request, not a stray one"
    assert server.connections == 2


async def test_a_connection_the_server_closed_while_idle_is_replaced(serve_lean: Serve) -> None:
    closed: list[asyncio.StreamWriter] = []

    async def answer_then_close_later(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(ok())
        closed.append(writer)

    server, client = await serve_lean(answer_then_close_later)
    assert (await client.stats()).depth == 7
    closed[0].close()  # the server ends the idle keep-alive connection (as servers do after their idle timeout)
    exchange = client._exchange
    assert isinstance(exchange, LeanExchange)
    deadline = asyncio.get_running_loop().time() + 5
    while not all(connection.closed for connection in exchange._idle):  # the client has seen the FIN
        assert asyncio.get_running_loop().time() < deadline, "the client never saw the server close"
        await asyncio.sleep(0.01)
    assert (await client.stats()).depth == 7
    assert server.connections == 2


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"depth"', "closed mid-body"),
        (b"HTTP/1.1 200 OK\r\ncontent-len", "closed mid-head"),
        (b"", "closed with no answer"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not HTTP"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}", "two lengths"),
    ],
)
async def test_a_broken_answer_is_a_transport_error_and_the_next_request_works(
    serve: Serve, answer: bytes, why: str
) -> None:
    async def broken_first(number: int, _: bytes, writer: asyncio.StreamWriter) -> None:
        if number > 1:
            writer.write(ok())
            return
        writer.write(answer)
        await writer.drain()
        writer.close()

    _, client = await serve(broken_first)
    with pytest.raises(TransportError) as caught:
        await client.stats()
    assert "sk-ant-lean-secret" not in repr(caught.value) + str(caught.value), why
    assert (await client.stats()).depth == 7, why


def answer_once_together(count: int) -> Script:
    """Holds the answers until `count` requests have arrived (so that many are in flight at once), then answers
    every request at once."""
    gate = asyncio.Event()
    arrived = 0

    async def held(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal arrived
        arrived += 1
        if arrived >= count:
            gate.set()
        await gate.wait()
        writer.write(ok())

    return held


async def test_no_more_than_max_connections_are_open(serve: Serve) -> None:
    server, client = await serve(answer_once_together(2), max_connections=2)
    results = await asyncio.gather(*(client.stats() for _ in range(10)))
    assert [r.depth for r in results] == [7] * 10
    assert server.most_open == 2
    assert server.connections == 2


async def test_a_declared_length_over_the_cap_is_refused_before_the_body() -> None:
    async with ScriptedServer(answer_ok) as server:
        exchange = LeanExchange(base_url=server.url, max_connections=1, connect_timeout=1.0)
        with pytest.raises(AnswerTooLarge) as caught:
            await exchange.send("GET", server.url + "/stats", {}, None, max_bytes=len(STATS) - 1, timeout=5)
        assert caught.value.declared == len(STATS)
        answer = await exchange.send("GET", server.url + "/stats", {}, None, max_bytes=1024, timeout=5)
        assert answer.status == 200 and answer.headers["Content-Type"] == "application/json"
        assert server.connections == 2  # the refused answer's connection was not reused
        await exchange.aclose()


async def test_answer_headers_are_read_case_insensitively_first_one_wins() -> None:
    async def answer(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(ok(STATS, "Request-Id: req_1", "request-id: req_2", "X-Empty:"))

    async with ScriptedServer(answer) as server:
        exchange = LeanExchange(base_url=server.url, max_connections=1, connect_timeout=1.0)
        headers = (await exchange.send("GET", server.url + "/stats", {}, None, 1024, timeout=5)).headers
        assert headers.get("REQUEST-ID") == headers["request-id"] == "req_1"
        assert headers.get("x-empty") == "" and "X-EMPTY" in headers
        assert headers.get("retry-after") is None and "retry-after" not in headers
        with pytest.raises(KeyError):
            headers["retry-after"]
        assert [name.lower() for name in headers] == [
            "content-type",
            "content-length",
            "request-id",
            "request-id",
            "x-empty",
        ]
        assert len(headers) == 5
        await exchange.aclose()


async def test_the_timeout_bounds_the_wait_for_a_connection_and_for_the_answer() -> None:
    """The exchange bounds itself (shared timers, no asyncio.timeout around it): a request that waits for the only
    connection, or for an answer that never comes, ends in time (never sent, or timed out); the connection is not
    reused."""
    release = asyncio.Event()

    async def held(_: int, __: bytes, writer: asyncio.StreamWriter) -> None:
        await release.wait()  # answers only once the test is over

    async with ScriptedServer(held) as server:
        exchange = LeanExchange(base_url=server.url, max_connections=1, connect_timeout=1.0)
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = asyncio.ensure_future(exchange.send("GET", server.url + "/a", {}, None, 1024, timeout=0.5))
        second = asyncio.ensure_future(exchange.send("GET", server.url + "/b", {}, None, 1024, timeout=0.2))
        with pytest.raises(ConnectFailed):
            await second  # waited for the slot the first one holds: never sent
        assert loop.time() - started < 0.45
        with pytest.raises(ExchangeTimeout):
            await first  # waited for an answer
        assert 0.5 <= loop.time() - started < 1.5
        release.set()
        assert server.requests and len(server.requests) == 1  # the second never got a connection
        await exchange.aclose()


async def test_a_request_that_cannot_be_written_safely_is_refused() -> None:
    exchange = LeanExchange(base_url="http://127.0.0.1:1", max_connections=1, connect_timeout=1.0)
    with pytest.raises(ValueError, match="target"):
        await exchange.send("GET", "http://127.0.0.1:1/a b", {}, None, 1024, timeout=5)
    with pytest.raises(ValueError, match="header"):
        await exchange.send("GET", "http://127.0.0.1:1/a", {"x-api-key": "k\r\nx-injected: 1"}, None, 1024, timeout=5)
    with pytest.raises(ValueError, match="origin"):
        await exchange.send("GET", "http://elsewhere.example/a", {}, None, 1024, timeout=5)
    with pytest.raises(ConnectFailed):  # nothing listens on port 1
        await exchange.send("GET", "http://127.0.0.1:1/a", {}, None, 1024, timeout=5)


async def test_a_bursts_extra_connections_are_closed_once_idle_too_long(
    serve_lean: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five requests at once open five connections; steady one-at-a-time traffic after that uses one, and the
    other four are closed once idle for the keep-alive time (here 0.2 s), not kept open for ever."""
    from sidecar.workapi._transports import _lean

    monkeypatch.setattr(_lean, "KEEPALIVE_SECONDS", 0.2)
    server, client = await serve_lean(answer_once_together(5), max_connections=5)
    await asyncio.gather(*(client.stats() for _ in range(5)))
    assert server.open_now == 5
    deadline = asyncio.get_running_loop().time() + 5
    while server.open_now > 1:
        assert asyncio.get_running_loop().time() < deadline, f"{server.open_now} connections still open"
        assert (await client.stats()).depth == 7
        await asyncio.sleep(0.05)  # pacing the traffic (the condition above is what the test waits on)
    assert server.connections == 5  # the one kept in use was never replaced


@pytest.mark.parametrize(
    ("base_url", "host"),
    [
        ("http://127.0.0.1:8080", b"127.0.0.1:8080"),
        ("https://api.anthropic.com", b"api.anthropic.com"),
        ("https://api.example:443/prefix", b"api.example"),
        ("http://[::1]:9", b"[::1]:9"),
        ("https://bücher.example", b"xn--bcher-kva.example"),
    ],
)
def test_the_host_header_names_the_origin_as_http_wants_it(base_url: str, host: bytes) -> None:
    exchange = LeanExchange(base_url=base_url, max_connections=1, connect_timeout=1.0)
    assert exchange._head({}) == b"host: " + host + b"\r\n"
