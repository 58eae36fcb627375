"""Moving one request's bytes: the lean HTTP/1.1 exchange (the default), aiohttp, or httpx.

The client builds each request itself (URL and headers prebuilt per operation, issue #13) and hands an
`Exchange` the method, the URL, the headers and the body; the exchange gives back the status, the headers and a
body of at most `max_bytes` (issue #11: a larger answer is never read into memory, the connection is closed).

Why not httpx's stack, nor aiohttp's, by default (`python -m bench.http_backends [--layers]`, process CPU per
heartbeat against the emulator, 16 in flight; the first four on an Intel Xeon VM, the last two on the slower AMD
EPYC VM of the latest run):

    httpx.AsyncClient over httpx-aiohttp, trust_env (netrc and proxies per request, in the thread pool)  1.04 ms
    httpx.AsyncClient over httpx-aiohttp, without trust_env                                               0.47 ms
    httpx.Request handed to the httpx-aiohttp transport (no AsyncClient pipeline, no cookie jar)          0.28 ms
    aiohttp ClientSession with a prebuilt URL and headers                                                 0.13 ms
    the sidecar's client over aiohttp (`--http-backend aiohttp`), AMD EPYC                                0.30 ms
    the sidecar's client over the lean exchange (`_lean.py`, the default), AMD EPYC                       0.19 ms

httpx's request/response layer alone costs more than a whole aiohttp exchange, and aiohttp's machinery (URL
objects, the connector, a stream reader per answer) more than the rest of the client: the default exchange writes
prebuilt bytes on asyncio's own transport and feeds the answer to httptools (llhttp). It speaks to the Work API's
origin only, so when HTTP(S)_PROXY applies to the URL (less NO_PROXY) aiohttp carries the requests instead.
httpx stays available (`http_backend="httpx"`, or any `transport=` an embedder passes) behind the same interface
(imported only then: a sidecar on the default backend loads neither httpx nor aiohttp).

Environment settings are resolved once, at construction: HTTP(S)_PROXY / NO_PROXY (and the proxy's netrc
credentials) for the Work API's URL, and SSL_CERT_FILE / SSL_CERT_DIR for the TLS context. No cookie jar, no
compression (an answer must be JSON as sent), no redirects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # imported where used: a sidecar on the default backend never loads httpx (memory, start-up)
    import httpx

HTTP_BACKENDS = ("httptools", "aiohttp", "httpx")


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    reason: str
    headers: Mapping[str, str]
    """Case-insensitive (header names as sent by the server)."""
    body: bytes


class ExchangeFailed(Exception):
    """No HTTP answer: `name` is the failure's kind (never the URL, a header or a body)."""

    def __init__(self, name: str, detail: str = "") -> None:
        super().__init__(name)
        self.name = name
        self.detail = detail


class AnswerTooLarge(Exception):
    def __init__(self, limit: int, declared: int | None) -> None:
        super().__init__(f"the answer is larger than {limit} bytes")
        self.limit = limit
        self.declared = declared


class Exchange(Protocol):
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
        """One request and its whole answer (at most `max_bytes` of body), all within `timeout` seconds: else
        TimeoutError (or ExchangeFailed("Timeout") for a connect that timed out)."""
        ...

    async def aclose(self) -> None: ...


def make_exchange(
    backend: str,
    *,
    base_url: str,
    max_connections: int,
    connect_timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Exchange:
    if transport is not None or backend == "httpx":
        return HttpxExchange(max_connections=max_connections, connect_timeout=connect_timeout, transport=transport)
    if backend not in HTTP_BACKENDS:
        raise ValueError(f"http backend must be one of {', '.join(HTTP_BACKENDS)}, not {backend!r}")
    if backend == "httptools" and not proxy_applies(base_url):
        from ._lean import LeanExchange

        return LeanExchange(base_url=base_url, max_connections=max_connections, connect_timeout=connect_timeout)
    return AiohttpExchange(base_url=base_url, max_connections=max_connections, connect_timeout=connect_timeout)


def proxy_applies(base_url: str) -> bool:
    """Whether HTTP(S)_PROXY (less NO_PROXY) names a proxy for this URL: the lean exchange speaks to the origin
    only, so then aiohttp (which tunnels through the proxy) carries the requests."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies_environment, proxy_bypass

    proxies = getproxies_environment()
    parts = urlsplit(base_url)
    if parts.scheme not in proxies:
        return False
    return not proxy_bypass(parts.hostname or "")  # NO_PROXY (on POSIX: from the environment)


KEEPALIVE_SECONDS = 30.0


class _Timed:
    """An exchange whose `_send` has no deadline of its own: `send` bounds it with an asyncio.timeout."""

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
        async with asyncio.timeout(timeout):
            return await self._send(method, url, headers, body, max_bytes)

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, max_bytes: int
    ) -> Answer:
        raise NotImplementedError


class AiohttpExchange(_Timed):
    """One aiohttp session (made on first use, inside the running loop) with every environment setting resolved
    at construction."""

    def __init__(self, *, base_url: str, max_connections: int, connect_timeout: float) -> None:
        import aiohttp
        import yarl
        from aiohttp.helpers import get_env_proxy_for_url

        self._aiohttp = aiohttp
        self._url = yarl.URL
        self._max_connections = max_connections
        self._connect_timeout = connect_timeout
        self._ssl = _ssl_context() if base_url.startswith("https:") else None
        self._proxy: Any = None
        self._proxy_auth: Any = None
        # HTTP(S)_PROXY / NO_PROXY for this URL, and the proxy's netrc credentials: once, not per request.
        with contextlib.suppress(LookupError):
            self._proxy, self._proxy_auth = get_env_proxy_for_url(yarl.URL(base_url))
        self._session: Any = None

    def _make_session(self) -> Any:
        aiohttp = self._aiohttp
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=KEEPALIVE_SECONDS,
            ssl=self._ssl if self._ssl is not None else True,
        )
        return aiohttp.ClientSession(
            connector=connector,
            trust_env=False,  # resolved above, once
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            timeout=aiohttp.ClientTimeout(total=None, connect=self._connect_timeout),
        )

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, max_bytes: int
    ) -> Answer:
        session = self._session
        if session is None:
            session = self._session = self._make_session()
        aiohttp = self._aiohttp
        try:
            response = await session.request(
                method,
                self._url(url, encoded=True),
                headers=headers,
                data=body,
                proxy=self._proxy,
                proxy_auth=self._proxy_auth,
                allow_redirects=False,
            )
        except aiohttp.ClientError as exc:
            raise ExchangeFailed(_aiohttp_name(exc), _detail(exc)) from None
        except OSError as exc:
            raise ExchangeFailed(type(exc).__name__, _detail(exc)) from None
        try:
            declared = response.content_length
            if declared is not None and declared > max_bytes:
                raise AnswerTooLarge(max_bytes, declared)
            if declared is not None:
                data = await response.read()
            else:  # chunked or until close: read in pieces and stop past the cap
                pieces: list[bytes] = []
                size = 0
                content = response.content
                while chunk := await content.read(65536):
                    size += len(chunk)
                    if size > max_bytes:
                        raise AnswerTooLarge(max_bytes, None)
                    pieces.append(chunk)
                data = b"".join(pieces)
        except aiohttp.ClientError as exc:
            response.close()
            raise ExchangeFailed(_aiohttp_name(exc), _detail(exc)) from None
        except BaseException:
            response.close()  # not released to the pool: the rest of the body is never read
            raise
        response.release()
        return Answer(response.status, response.reason or "", response.headers, data)

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class HttpxExchange(_Timed):
    """httpx's own stack (or an embedder's transport): the same interface, for those who want httpx's."""

    def __init__(
        self, *, max_connections: int, connect_timeout: float, transport: httpx.AsyncBaseTransport | None
    ) -> None:
        import httpx

        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=min(max_connections, 16))
        self._client = httpx.AsyncClient(
            # Read/write/pool timeouts: the client's overall deadline per attempt bounds them all.
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=None, pool=None),
            limits=limits,
            transport=transport,
            follow_redirects=False,
        )

    async def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | None, max_bytes: int
    ) -> Answer:
        import httpx

        request = self._client.build_request(method, url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise ExchangeFailed(_httpx_name(exc), _detail(exc)) from None
        try:
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
            raise ExchangeFailed(_httpx_name(exc), _detail(exc)) from None
        finally:
            await response.aclose()
        return Answer(response.status_code, response.reason_phrase, response.headers, b"".join(pieces))

    async def aclose(self) -> None:
        await self._client.aclose()


def _ssl_context(environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """The TLS context httpx's `create_ssl_context()` makes (without loading httpx): the CAs of SSL_CERT_FILE, else
    of SSL_CERT_DIR, else certifi's."""
    environ = os.environ if environ is None else environ
    if environ.get("SSL_CERT_FILE"):
        return ssl.create_default_context(cafile=environ["SSL_CERT_FILE"])
    if environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context(capath=environ["SSL_CERT_DIR"])
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def _aiohttp_name(exc: BaseException) -> str:
    return "Timeout" if isinstance(exc, TimeoutError) else type(exc).__name__


def _httpx_name(exc: httpx.TransportError) -> str:
    import httpx

    return "Timeout" if isinstance(exc, httpx.TimeoutException) else type(exc).__name__


def _detail(exc: BaseException) -> str:
    """The failure's own words, capped (an OS error: no URL or header in it)."""
    return str(exc)[:200]
