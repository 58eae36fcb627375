"""A small client for Python sandboxes: an async iterator of assignments, each a context manager.

    async with SidecarClient("unix:///run/work-sidecar/sidecar.sock", sandbox_id="sb-1") as sidecar:
        async for item in sidecar.assignments(max_in_flight=1):
            async with item:                       # KeepAlive while inside; StopWork on exit
                await do_the_work(item.work, item.credentials)
                if item.stop_requested.is_set(): ...   # finish up
                if item.lost.is_set(): ...             # stop at once: the item is not yours any more

On leaving the `async with`, the item is stopped with `force=True` (as the official workers do when their
work ends), unless its lease was lost (then it is not ours to stop) or it was stopped already. A stop that
fails for another reason raises the `grpc.aio.AioRpcError`.

Without a target, `SidecarClient()` connects to `WORK_SIDECAR_ADDR` (`WORK_SIDECAR_ADDRESS` is an alias), the
variable `work-sidecar exec` sets for its children and the Kubernetes manifests set for the sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from types import TracebackType
from typing import Any

import grpc

from ._address import ADDRESS_ENV, sidecar_address
from .work.v1 import work_service_pb2 as pb
from .work.v1 import work_service_pb2_grpc as pb_grpc

__all__ = ["Assignment", "SidecarClient"]


class Assignment:
    """One assigned item. `secret` and `credentials` are the item's credential: never log them."""

    def __init__(self, client: SidecarClient, message: pb.WorkAssigned) -> None:
        self._client = client
        self.work: pb.Work = message.work
        self.lease_token: str = message.lease_token
        self.secret: str = message.secret
        self.credentials: pb.SessionCredentials = message.session_credentials
        self.traceparent: str = message.traceparent
        self.lease: pb.Lease = message.lease
        self.stop_requested = asyncio.Event()
        self.lost = asyncio.Event()
        self.stopped = asyncio.Event()
        self.lost_reason: int = pb.LEASE_LOST_REASON_UNSPECIFIED
        self._keepalive: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"Assignment(work_id={self.work.id!r}, state={pb.LeaseState.Name(self.lease.state)})"

    @property
    def work_id(self) -> str:
        return self.work.id

    def _apply(self, lease: pb.Lease) -> None:
        self.lease = lease
        if lease.state == pb.LEASE_STATE_STOP_REQUESTED:
            self.stop_requested.set()
        elif lease.state == pb.LEASE_STATE_LOST:
            self.lost_reason = lease.lost_reason
            self.lost.set()
        elif lease.state == pb.LEASE_STATE_STOPPED:
            self.stopped.set()

    async def __aenter__(self) -> Assignment:
        self._keepalive = asyncio.ensure_future(self._keep_alive())
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._keepalive
        try:
            if not self.lost.is_set() and not self.stopped.is_set():
                await self.stop(force=True)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise  # the item was not stopped: the caller must know (it returns to the queue at its TTL)
            self.lost.set()  # lost between the last status and the stop: not ours to stop any more
        finally:
            self._client._items.pop(self.work.id, None)

    async def _keep_alive(self) -> None:
        interval = self._client.keepalive_interval

        async def pings() -> AsyncIterator[pb.KeepAliveRequest]:
            while True:
                yield pb.KeepAliveRequest(work_id=self.work.id, lease_token=self.lease_token)
                await asyncio.sleep(interval)

        call = self._client.stub.KeepAlive(pings(), metadata=self._client.metadata)
        async for response in call:
            self._apply(response.lease)
            if self.lost.is_set() or self.stopped.is_set():
                call.cancel()
                return

    async def stop(self, *, force: bool = True) -> pb.Work:
        response = await self._client.stub.StopWork(
            pb.StopWorkRequest(work_id=self.work.id, lease_token=self.lease_token, force=force),
            metadata=self._client.metadata,
        )
        if response.work.state == pb.WORK_STATE_STOPPED:
            self.stopped.set()
        return response.work

    async def get(self) -> pb.GetWorkResponse:
        return await self._client.stub.GetWork(
            pb.GetWorkRequest(work_id=self.work.id, lease_token=self.lease_token), metadata=self._client.metadata
        )

    async def update_metadata(self, set: Mapping[str, str] | None = None, remove: list[str] | None = None) -> pb.Work:
        response = await self._client.stub.UpdateWorkMetadata(
            pb.UpdateWorkMetadataRequest(
                work_id=self.work.id, lease_token=self.lease_token, set=dict(set or {}), remove=remove or []
            ),
            metadata=self._client.metadata,
        )
        return response.work


class SidecarClient:
    """A connection to a work-sidecar. `target` is unix:///path or host:port; None reads `WORK_SIDECAR_ADDR`."""

    def __init__(
        self,
        target: str | None = None,
        *,
        sandbox_id: str = "",
        auth_token: str | None = None,
        keepalive_interval: float = 5.0,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        if target is None and channel is None:
            target = sidecar_address()
            if target is None:
                raise ValueError(
                    f"no sidecar address: pass SidecarClient('unix:///path' or 'host:port') or set {ADDRESS_ENV}"
                )
        self.target = target or ""
        self.sandbox_id = sandbox_id
        self.keepalive_interval = keepalive_interval
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self._own_channel = channel is None
        self.channel = channel or grpc.aio.insecure_channel(
            self.target, options=[("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_permit_without_calls", 1)]
        )
        self.stub = pb_grpc.WorkServiceStub(self.channel)
        self.draining = asyncio.Event()
        self._items: dict[str, Assignment] = {}

    def __repr__(self) -> str:
        return f"SidecarClient(target={self.target!r}, sandbox_id={self.sandbox_id!r})"

    async def __aenter__(self) -> SidecarClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._own_channel:
            await self.channel.close()

    async def assignments(self, *, max_in_flight: int = 1, max_items: int = 0) -> AsyncGenerator[Assignment, None]:
        """Yield each assigned item; stop requests and lease losses are applied to their Assignment.
        `max_items` > 0: the sidecar gives this watch no more than that many items in all."""
        call = self.stub.WatchWork(
            pb.WatchWorkRequest(max_in_flight=max_in_flight, sandbox_id=self.sandbox_id, max_items=max_items),
            metadata=self.metadata,
        )
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "work_assigned":
                    item = Assignment(self, event.work_assigned)
                    self._items[item.work_id] = item
                    yield item
                elif kind == "stop_requested":
                    if found := self._items.get(event.stop_requested.work_id):
                        found.stop_requested.set()
                elif kind == "lease_lost":
                    if found := self._items.get(event.lease_lost.work_id):
                        found.lost_reason = event.lease_lost.reason
                        found.lost.set()
                elif kind == "draining":
                    self.draining.set()
        finally:
            call.cancel()

    async def queue_stats(self) -> pb.GetQueueStatsResponse:
        return await self.stub.GetQueueStats(pb.GetQueueStatsRequest(), metadata=self.metadata)
