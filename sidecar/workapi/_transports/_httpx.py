"""The httpx exchange (`--http-backend httpx`): httpx's own stack, the design's HTTP library. It also carries the
requests when HTTP(S)_PROXY applies to the Work API's URL (the lean exchange speaks to the origin only), and any
`transport=` an embedder passes. Imported only then: a sidecar on the lean exchange does not load httpx's client.

Environment settings are resolved once, when the exchange is made: the proxy (`make_exchange` passes it; httpx's
own `trust_env` lookups per request stay off) and the TLS context (the seam's `ssl_context`). No cookie jar, no
redirects; the answer's body is read raw (no decompression: it must be JSON as sent), at most `max_bytes`. An
answer the client distrusts has its connection shut down; bytes httpx already buffered after an answer are not
seen here (an answer read from them is checked by the client like any other: its type, its item).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from ._base import (
    MAX_HEAD_BYTES,
    Answer,
    AnswerTooLarge,
    ConnectFailed,
    Disconnected,
    ExchangeError,
    ExchangeTimeout,
    ProtocolFailed,
    TLSFailed,
    detail,
    ssl_cause,
    ssl_context,
    tls_detail,
)


class HttpxExchange:
    """One httpx.AsyncClient, its pool bounded by `max_connections`; each exchange bounded by an asyncio.timeout."""

    def __init__(
        self,
        *,
        base_url: str,
        max_connections: int,
        connect_timeout: float,
        proxy: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=min(max_connections, 16))
        verify: Any = ssl_context() if transport is None and (base_url.startswith("https:") or proxy) else True
        self._client = httpx.AsyncClient(
            # Read/write/pool timeouts: the exchange's overall deadline per attempt bounds them all.
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=None, pool=None),
            limits=limits,
            transport=transport,
            proxy=proxy if transport is None else None,
            verify=verify,
            trust_env=False,
            follow_redirects=False,
        )

    async def send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        max_bytes: int,
        *,
        timeout: float,  # noqa: ASYNC109  # the exchange bounds itself
    ) -> Answer:
        try:
            async with asyncio.timeout(timeout):
                return await self._send(method, url, headers, body, max_bytes)
        except TimeoutError:
            raise ExchangeTimeout(f"no complete answer within {timeout:.1f}s") from None

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, max_bytes: int
    ) -> Answer:
        request = self._client.build_request(method, url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise _mapped(exc) from None
        try:
            if sum(len(name) + len(value) for name, value in response.headers.raw) > MAX_HEAD_BYTES:
                raise AnswerTooLarge(MAX_HEAD_BYTES, None, head=True)  # (h11 itself stops reading at 100 KiB)
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise AnswerTooLarge(max_bytes, int(declared))
            pieces: list[bytes] = []
            size = 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > max_bytes:
                    raise AnswerTooLarge(max_bytes, None)
                pieces.append(chunk)
        except httpx.TransportError as exc:
            raise _mapped(exc) from None
        finally:
            await response.aclose()
        distrust = _closer(response.extensions.get("network_stream"))
        return Answer(response.status_code, response.reason_phrase, response.headers, b"".join(pieces), distrust)

    async def aclose(self) -> None:
        await self._client.aclose()


def _closer(stream: Any) -> Callable[[], None] | None:
    """Shuts the answer's connection down (httpcore then finds it readable, at its end, and never reuses it)."""
    sock = stream.get_extra_info("socket") if stream is not None else None
    if sock is None:
        return None

    def shut() -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    return shut


def _mapped(exc: httpx.TransportError) -> ExchangeError:
    """httpx's failure as the seam's."""
    if isinstance(exc, httpx.ConnectTimeout):
        return ConnectFailed(f"connect timed out: {detail(exc)}")
    if isinstance(exc, httpx.ConnectError | httpx.ProxyError):
        cause = ssl_cause(exc)
        return TLSFailed(tls_detail(cause)) if cause is not None else ConnectFailed(detail(exc))
    if isinstance(exc, httpx.TimeoutException):
        return ExchangeTimeout(detail(exc))
    if isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.CloseError):
        return Disconnected(detail(exc))
    if isinstance(exc, httpx.RemoteProtocolError) and "disconnected" in str(exc).lower():
        return Disconnected(detail(exc))
    return ProtocolFailed(detail(exc))
