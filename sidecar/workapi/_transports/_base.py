"""The seam between the Work API client and an HTTP backend: the `Exchange` protocol, the `Answer`, the TLS
context, and the failures every backend maps its own errors onto.

The client builds each request itself (URL and headers prebuilt per operation) and hands an `Exchange` the method,
the URL, the headers and the body; the exchange gives back the status, the headers and a body of at most
`max_bytes`, all within `timeout` seconds, or raises one `ExchangeError`:

    ExchangeError
    ├── ConnectFailed       no connection (refused, unreachable, connect timed out, no free connection in time):
    │   └── TLSFailed       the request was never sent; TLS: the handshake failed, `detail` names the certificate
    ├── ExchangeTimeout     no complete answer in time: the request may have been applied
    ├── Disconnected        the connection closed before the answer was complete: likewise
    ├── ProtocolFailed      bytes that are not one well-formed HTTP/1.1 answer (two lengths, garbage, bytes after it)
    └── AnswerTooLarge      a body over `max_bytes`, or a header block over `MAX_HEAD_BYTES`: not read

No backend imports another; each imports this module only.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

MAX_HEAD_BYTES = 64 * 1024
"""The largest answer header block read (status line and headers): a larger one is refused, never read whole."""
KEEPALIVE_SECONDS = 30.0
"""An idle keep-alive connection is closed after this long."""


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
        """One request and its whole answer (at most `max_bytes` of body), all within `timeout` seconds: else an
        `ExchangeError` of the kind that failed (`ExchangeTimeout` past `timeout`)."""
        ...

    async def aclose(self) -> None: ...


class ExchangeError(Exception):
    """No complete, trustworthy HTTP answer. `detail`: the failure's own words (never the URL, a header or a body)."""

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


class TLSSettingsError(ValueError):
    """SSL_CERT_FILE / SSL_CERT_DIR name no readable certificates: a start-up error, in one line."""


def ssl_context(environ: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """The TLS context of every backend, as httpx's `create_ssl_context()` makes it (without loading httpx): the
    CAs of SSL_CERT_FILE, else of SSL_CERT_DIR, else certifi's. Read once, when an exchange is made."""
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


def tls_detail(exc: BaseException) -> str:
    """A TLS failure in words that name the certificate problem ("certificate verify failed: self-signed
    certificate"), never a bare "SSL error"."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message or exc.reason or 'unknown reason'}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc).lower().replace("_", " ")[:200]
    return detail(exc)


def ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error a library's connect error wraps (its cause or context), if any."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def take_turn(slots: asyncio.Semaphore, within: float) -> None:
    """Acquire one of `slots` within `within` seconds, or raise `ConnectFailed` (nothing was sent). A free slot is
    taken without a suspension or a timer: the common case costs no more than the acquire."""
    if not slots.locked():
        await slots.acquire()
        return
    try:
        async with asyncio.timeout(within):
            await slots.acquire()
    except TimeoutError:
        raise ConnectFailed("no free connection in time") from None


def detail(exc: BaseException) -> str:
    """The failure's own words, capped (an OS error: no URL or header in it)."""
    return str(exc)[:200]
