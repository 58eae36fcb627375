"""A real `Scaler` (gRPC server in the test's event loop) against the real emulator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from sidecar.emulator import Emulator, EmulatorSettings
from sidecar.keda import externalscaler_pb2 as pb
from sidecar.keda import externalscaler_pb2_grpc as pb_grpc
from sidecar.scaler import Scaler, ScalerConfig
from tests.core.conftest import ENV, KEY, Api

INTERVAL = 0.2


@dataclass
class RunningScaler:
    scaler: Scaler
    channel: grpc.aio.Channel
    stub: pb_grpc.ExternalScalerAsyncStub
    address: str

    @staticmethod
    def ref(name: str = "workers", namespace: str = "default", **metadata: str) -> pb.ScaledObjectRef:
        return pb.ScaledObjectRef(name=name, namespace=namespace, scalerMetadata=metadata)

    async def active(self, **metadata: str) -> bool:
        return bool((await self.stub.IsActive(self.ref(**metadata), timeout=5)).result)

    async def items(self, **metadata: str) -> float:
        answer = await self.stub.GetMetrics(
            pb.GetMetricsRequest(scaledObjectRef=self.ref(**metadata), metricName="work-items"), timeout=5
        )
        [value] = answer.metricValues
        assert value.metricValue == value.metricValueFloat, "both fields carry the same count"
        return value.metricValueFloat


ScalerFactory = Callable[..., Awaitable[RunningScaler]]


@pytest.fixture
async def strict_api() -> AsyncIterator[Api]:
    """The emulator as the real Work API behaves: an environment nobody created is 404 (here only ENV exists)."""
    emulator = Emulator(EmulatorSettings(key=KEY, min_ttl_seconds=1, auto_create_environments=False))
    async with emulator.serve() as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        api = Api(emulator=emulator, url=url, http=http)
        (await http.put(f"/_emulator/environments/{ENV}", json={})).raise_for_status()
        yield api


@pytest.fixture
async def start_scaler(api: Api) -> AsyncIterator[ScalerFactory]:
    started: list[RunningScaler] = []

    async def start(**overrides: Any) -> RunningScaler:
        options: dict[str, Any] = {
            "api_url": api.url,
            "api_key": KEY,
            "environment_id": ENV,
            "listen": ("127.0.0.1:0",),
            "stats_interval": INTERVAL,
            "max_backoff": 1.0,
            "max_age": 2.0,
            "worker_id": "scaler-under-test",
        }
        options.update(overrides)
        scaler = Scaler(ScalerConfig(**options))
        await scaler.start()
        channel = grpc.aio.insecure_channel(scaler.addresses[0])
        running = RunningScaler(scaler, channel, pb_grpc.ExternalScalerStub(channel), scaler.addresses[0])
        started.append(running)
        return running

    yield start
    for running in started:
        await running.channel.close()
        await running.scaler.close()
