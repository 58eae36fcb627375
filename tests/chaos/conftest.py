"""Fixtures for the chaos tests: everything black-box. The emulator and every sidecar are real processes
(`work-sidecar emulator`, `work-sidecar serve`); the fault proxy (`chaos.proxy`) is a real HTTP server in the
test's event loop between them; sandboxes are real gRPC clients (in the test, or `chaos.sandbox` processes)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from chaos.harness import Emulator, Processes, Sidecar
from chaos.proxy import Proxy
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here carries the `chaos` marker (`-m "not chaos"` leaves the whole package out)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.chaos)


@pytest.fixture
def procs() -> Any:
    processes = Processes()
    yield processes
    processes.kill_all()


@pytest.fixture
async def emulator(procs: Processes) -> AsyncIterator[Emulator]:
    emu = await Emulator.start(procs)
    yield emu
    await emu.close()


@pytest.fixture
async def proxy(emulator: Emulator) -> AsyncIterator[Proxy]:
    fault_proxy = Proxy(emulator.url)
    async with fault_proxy.serve():
        yield fault_proxy


@pytest.fixture
def sidecar(procs: Processes, proxy: Proxy) -> Callable[..., Any]:
    """`await sidecar(ttl=…, extra=[…])`: a `work-sidecar serve` behind the proxy, SERVING."""

    async def start(env: str = "env_chaos", **kwargs: Any) -> Sidecar:
        return await Sidecar.start(procs, proxy.url or "", env, **kwargs)

    return start


@dataclass
class Watcher:
    """A WatchWork stream read in the background; every event with the wall-clock time it arrived."""

    target: str
    request: pb.WatchWorkRequest
    events: list[tuple[float, str, Any]] = field(default_factory=list)
    ended: str | None = None

    async def __aenter__(self) -> Watcher:
        self.channel = grpc.aio.insecure_channel(self.target)
        self.stub = pb_grpc.WorkServiceStub(self.channel)
        self.call = self.stub.WatchWork(self.request)
        self.task = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for event in self.call:
                kind = event.WhichOneof("event")
                if kind is not None:
                    self.events.append((time.time(), kind, getattr(event, kind)))
            self.ended = "OK"
        except grpc.aio.AioRpcError as exc:
            self.ended = exc.code().name
        except asyncio.CancelledError:
            self.ended = "CANCELLED"

    def of(self, kind: str) -> list[tuple[float, Any]]:
        return [(t, e) for t, k, e in self.events if k == kind]

    def assigned(self) -> pb.WorkAssigned | None:
        found = self.of("work_assigned")
        return found[0][1] if found else None

    def lost_at(self, work_id: str) -> float | None:
        for at, event in self.of("lease_lost"):
            if event.work_id == work_id:
                return at
        return None

    def close(self) -> None:
        self.call.cancel()

    async def __aexit__(self, *exc: object) -> None:
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.channel.close()


def watcher(target: str, max_in_flight: int = 1, sandbox_id: str = "test", **kwargs: Any) -> Watcher:
    return Watcher(target, pb.WatchWorkRequest(max_in_flight=max_in_flight, sandbox_id=sandbox_id, **kwargs))
