"""The HTTP connection layer under httpx: aiohttp (the default) or httpx's own.

httpx is the client API either way (requests, timeouts, errors); what differs is the transport that moves the
bytes. httpx's own (httpcore + h11, pure Python) costs about 1.6 ms of CPU per Work API request on this
project's benchmark machine; aiohttp's (C-accelerated parser), through `httpx-aiohttp` (the transport the
official Anthropic and OpenAI SDKs offer for the same reason), about 0.7 ms, with a third less latency
(`python -m bench.http_backends`). At 10,000 leases that is 0.33 instead of 0.68 of a core.
"""

from __future__ import annotations

import httpx

HTTP_BACKENDS = ("aiohttp", "httpx")


def make_transport(backend: str, limits: httpx.Limits) -> httpx.AsyncBaseTransport | None:
    """The transport for `backend`; None means httpx's own (the client then applies `limits` and the environment's
    proxies itself). Both honour HTTP(S)_PROXY / NO_PROXY and SSL_CERT_FILE / SSL_CERT_DIR, as httpx does."""
    if backend == "httpx":
        return None
    if backend != "aiohttp":
        raise ValueError(f"http backend must be one of {', '.join(HTTP_BACKENDS)}, not {backend!r}")
    import aiohttp
    from httpx_aiohttp import AiohttpTransport

    ssl_context = httpx.create_ssl_context()

    def session() -> aiohttp.ClientSession:  # made on first use, inside the running event loop
        connector = aiohttp.TCPConnector(
            limit=limits.max_connections or 0, keepalive_timeout=limits.keepalive_expiry, ssl=ssl_context
        )
        return aiohttp.ClientSession(connector=connector, trust_env=True)  # trust_env: HTTP(S)_PROXY, NO_PROXY

    return AiohttpTransport(limits=limits, client=session)


def describe_failure(exc: httpx.TransportError) -> tuple[bool, str]:
    """(was it a timeout, the failure's name) for a request that got no HTTP answer.

    httpx-aiohttp maps aiohttp's errors coarsely (a connection the server dropped arrives as ConnectTimeout),
    so its underlying aiohttp error decides where there is one.
    """
    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("aiohttp"):
        return isinstance(cause, TimeoutError), type(cause).__name__
    return isinstance(exc, httpx.TimeoutException), type(exc).__name__
