"""When HTTP(S)_PROXY applies to the Work API's URL, httpx carries the requests through the proxy, whatever the
`--http-backend`: the lean exchange speaks to the origin only. A real forward proxy on loopback (absolute-form
requests, RFC 9112 3.2.2) relays to the real emulator and counts what it relayed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from sidecar.workapi import WorkApiClient
from sidecar.workapi._transports import make_exchange
from sidecar.workapi._transports._httpx import HttpxExchange

from .conftest import ENV, KEY
from .test_client import Emu


class ForwardProxy:
    """Relays each connection's requests to the origin its request line names (one origin per connection)."""

    def __init__(self) -> None:
        self.relayed: list[bytes] = []
        self.url = ""

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, version = head.split(b"\r\n", 1)[0].split(b" ")
            parts = urlsplit(target.decode())
            self.relayed.append(head.split(b"\r\n", 1)[0])
            up_reader, upstream = await asyncio.open_connection(parts.hostname, parts.port)
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            upstream.write(b"%s %s %s\r\n%s" % (method, path.encode(), version, head.split(b"\r\n", 1)[1]))

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()

            await asyncio.gather(pipe(reader, upstream), pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            if upstream is not None:
                upstream.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ForwardProxy]:
        server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server:
            yield self
        server.close()


@pytest.fixture
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def test_a_proxy_that_applies_carries_the_requests_over_httpx(
    emulator: Emu, http_backend: str, no_proxy_settings: pytest.MonkeyPatch
) -> None:
    _, url, _ = emulator
    async with ForwardProxy().running() as proxy:
        no_proxy_settings.setenv("HTTP_PROXY", proxy.url)
        async with WorkApiClient(
            provider="anthropic", api_key=KEY, environment_id=ENV, base_url=url, http_backend=http_backend
        ) as client:
            assert isinstance(client._exchange, HttpxExchange)
            assert (await client.stats()).depth == 0
        assert proxy.relayed and proxy.relayed[0].startswith(b"GET http://127.0.0.1:"), proxy.relayed


def test_aiohttp_is_a_deprecated_name_for_httpx(
    no_proxy_settings: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    exchange = make_exchange("aiohttp", base_url="http://api.example", max_connections=1, connect_timeout=1.0)
    assert isinstance(exchange, HttpxExchange)
    assert any("deprecated" in record.getMessage() for record in caplog.records)
    with pytest.raises(ValueError, match="httptools, httpx"):
        make_exchange("requests", base_url="http://api.example", max_connections=1, connect_timeout=1.0)
