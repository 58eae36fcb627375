"""Issue #13: TLS settings are resolved once at start and still honour SSL_CERT_FILE (both HTTP backends).

A real HTTPS server on loopback with a self-signed certificate: refused without SSL_CERT_FILE, trusted with it.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.workapi import RetryPolicies, RetryPolicy, TransportError, WorkApiClient

ENV = "env_tls"
ONCE = RetryPolicies(default=RetryPolicy(max_attempts=1, deadline=10.0), per_operation={})

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture
async def https_api(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def stats(_: web.Request) -> web.Response:
        body = {"type": "work_queue_stats", "depth": 3, "pending": 0, "oldest_queued_at": None, "workers_polling": 0}
        return web.Response(text=json.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_get(f"/v1/environments/{ENV}/work/stats", stats)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"https://127.0.0.1:{port}", cert
    await runner.cleanup()


async def test_ssl_cert_file_is_honoured(
    https_api: tuple[str, Path], http_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, cert = https_api
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    options: dict[str, Any] = {
        "provider": "anthropic",
        "api_key": "k",
        "environment_id": ENV,
        "base_url": url,
        "retry": ONCE,
    }
    async with WorkApiClient(**options, http_backend=http_backend) as untrusted:
        with pytest.raises(TransportError):
            await untrusted.stats()
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    async with WorkApiClient(**options, http_backend=http_backend) as trusted:
        assert (await trusted.stats()).depth == 3
