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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # imported where used: a sidecar on the default backend never loads httpx (memory, start-up)
    import httpx

HTTP_BACKENDS = ("httptools", "aiohttp", "httpx")


MAX_HEAD_BYTES = 64 * 1024
"""The largest answer header block read (status line and headers): a larger one is refused, never read whole."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    reason: str
    headers: Mapping[str, str]
    """Case-insensitive (header names as sent by the server)."""
    body: bytes
    distrust: Callable[[], None] | None = None
    """Closes the connection the answer came on, if the exchange keeps it: called when the answer does not belong
    to its request (then the real answer, or more, may follow on that connection)."""


class ExchangeError(Exception):
    """No complete, trustworthy HTTP answer. `detail`: the failure's own words (never the URL, a header or a body).
    Each backend maps its own failures onto these kinds."""

    kind = "exchange"

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail or self.kind)
        self.detail = detail


class ConnectFailed(ExchangeError):
    """No connection (refused, unreachable, the connect timed out): the request was never sent."""

    kind = "connect"


class TLSFailed(ConnectFailed):
    """The TLS handshake failed; `detail` names the certificate problem."""

    kind = "tls"


class ExchangeTimeout(ExchangeError):
    """The whole answer did not come within the exchange's time: the request may have been applied."""

    kind = "timeout"


class Disconnected(ExchangeError):
    """The connection closed before the answer was complete."""

    kind = "disconnected"


class ProtocolFailed(ExchangeError):
    """Bytes that are not one well-formed HTTP/1.1 answer (two lengths, garbage, a switch of protocol, bytes
    after the answer)."""

    kind = "protocol"


class AnswerTooLarge(ExchangeError):
    """The answer's body is over `limit` bytes (`declared`: its declared length), or its header block is over
    `MAX_HEAD_BYTES` (`head`): not read."""

    kind = "too_large"

    def __init__(self, limit: int, declared: int | None, *, head: bool = False) -> None:
        part = "header block" if head else "answer"
        super().__init__(f"the {part} is larger than {limit} bytes")
        self.limit = limit
        self.declared = declared
        self.head = head


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
        an `ExchangeError` of the kind that failed (`ExchangeTimeout` past `timeout`)."""
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
        try:
            async with asyncio.timeout(timeout):
                return await self._send(method, url, headers, body, max_bytes)
        except TimeoutError:
            raise ExchangeTimeout(f"no complete answer within {timeout:.1f}s") from None

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
            raise _aiohttp_error(aiohttp, exc) from None
        except OSError as exc:
            raise Disconnected(_detail(exc)) from None
        try:
            if _head_size(response.raw_headers) > MAX_HEAD_BYTES:
                raise AnswerTooLarge(MAX_HEAD_BYTES, None, head=True)
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
            raise _aiohttp_error(aiohttp, exc) from None
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
            raise _httpx_error(httpx, exc) from None
        try:
            if _head_size(response.headers.raw) > MAX_HEAD_BYTES:  # h11 itself stops reading at 100 KiB
                raise AnswerTooLarge(MAX_HEAD_BYTES, None, head=True)
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
            raise _httpx_error(httpx, exc) from None
        finally:
            await response.aclose()
        return Answer(response.status_code, response.reason_phrase, response.headers, b"".join(pieces))

    async def aclose(self) -> None:
        await self._client.aclose()


def _ssl_context(environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """The TLS context httpx's `create_ssl_context()` makes (without loading httpx): the CAs of SSL_CERT_FILE, else
    of SSL_CERT_DIR, else certifi's."""
    environ = os.environ if environ is None else environ
    try:
        if environ.get("SSL_CERT_FILE"):
            return ssl.create_default_context(cafile=environ["SSL_CERT_FILE"])
        if environ.get("SSL_CERT_DIR"):
            return ssl.create_default_context(capath=environ["SSL_CERT_DIR"])
    except (OSError, ssl.SSLError) as exc:
        name = "SSL_CERT_FILE" if environ.get("SSL_CERT_FILE") else "SSL_CERT_DIR"
        reason = getattr(exc, "strerror", None) or tls_detail(exc)
        raise TLSSettingsError(f"{name}={environ[name]} cannot be used as the TLS trust store ({reason})") from None
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


class TLSSettingsError(ValueError):
    """SSL_CERT_FILE / SSL_CERT_DIR name no readable certificates: a start-up error, in one line."""


def _aiohttp_error(aiohttp: Any, exc: BaseException) -> ExchangeError:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return TLSFailed(tls_detail(exc.certificate_error))
    if isinstance(exc, aiohttp.ClientConnectorSSLError):
        return TLSFailed(tls_detail(exc))
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectFailed(_detail(exc))
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return ConnectFailed(f"connect timed out: {_detail(exc)}")
    if isinstance(exc, TimeoutError):
        return ExchangeTimeout(_detail(exc))
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientOSError):
        return Disconnected(_detail(exc))
    return ProtocolFailed(_detail(exc))


def _httpx_error(httpx: Any, exc: BaseException) -> ExchangeError:
    if isinstance(exc, httpx.ConnectTimeout):
        return ConnectFailed(f"connect timed out: {_detail(exc)}")
    if isinstance(exc, httpx.ConnectError):
        cause = _ssl_cause(exc)
        return TLSFailed(tls_detail(cause)) if cause is not None else ConnectFailed(_detail(exc))
    if isinstance(exc, httpx.TimeoutException):
        return ExchangeTimeout(_detail(exc))
    if isinstance(exc, httpx.RemoteProtocolError) and "disconnected" in str(exc).lower():
        return Disconnected(_detail(exc))
    if isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.CloseError):
        return Disconnected(_detail(exc))
    return ProtocolFailed(_detail(exc))


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def tls_detail(exc: BaseException) -> str:
    """A TLS failure in words that name the certificate problem ("certificate verify failed: self-signed
    certificate"), never a bare "SSL error"."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message or exc.reason or 'unknown reason'}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")[:200]
    return _detail(exc)


def _head_size(raw: Any) -> int:
    return sum(len(name) + len(value) for name, value in raw)


def _detail(exc: BaseException) -> str:
    """The failure's own words, capped (an OS error: no URL or header in it)."""
    return str(exc)[:200]
