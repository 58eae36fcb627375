from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from sidecar.emulator import Emulator, EmulatorSettings
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


async def enqueue(admin: httpx.AsyncClient, count: int = 1, data_type: str = "session") -> list[dict[str, Any]]:
    response = await admin.post(f"/_emulator/environments/{ENV}/work", json={"count": count, "data_type": data_type})
    response.raise_for_status()
    items: list[dict[str, Any]] = response.json()["data"]
    return items


async def fault(admin: httpx.AsyncClient, **spec: Any) -> None:
    (await admin.post("/_emulator/faults", json=spec)).raise_for_status()


async def requests(admin: httpx.AsyncClient, operation: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = (await admin.get("/_emulator/requests")).json()["data"]
    return [e for e in entries if e.get("operation") == operation]
