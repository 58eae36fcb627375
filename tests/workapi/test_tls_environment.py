"""Issue #13: TLS settings are resolved once at start and still honour SSL_CERT_FILE (both HTTP backends).

A real HTTPS server on loopback with a self-signed certificate: refused without SSL_CERT_FILE, trusted with it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.workapi import RetryPolicies, RetryPolicy, TLSError, TransportError, WorkApiClient

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


async def test_a_tls_failure_names_the_certificate_problem_and_is_not_retried(
    https_api: tuple[str, Path], http_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding 7.
    A TLS refusal said "did not answer within 5 s: check --api-url" (its retries ran out the start-up check's
    time) instead of naming the certificate problem."""
    url, _ = https_api
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    retries = RetryPolicies(default=RetryPolicy(max_attempts=5, initial_backoff=0.5, deadline=10.0), per_operation={})
    async with WorkApiClient(
        provider="anthropic", api_key="k", environment_id=ENV, base_url=url, retry=retries, http_backend=http_backend
    ) as client:
        with pytest.raises(TLSError) as caught:
            await client.stats()
    assert caught.value.attempts == 1, "a certificate problem does not pass: not retried"
    assert "certificate verify failed: self-signed certificate" in str(caught.value)
    assert not caught.value.outcome_unknown, "never sent"


def _serve(url: str, **environ: str) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.executable).parent / "work-sidecar"
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env.update({"WORK_SIDECAR_API_KEY": "k", **environ})
    return subprocess.run(
        [str(binary), "serve", "--api-url", url, "--environment-id", ENV, "--listen", "127.0.0.1:0"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, result.stderr
    return lines[0]


async def test_start_up_against_an_untrusted_certificate_is_one_line_naming_it(https_api: tuple[str, Path]) -> None:
    """Finding 7.
    A TLS refusal at start said "did not answer within 5 s: check --api-url" once its retries ran past the
    start-up check's time: a certificate problem is named at once, without retries."""
    url, _ = https_api
    result = await asyncio.to_thread(_serve, url)  # in a thread: the API answers on this test's event loop
    line = _one_line(result)
    assert "certificate verify failed: self-signed certificate" in line, line
    assert "retrying" not in result.stderr, "a certificate problem is not retried"


async def test_an_ssl_cert_file_that_does_not_exist_is_one_line_at_start(tmp_path: Path) -> None:
    """Finding 7.
    SSL_CERT_FILE naming a missing file was a traceback and exit 1 at start: now one line naming it, exit 2."""
    missing = tmp_path / "nowhere.pem"
    result = await asyncio.to_thread(_serve, "https://127.0.0.1:1", SSL_CERT_FILE=str(missing))
    line = _one_line(result)
    assert "SSL_CERT_FILE" in line and str(missing) in line
