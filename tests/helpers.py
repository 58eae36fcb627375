"""Shared test helpers: waiting on conditions with deadlines (never sleeping to synchronise)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench._procs import free_port  # one definition for tests, bench and chaos

T = TypeVar("T")


@overload
async def eventually(
    probe: Callable[[], Awaitable[T]], *, timeout: float = ..., interval: float = ..., message: str = ...
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T], *, timeout: float = ..., interval: float = ..., message: str = ...
) -> T: ...


async def eventually(
    probe: Callable[[], Awaitable[T]] | Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "condition not met",
) -> T:
    """Call `probe` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        result = probe()
        # mypy cannot tell an awaitable T from a T; iscoroutine does, at run time
        last = await result if asyncio.iscoroutine(result) else result  # type: ignore[assignment]
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} within {timeout}s (last: {last!r})")
        await asyncio.sleep(interval)


async def stays(
    probe: Callable[[], Awaitable[bool]] | Callable[[], bool], *, seconds: float, interval: float = 0.05
) -> None:
    """Assert that `probe` stays truthy for a whole observation window (to prove an absence)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = probe()
        ok = await result if asyncio.iscoroutine(result) else result
        assert ok, "condition stopped holding during the observation window"
        await asyncio.sleep(interval)


async def serving(target: str | grpc.aio.Channel, service: str = "") -> bool:
    """Whether gRPC health at `target` (an address or an open channel) answers SERVING; False on any RPC error.
    A probe for `eventually`."""
    if isinstance(target, str):
        async with grpc.aio.insecure_channel(target) as channel:
            return await serving(channel, service)
    try:
        request = health_pb2.HealthCheckRequest(service=service)
        answer = await health_pb2_grpc.HealthStub(target).Check(request, timeout=1)
    except grpc.aio.AioRpcError:
        return False
    return bool(answer.status == health_pb2.HealthCheckResponse.SERVING)


__all__ = ["eventually", "free_port", "serving", "stays"]
