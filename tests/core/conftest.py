"""Fixtures for end-to-end tests of the sidecar core: a real emulator over HTTP, a real gRPC server.

The sidecar runs in the test's event loop (a real grpc.aio server on a Unix socket and a TCP port);
tests that need a separate process (signals, crashes) start `work-sidecar serve` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import pytest

from sidecar.core import Sidecar, SidecarSettings
from sidecar.emulator import AdminClient, Emulator, EmulatorSettings
from sidecar.wire import get_provider
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc

KEY = "sk-test-environment-key-0123456789"
ENV = "env_test"


@dataclass
class Api:
    """The emulator seen from a test: its admin API and its in-process state."""

    emulator: Emulator
    url: str
    http: httpx.AsyncClient
    environment_id: str = ENV

    @property
    def admin(self) -> AdminClient:
        return AdminClient(self.url, http=self.http)

    async def enqueue(self, count: int = 1, data_type: str = "session") -> list[dict[str, Any]]:
        return await self.admin.enqueue(self.environment_id, count, data_type)

    async def requests(self, operation: str | None = None, work_id: str | None = None) -> list[dict[str, Any]]:
        entries = await self.admin.requests(operation)
        if work_id is not None:
            entries = [e for e in entries if work_id in e["path"]]
        return entries

    async def item(self, work_id: str) -> dict[str, Any]:
        return await self.admin.get_item(self.environment_id, work_id)

    async def state(self, work_id: str) -> str:
        return str((await self.item(work_id))["state"])

    async def fault(self, operation: str, **spec: Any) -> None:
        await self.admin.inject_fault(operation, **spec)

    async def clear_faults(self) -> None:
        await self.admin.clear_faults()

    async def steal(self, work_id: str) -> None:
        await self.admin.steal_lease(self.environment_id, work_id)

    async def platform_stop(self, work_id: str, *, force: bool = False, provider: str = "anthropic") -> None:
        """Stop an item the way the platform would (through the public Work API)."""
        profile = get_provider(provider)
        headers = {"authorization": f"Bearer {KEY}", **profile.extra_headers}
        path = profile.work_path(self.environment_id, f"/{work_id}/stop")
        response = await self.http.post(path, json={"force": force}, headers=headers)
        response.raise_for_status()


@dataclass
class Watch:
    """An open WatchWork stream whose events are collected by a background reader."""

    call: grpc.aio.UnaryStreamCall[pb.WatchWorkRequest, pb.WatchWorkResponse]
    events: asyncio.Queue[pb.WatchWorkResponse] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    error: grpc.aio.AioRpcError | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> Watch:
        async def read() -> None:
            try:
                async for event in self.call:
                    self.events.put_nowait(event)
            except grpc.aio.AioRpcError as exc:
                self.error = exc
            finally:
                self.ended.set()

        self.task = asyncio.ensure_future(read())
        return self

    async def next(self, kind: str | None = None, timeout: float = 10.0) -> pb.WatchWorkResponse:
        async with asyncio.timeout(timeout):
            while True:
                event = await self.events.get()
                if kind is None or event.WhichOneof("event") == kind:
                    return event

    async def assigned(self, timeout: float = 10.0) -> pb.WorkAssigned:
        return (await self.next("work_assigned", timeout)).work_assigned

    def cancel(self) -> None:
        self.call.cancel()


@dataclass
class Running:
    sidecar: Sidecar
    channel: grpc.aio.Channel
    stub: pb_grpc.WorkServiceAsyncStub
    address: str

    def watch(self, max_in_flight: int = 1, sandbox_id: str = "") -> Watch:
        call = self.stub.WatchWork(pb.WatchWorkRequest(max_in_flight=max_in_flight, sandbox_id=sandbox_id))
        return Watch(call).start()

    async def take_one(self, api: Api, max_in_flight: int = 1) -> tuple[Watch, pb.WorkAssigned]:
        """Open a watch, queue one item, and wait until it is assigned."""
        watch = self.watch(max_in_flight=max_in_flight)
        await api.enqueue(1)
        return watch, await watch.assigned()

    async def stop(self, item: pb.WorkAssigned, force: bool = True) -> pb.StopWorkResponse:
        return await self.stub.StopWork(
            pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=force)
        )


@pytest.fixture(params=["anthropic", "qoder"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    emulator = Emulator(EmulatorSettings(key=KEY, min_ttl_seconds=1))
    async with emulator.serve() as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        yield Api(emulator=emulator, url=url, http=http)


@pytest.fixture
def short_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="ws-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


SidecarFactory = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_sidecar(api: Api, short_dir: str) -> AsyncIterator[SidecarFactory]:
    started: list[Running] = []

    async def start(provider: str = "anthropic", *, use_tcp: bool = False, **overrides: Any) -> Running:
        options: dict[str, Any] = {
            "environment_id": api.environment_id,
            "api_key": KEY,
            "provider": provider,
            "api_url": api.url,
            "listen": (f"unix://{short_dir}/sidecar-{len(started)}.sock", "127.0.0.1:0"),
            "ttl_seconds": 2,
            "liveness_window": 2.0,
            "reattach_grace": 1.0,
            "release_ttl_seconds": 1,
            "drain_timeout": 5.0,
        }
        options.update(overrides)
        sidecar = Sidecar(SidecarSettings.of(**options))
        await sidecar.start()
        address = sidecar.addresses[1 if use_tcp else 0]
        channel = grpc.aio.insecure_channel(address)
        running = Running(sidecar, channel, pb_grpc.WorkServiceStub(channel), address)
        started.append(running)
        return running

    yield start
    for running in started:
        await running.channel.close()
        with contextlib.suppress(Exception):
            await running.sidecar.close()
