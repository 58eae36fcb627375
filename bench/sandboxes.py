"""The sidecar side: sandboxes written only with the generated gRPC stubs, many WatchWork streams per process.

A `Fleet` opens `streams` WatchWork streams with `max_in_flight` each over a few grpc.aio channels. On
`WorkAssigned` it notes the time and, unless it holds items for good (`hold=None`), calls
`StopWork(force=true)` after `hold` seconds (0: at once), as a sandbox does when its work is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import grpc

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc

from ._record import Recorder, started

STREAMS_PER_CHANNEL = 25


class Fleet(Recorder):
    def __init__(self, target: str, streams: int, max_in_flight: int = 1, hold: float | None = 0.0) -> None:
        super().__init__()
        self.target = target
        self.streams = streams
        self.max_in_flight = max_in_flight
        self.hold = hold
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Open every stream and return once the sidecar counts them all as watchers."""
        count = max(1, -(-self.streams // STREAMS_PER_CHANNEL))
        self._channels = [
            grpc.aio.insecure_channel(self.target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(count)
        ]
        stubs = [pb_grpc.WorkServiceStub(channel) for channel in self._channels]
        for index in range(self.streams):
            self._spawn(self._watch(stubs[index % count], index))
        deadline = time.monotonic() + 30
        while (watchers := await self.watchers(stubs[0])) < self.streams:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {watchers} of {self.streams} WatchWork streams were registered")
            await asyncio.sleep(0.02)

    @staticmethod
    async def watchers(stub: pb_grpc.WorkServiceAsyncStub) -> int:
        stats = await stub.GetQueueStats(pb.GetQueueStatsRequest())
        return int(stats.sidecar.watchers)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, stub: pb_grpc.WorkServiceAsyncStub, index: int) -> None:
        call = stub.WatchWork(pb.WatchWorkRequest(max_in_flight=self.max_in_flight, sandbox_id=f"bench-{index}"))
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "work_assigned":
                    item = event.work_assigned
                    self.note_assigned(item.work.id)
                    if self.hold is not None:
                        self._spawn(self._finish(stub, item.work.id, item.lease_token))
                elif kind == "lease_lost":
                    self.note_lost(event.lease_lost.work_id)

    async def _finish(self, stub: pb_grpc.WorkServiceAsyncStub, work_id: str, token: str) -> None:
        if self.hold:
            await asyncio.sleep(self.hold)
        try:
            await stub.StopWork(pb.StopWorkRequest(work_id=work_id, lease_token=token, force=True))
        except grpc.aio.AioRpcError:
            self.stop_errors += 1
        self.note_stopped(work_id)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close()


def fleet(
    target: str, streams: int, max_in_flight: int = 1, hold: float | None = 0.0
) -> contextlib.AbstractAsyncContextManager[Fleet]:
    return started(Fleet(target, streams, max_in_flight, hold))
