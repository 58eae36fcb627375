"""The lean HTTP/1.1 exchange (`--http-backend httptools`, the default): asyncio's own transports, httptools (llhttp)
as the parser, nothing else per request.

The Work API client's requests are small, to one origin, over keep-alive connections: this exchange writes one
prebuilt request (the header block is encoded once per operation) with one `write` and feeds the answer's bytes
to llhttp; the answer is complete when llhttp says so (`python -m bench.http_backends` compares it with httpx).

What it does not do, on purpose: proxies (`make_exchange` hands the requests to httpx when HTTP(S)_PROXY applies to
the Work API's URL), redirects, compression, cookies, `Expect: 100-continue`, pipelining. What it does: a pool of
at most `max_connections` keep-alive connections (idle ones closed after `KEEPALIVE_SECONDS`), TLS with the seam's
context, a connect timeout, the `max_bytes` cap (a declared length over it is refused before a byte of the body is
read; an undeclared one stops at the cap), and the `MAX_HEAD_BYTES` cap on the header block. The whole exchange (a
free connection, connecting, the answer) has `timeout` seconds; a connection whose exchange did not end cleanly
(past its time, cancelled, broken, bytes after the answer, an answer the client distrusts) is closed, never reused.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httptools

from ._base import (
    KEEPALIVE_SECONDS,
    MAX_HEAD_BYTES,
    Answer,
    AnswerTooLarge,
    ConnectFailed,
    Disconnected,
    ExchangeTimeout,
    ProtocolFailed,
    TLSFailed,
    detail,
    ssl_context,
    take_turn,
    tls_detail,
)

_NO_BODY_STATUSES = frozenset({204, 304})


class _Abort(Exception):
    """Raised inside a parser callback to stop parsing; the reason is kept on the connection."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection: at most one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._max_bytes = 0
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        self._status = 0
        self._until_eof = False
        """The body ends with the connection (set once a final answer's headers are in)."""
        self._head_bytes = 0
        """The header block's bytes so far (names and values)."""
        self._head_read = 0
        """Bytes received while the answer's header block is not complete."""
        self._in_head = False
        self._keep_alive = False
        self._error: BaseException | None = None

    # -- one exchange ----------------------------------------------------------------------------------

    def start(self, request: bytes, max_bytes: int, loop: asyncio.AbstractEventLoop) -> asyncio.Future[Answer]:
        assert self.transport is not None
        self._waiter = waiter = loop.create_future()
        self._max_bytes = max_bytes
        self._reset_answer()
        self.transport.write(request)
        return waiter

    def _reset_answer(self) -> None:
        self._reason = b""
        self._headers = []
        self._body = []
        self._size = 0
        self._status = 0
        self._until_eof = False
        self._keep_alive = False
        self._head_bytes = self._head_read = 0
        self._in_head = True

    def reusable(self) -> bool:
        return not self.closed and self._error is None and self._keep_alive

    def stale(self, now: float) -> bool:
        """Closed by the server, or idle for KEEPALIVE_SECONDS: not to be used again."""
        return self.closed or now - self.idle_since >= KEEPALIVE_SECONDS

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _finish(self, result: Answer | BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if isinstance(result, BaseException):
            waiter.set_exception(result)
        else:
            waiter.set_result(result)

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._finish(error)
        self.close()

    # -- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is not a subclass)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for (on an idle connection): it cannot be trusted again
            self._error = self._error or ProtocolFailed("bytes after the answer")
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolFailed("the server switched protocols"))
        except httptools.HttpParserError as exc:
            if self._error is not None:  # raised by one of our callbacks (a cap, an abort)
                self._fail(self._error)
            else:
                self._fail(ProtocolFailed(f"not an HTTP/1.1 answer: {detail(exc)}"))
            return
        if self._in_head and self._waiter is not None:
            # llhttp keeps a header that spans reads in memory: bound what it may keep (one read over the cap).
            self._head_read += len(data)
            if self._head_read > MAX_HEAD_BYTES:
                self._fail(AnswerTooLarge(MAX_HEAD_BYTES, None, head=True))

    def eof_received(self) -> bool:
        if self._waiter is not None and self._until_eof:
            self.on_message_complete()  # the body is delimited by the end of the connection
        self.closed = True
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None:
            reason = "" if exc is None else f" ({type(exc).__name__})"
            self._fail(Disconnected(f"the connection closed before the answer was complete{reason}"))

    # -- httptools callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._waiter is None:  # a second answer to one request: the connection cannot be trusted again
            self._error = ProtocolFailed("bytes after the answer")
            raise _Abort

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES:
            self._error = AnswerTooLarge(MAX_HEAD_BYTES, None, head=True)
            raise _Abort
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._status = status = self._parser.get_status_code()
        if status < 200:
            self._in_head = True
            return  # an interim answer (100 Continue): the real one follows
        declared: int | None = None
        chunked = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                declared = int(value) if value.strip().isdigit() else None
            elif lowered == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if declared is not None and declared > self._max_bytes:
            self._error = AnswerTooLarge(self._max_bytes, declared)
            raise _Abort
        self._until_eof = declared is None and not chunked and status not in _NO_BODY_STATUSES
        self._keep_alive = self._parser.should_keep_alive() and not self._until_eof  # llhttp: only here

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._max_bytes:
            self._error = AnswerTooLarge(self._max_bytes, None)
            raise _Abort
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:
            self._reset_answer()
            return
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._finish(Answer(self._status, self._reason.decode("latin-1"), _Headers(self._headers), body, self.close))


class _Headers(Mapping[str, str]):
    """An answer's headers as llhttp gave them, read case-insensitively: the first of a name wins (as in a
    multidict). Nothing is decoded or indexed until read; the client reads one or two of a handful per answer."""

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def get(self, name: str, default: Any = None) -> Any:
        wanted = name.lower().encode("latin-1")
        for key, value in self._raw:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return default

    def __getitem__(self, name: str) -> str:
        value: str | None = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return (key.decode("latin-1") for key, _ in self._raw)

    def __len__(self) -> int:
        return len(self._raw)


class LeanExchange:
    """Requests to one origin (the Work API's) over a pool of keep-alive connections."""

    def __init__(self, *, base_url: str, max_connections: int, connect_timeout: float) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the Work API's URL must be http:// or https:// with a host")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._https else 80)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        host = f"[{self._host}]" if ":" in self._host else self._host.encode("idna").decode("ascii")
        default_port = (self._https and self._port == 443) or (not self._https and self._port == 80)
        self._host_line = f"host: {host if default_port else f'{host}:{self._port}'}\r\n".encode("ascii")
        self._ssl: ssl.SSLContext | None = ssl_context() if self._https else None
        self._connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()
        self._heads: dict[int, tuple[Mapping[str, str], bytes]] = {}
        self._deadlines = _Deadlines()
        self._closed = False

    def _head(self, headers: Mapping[str, str]) -> bytes:
        """The encoded header block for one operation's headers (a handful of mappings, each encoded once)."""
        cached = self._heads.get(id(headers))
        if cached is not None and cached[0] is headers:
            return cached[1]
        lines = [self._host_line]
        for name, value in headers.items():
            if not _is_token(name) or any(c in value for c in "\r\n\0"):
                raise ValueError("a header name or value is not valid in HTTP/1.1")
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        head = b"".join(lines)
        if len(self._heads) < 64:
            self._heads[id(headers)] = (headers, head)  # keeps the mapping alive, so its id stays its own
        return head

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        max_bytes: int,
        *,
        timeout: float,  # noqa: ASYNC109  # the exchange bounds itself (the lean one without a timer per request)
    ) -> Answer:
        if self._closed:
            raise ConnectFailed("the client is closed")
        if not url.startswith(self._origin):
            raise ValueError("the request is not to the Work API's origin")
        target = url[len(self._origin) :] or "/"
        if not target.isascii() or not target.isprintable() or " " in target:
            raise ValueError("the request target is not a valid HTTP/1.1 target")
        start = f"{method} {target} HTTP/1.1\r\n".encode("ascii")
        if body is not None:
            request = b"%s%scontent-length: %d\r\n\r\n%s" % (start, self._head(headers), len(body), body)
        elif method in ("POST", "PUT", "PATCH"):
            request = b"%s%scontent-length: 0\r\n\r\n" % (start, self._head(headers))
        else:
            request = b"%s%s\r\n" % (start, self._head(headers))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        slots = self._slots
        await take_turn(slots, timeout)  # every connection busy: wait for one, within the deadline
        try:
            connection = self._take_idle(loop.time())
            if connection is None:
                connection = await self._connect(loop, deadline)
            waiter = connection.start(request, max_bytes, loop)
            self._deadlines.watch(waiter, deadline, loop)
            try:
                answer = await waiter
            except BaseException:  # failed, too large, past the deadline or cancelled: never reused
                self._discard(connection)
                raise
            finally:
                self._deadlines.forget(waiter)
            if connection.reusable() and not self._closed:
                connection.idle_since = now = loop.time()
                self._idle.append(connection)
                self._prune(now)
            else:
                self._discard(connection)
            return answer
        finally:
            slots.release()

    def _take_idle(self, now: float) -> _Connection | None:
        idle = self._idle
        while idle:
            connection = idle.pop()  # the most recently used: the least likely to have been closed by the server
            if not connection.stale(now):
                return connection
            self._discard(connection)
        return None

    def _prune(self, now: float) -> None:
        """Close the connections idle for KEEPALIVE_SECONDS or closed by the server: the oldest are at the bottom
        (the pool is used from the top), so a burst's extra connections do not stay open for ever."""
        idle = self._idle
        while idle and idle[0].stale(now):
            self._discard(idle.pop(0))

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + self._connect_timeout)):
                _, connection = await loop.create_connection(
                    _Connection,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectFailed("connect timed out") from None
        except ssl.SSLError as exc:
            raise TLSFailed(tls_detail(exc)) from None
        except OSError as exc:
            raise ConnectFailed(detail(exc)) from None
        self._all.add(connection)
        return connection

    def _discard(self, connection: _Connection) -> None:
        connection.close()
        self._all.discard(connection)

    async def aclose(self) -> None:
        self._closed = True
        self._idle.clear()
        for connection in list(self._all):
            self._discard(connection)


class _Deadlines:
    """The deadlines of the answers awaited, enforced by timers shared per `GRAIN` of time: a waiter is failed with
    `ExchangeTimeout` at most `GRAIN` seconds after its deadline.

    Not a timer per request (nor an asyncio.timeout, which makes one too): at saturation that is thousands of
    timers a second, nearly all cancelled, each pushed on and later swept out of the loop's heap. Here a request
    adds and removes one dict entry, and at most one timer per grain fires, which looks at the few answers awaited
    (at most the pool's connections)."""

    GRAIN = 0.02

    def __init__(self) -> None:
        self._waiters: dict[asyncio.Future[Answer], int] = {}
        """Each answer awaited, with the tick (a multiple of GRAIN) at or after its deadline."""
        self._timers: set[int] = set()

    def watch(self, waiter: asyncio.Future[Answer], deadline: float, loop: asyncio.AbstractEventLoop) -> None:
        tick = math.ceil(deadline / self.GRAIN)
        self._waiters[waiter] = tick
        if tick not in self._timers:
            self._timers.add(tick)
            loop.call_at(tick * self.GRAIN, self._fire, tick)

    def forget(self, waiter: asyncio.Future[Answer]) -> None:
        self._waiters.pop(waiter, None)

    def _fire(self, tick: int) -> None:
        self._timers.discard(tick)
        for waiter, due in list(self._waiters.items()):
            if due <= tick:
                del self._waiters[waiter]
                if not waiter.done():
                    waiter.set_exception(ExchangeTimeout("no complete answer within the time given"))


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _is_token(name: str) -> bool:
    return bool(name) and all(c in _TOKEN_CHARS for c in name)
