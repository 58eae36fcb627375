"""The emulator over real HTTP on loopback: one emulator per test, on the test's event loop."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from sidecar import wire
from sidecar.emulator import AdminClient, Emulator, EmulatorSettings

KEY = "sk-ant-oat01-emulator-tests"
MANAGEMENT_KEY = "sk-ant-api03-emulator-tests"
ENV = "env_011CZkZ9X2dpNyB7HsEFoRfW"
NO_HEARTBEAT = wire.NO_HEARTBEAT


@dataclass(frozen=True)
class Flavour:
    name: str
    prefix_template: str
    worker_header: str
    headers: dict[str, str] = field(default_factory=dict)

    def prefix(self, environment_id: str = ENV) -> str:
        return self.prefix_template.format(env=environment_id)

    def __str__(self) -> str:
        return self.name


ANTHROPIC = Flavour(
    "anthropic",
    "/v1/environments/{env}/work",
    "anthropic-worker-id",
    {
        "authorization": f"Bearer {KEY}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "managed-agents-2026-04-01",
    },
)
QODER = Flavour("qoder", "/api/v1/cloud/environments/{env}/work", "worker-id", {"authorization": f"Bearer {KEY}"})
FLAVOURS = [ANTHROPIC, QODER]


@pytest.fixture(params=FLAVOURS, ids=str)
def flavour(request: pytest.FixtureRequest) -> Flavour:
    flavour: Flavour = request.param
    return flavour


@dataclass
class Api:
    """The emulator seen from a test: the Work API and the admin API over HTTP, and the in-process object."""

    emulator: Emulator
    url: str
    http: httpx.AsyncClient
    admin: AdminClient

    async def call(
        self,
        flavour: Flavour,
        method: str,
        suffix: str = "",
        *,
        environment_id: str = ENV,
        worker: str | None = None,
        headers: Mapping[str, str | None] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """A Work API call with the flavour's headers; `headers` adds to them (a None value removes one)."""
        sent: dict[str, str | None] = dict(flavour.headers)
        if worker is not None:
            sent[flavour.worker_header] = worker
        sent.update(headers or {})
        present = {k: v for k, v in sent.items() if v is not None}
        return await self.http.request(method, flavour.prefix(environment_id) + suffix, headers=present, **kwargs)

    async def enqueue(
        self, count: int = 1, data_type: str = "session", environment_id: str = ENV, **extra: Any
    ) -> list[dict[str, Any]]:
        return await self.admin.enqueue(environment_id, count, data_type, **extra)

    async def poll(self, flavour: Flavour, worker: str | None = None, **params: Any) -> httpx.Response:
        return await self.call(flavour, "GET", "/poll", worker=worker, params=params)

    async def polled(self, flavour: Flavour, worker: str | None = None, **params: Any) -> dict[str, Any]:
        response = await self.poll(flavour, worker, **params)
        assert response.status_code == 200, response.text
        work: dict[str, Any] | None = response.json()
        assert work is not None, "the poll found no item"
        return work

    async def ack(self, flavour: Flavour, work_id: str, worker: str | None = None) -> httpx.Response:
        return await self.call(flavour, "POST", f"/{work_id}/ack", worker=worker)

    async def heartbeat(
        self, flavour: Flavour, work_id: str, expected: str | None = None, ttl: int | str | None = None, **kw: Any
    ) -> httpx.Response:
        params: dict[str, Any] = {}
        if expected is not None:
            params["expected_last_heartbeat"] = expected
        if ttl is not None:
            params["desired_ttl_seconds"] = ttl
        return await self.call(flavour, "POST", f"/{work_id}/heartbeat", params=params, **kw)

    async def stop(self, flavour: Flavour, work_id: str, body: Any = None, **kw: Any) -> httpx.Response:
        if body is None:
            return await self.call(flavour, "POST", f"/{work_id}/stop", **kw)
        return await self.call(flavour, "POST", f"/{work_id}/stop", json=body, **kw)

    async def claim(
        self, flavour: Flavour, ttl: int | None = None, worker: str = "worker-1"
    ) -> tuple[dict[str, Any], str]:
        """Enqueue, poll, ack and heartbeat an item: (work object, last_heartbeat)."""
        await self.enqueue()
        work = await self.polled(flavour, worker)
        assert (await self.ack(flavour, work["id"], worker)).status_code == 200
        beat = await self.heartbeat(flavour, work["id"], NO_HEARTBEAT, ttl)
        assert beat.status_code == 200, beat.text
        return work, str(beat.json()["last_heartbeat"])

    async def view(self, work_id: str, environment_id: str = ENV) -> dict[str, Any]:
        return await self.admin.get_item(environment_id, work_id)

    async def requests(self, operation: str | None = None) -> list[dict[str, Any]]:
        return await self.admin.requests(operation)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    emulator = Emulator(EmulatorSettings(key=KEY, min_ttl_seconds=1))
    async with emulator.serve() as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield Api(emulator, url, http, AdminClient(url, http=http))


def decode_secret(secret: str) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    return decoded


WORK_FIELDS = set(wire.WORK_FIELDS)
