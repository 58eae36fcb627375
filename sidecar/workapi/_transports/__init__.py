"""Moving one request's bytes: two HTTP backends behind one seam (`_base`).

- `httptools` (`_lean.py`, the default): a lean HTTP/1.1 exchange on asyncio's transports with llhttp as parser;
- `httpx` (`_httpx.py`): httpx's own stack. It also carries the requests when HTTP(S)_PROXY (less NO_PROXY)
  applies to the Work API's URL, and any `transport=` an embedder passes.

`aiohttp` is a deprecated name for `httpx` (a warning at start says so). Each backend maps its own failures onto
`_base`'s exceptions and imports nothing but `_base`; `make_exchange` picks one, and imports it only then.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import getproxies_environment, proxy_bypass

from ._base import (
    KEEPALIVE_SECONDS,
    MAX_HEAD_BYTES,
    Answer,
    AnswerTooLarge,
    ConnectFailed,
    Disconnected,
    Exchange,
    ExchangeError,
    ExchangeTimeout,
    ProtocolFailed,
    TLSFailed,
    TLSSettingsError,
    ssl_context,
    take_turn,
    tls_detail,
)

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("sidecar.workapi")

HTTP_BACKENDS = ("httptools", "httpx")
DEPRECATED_BACKENDS = {"aiohttp": "httpx"}
"""Backend names still accepted, and the backend that carries their requests."""


def make_exchange(
    backend: str,
    *,
    base_url: str,
    max_connections: int,
    connect_timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Exchange:
    """The exchange for `backend`: httptools' lean one unless a proxy applies (or an embedder's `transport` is
    given), else httpx's."""
    if backend in DEPRECATED_BACKENDS:
        log.warning(
            "the %s HTTP backend is deprecated: %s carries the Work API requests", backend, DEPRECATED_BACKENDS[backend]
        )
        backend = DEPRECATED_BACKENDS[backend]
    if backend not in HTTP_BACKENDS:
        raise ValueError(f"http backend must be one of {', '.join(HTTP_BACKENDS)}, not {backend!r}")
    proxy = proxy_for(base_url)
    if backend == "httptools" and proxy is None and transport is None:
        from ._lean import LeanExchange

        return LeanExchange(base_url=base_url, max_connections=max_connections, connect_timeout=connect_timeout)
    from ._httpx import HttpxExchange

    return HttpxExchange(
        base_url=base_url,
        max_connections=max_connections,
        connect_timeout=connect_timeout,
        proxy=proxy,
        transport=transport,
    )


def proxy_for(base_url: str) -> str | None:
    """The proxy HTTP(S)_PROXY names for this URL, unless NO_PROXY bypasses it (read from the environment now)."""
    proxies = getproxies_environment()
    parts = urlsplit(base_url)
    proxy = proxies.get(parts.scheme)
    if not proxy or proxy_bypass(parts.hostname or ""):  # NO_PROXY (on POSIX: from the environment)
        return None
    return proxy


__all__ = [
    "DEPRECATED_BACKENDS",
    "HTTP_BACKENDS",
    "KEEPALIVE_SECONDS",
    "MAX_HEAD_BYTES",
    "Answer",
    "AnswerTooLarge",
    "ConnectFailed",
    "Disconnected",
    "Exchange",
    "ExchangeError",
    "ExchangeTimeout",
    "ProtocolFailed",
    "TLSFailed",
    "TLSSettingsError",
    "make_exchange",
    "proxy_for",
    "ssl_context",
    "take_turn",
    "tls_detail",
]
