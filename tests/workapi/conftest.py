from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from sidecar.emulator import AdminClient, Emulator, EmulatorSettings
from sidecar.workapi import HTTP_BACKENDS, RetryPolicies, RetryPolicy, WorkApiClient

KEY = "sk-ant-oat01-test-environment-key"
MANAGEMENT_KEY = "sk-ant-api03-test-management-key"
ENV = "env_client_test"


@pytest.fixture(params=["anthropic", "qoder"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[Emulator, str, httpx.AsyncClient]]:
    emulator = Emulator(EmulatorSettings(key=KEY, min_ttl_seconds=1))
    async with emulator.serve() as url, httpx.AsyncClient(base_url=url) as admin:
        yield emulator, url, admin


ClientFactory = Callable[..., Awaitable[WorkApiClient]]

FAST = RetryPolicies(default=RetryPolicy(initial_backoff=0.05, max_backoff=0.2, deadline=5.0), per_operation={})


@pytest.fixture(params=HTTP_BACKENDS)
def http_backend(request: pytest.FixtureRequest) -> str:
    """Every client test runs over both transports: errors, retries and timeouts must not depend on the one used."""
    return str(request.param)


@pytest.fixture
async def make_client(
    emulator: tuple[Emulator, str, httpx.AsyncClient], http_backend: str
) -> AsyncIterator[ClientFactory]:
    _, url, _ = emulator
    clients: list[WorkApiClient] = []

    async def make(provider: str = "anthropic", **overrides: Any) -> WorkApiClient:
        options: dict[str, Any] = {
            "provider": provider,
            "api_key": KEY,
            "environment_id": ENV,
            "base_url": url,
            "retry": FAST,
            "http_backend": http_backend,
        }
        options.update(overrides)
        client = WorkApiClient(**options)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def admin_client(http: httpx.AsyncClient) -> AdminClient:
    """The package's admin client over the test's HTTP client to the emulator."""
    return AdminClient(str(http.base_url), http=http)


async def enqueue(admin: httpx.AsyncClient, count: int = 1, data_type: str = "session") -> list[dict[str, Any]]:
    return await admin_client(admin).enqueue(ENV, count, data_type)


async def fault(admin: httpx.AsyncClient, operation: str, **spec: Any) -> None:
    await admin_client(admin).inject_fault(operation, **spec)


async def requests(admin: httpx.AsyncClient, operation: str) -> list[dict[str, Any]]:
    return await admin_client(admin).requests(operation)
