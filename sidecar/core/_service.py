"""The sidecar.work.v1.WorkService servicer: thin RPC handlers over the core components."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ..work.v1 import work_service_pb2 as pb
from ..work.v1 import work_service_pb2_grpc as pb_grpc
from ..workapi import ConflictError, NotFoundError, WorkApiClient, WorkApiError
from . import _telemetry as telemetry
from ._config import SidecarConfig
from ._convert import queue_stats_message, work_message
from ._dispatcher import Dispatcher
from ._lease import Lease, LeaseTable
from ._leaser import Leaser
from ._poller import Poller
from ._status import SidecarRpcError, abort, build_status, error, from_work_api

log = logging.getLogger("sidecar.service")

MAX_IN_FLIGHT = 10_000

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Context = grpc.aio.ServicerContext[Any, Any]


def _unary(
    fn: Callable[[WorkService, Req, Context], Awaitable[Resp]],
) -> Callable[[WorkService, Req, Context], Awaitable[Resp]]:
    """Map SidecarRpcError, Work API errors and bad arguments to statuses."""

    @functools.wraps(fn)
    async def wrapper(self: WorkService, request: Req, context: Context) -> Resp:
        try:
            return await fn(self, request, context)
        except SidecarRpcError as exc:
            await abort(context, exc.status)
        except WorkApiError as exc:
            await abort(context, from_work_api(exc))
        except ValueError as exc:
            await abort(context, build_status(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT"))

    return wrapper


class WorkService(pb_grpc.WorkServiceServicer):
    def __init__(
        self,
        *,
        config: SidecarConfig,
        client: WorkApiClient,
        table: LeaseTable,
        dispatcher: Dispatcher,
        leaser: Leaser,
        poller: Poller,
    ) -> None:
        self._config = config
        self._client = client
        self._table = table
        self._dispatcher = dispatcher
        self._leaser = leaser
        self._poller = poller

    # -- helpers -------------------------------------------------------------------------------------

    def _authorize(self, work_id: str, lease_token: str) -> Lease:
        if not work_id:
            raise error(grpc.StatusCode.INVALID_ARGUMENT, "work_id is required", "INVALID_ARGUMENT")
        lease = self._table.authorize(work_id, lease_token)
        if lease is None:
            raise error(
                grpc.StatusCode.PERMISSION_DENIED,
                f"the lease token does not match work item {work_id} (or it is not leased through this sidecar)",
                "LEASE_TOKEN_MISMATCH",
                {"work_id": work_id},
            )
        return lease

    @staticmethod
    def _lost(lease: Lease) -> SidecarRpcError:
        reason = telemetry.REASON_NAMES.get(lease.lost_reason, "unspecified")
        return error(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the lease on {lease.work_id} was lost ({reason}); the item is no longer yours",
            "LEASE_LOST",
            {"work_id": lease.work_id, "lost_reason": reason},
        )

    # -- WatchWork ----------------------------------------------------------------------------------

    async def WatchWork(self, request: pb.WatchWorkRequest, context: Context) -> AsyncIterator[pb.WatchWorkResponse]:
        if self._dispatcher.draining:
            await abort(context, build_status(grpc.StatusCode.UNAVAILABLE, "the sidecar is draining", "DRAINING"))
        if request.max_in_flight > MAX_IN_FLIGHT:
            await abort(
                context,
                build_status(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"max_in_flight must be at most {MAX_IN_FLIGHT}",
                    "INVALID_ARGUMENT",
                ),
            )
        sandbox_id = request.sandbox_id or context.peer() or "sandbox"
        watcher = self._dispatcher.add_watcher(sandbox_id, request.max_in_flight or 1, request.max_items)
        log.info(
            "watcher connected",
            extra={"sandbox_id": sandbox_id, "max_in_flight": watcher.max_in_flight, "max_items": request.max_items},
        )
        try:
            while True:
                message = await watcher.queue.get()
                if message is None:
                    return
                yield message
        finally:
            unsent = self._dispatcher.close_watcher(watcher)
            for assignment in unsent:
                self._poller.reassign(assignment)
            self._leaser.watcher_closed(watcher.held)
            log.info("watcher disconnected", extra={"sandbox_id": sandbox_id, "leases": len(watcher.held)})

    # -- KeepAlive ----------------------------------------------------------------------------------

    async def KeepAlive(
        self, request_iterator: AsyncIterator[pb.KeepAliveRequest], context: Context
    ) -> AsyncIterator[pb.KeepAliveResponse]:
        outbound: asyncio.Queue[Any] = asyncio.Queue()
        followed: dict[str, Lease] = {}

        async def read() -> None:
            try:
                async for ping in request_iterator:
                    lease = self._authorize(ping.work_id, ping.lease_token)
                    if not lease.ended:
                        self._leaser.ping(lease)
                    if ping.work_id not in followed:
                        followed[ping.work_id] = lease
                        lease.subscribers.add(outbound)
                    outbound.put_nowait(pb.KeepAliveResponse(lease=lease.status()))
                outbound.put_nowait(None)
            except SidecarRpcError as exc:
                outbound.put_nowait(exc)
            except Exception:  # the client went away mid-stream: end ours too
                outbound.put_nowait(None)

        reader = asyncio.ensure_future(read())
        try:
            while True:
                item = await outbound.get()
                if item is None:
                    return
                if isinstance(item, SidecarRpcError):
                    await abort(context, item.status)
                yield item
        finally:
            reader.cancel()
            for lease in followed.values():
                lease.subscribers.discard(outbound)

    # -- unary calls --------------------------------------------------------------------------------

    @_unary
    async def StopWork(self, request: pb.StopWorkRequest, context: Context) -> pb.StopWorkResponse:
        lease = self._authorize(request.work_id, request.lease_token)
        if lease.state == pb.LEASE_STATE_LOST:
            raise self._lost(lease)
        if lease.state == pb.LEASE_STATE_STOPPED:
            return pb.StopWorkResponse(work=work_message(lease.work))
        confirming = lease.state == pb.LEASE_STATE_STOP_REQUESTED
        force = request.force or (confirming and self._client.provider.confirm_stop_with_force)
        try:
            with telemetry.use(lease.span):
                work = await self._client.stop(lease.work_id, force=force)
        except NotFoundError as exc:
            self._leaser.lose(lease, pb.LEASE_LOST_REASON_NOT_FOUND, str(exc))
            raise
        except ConflictError:
            with telemetry.use(lease.span):
                work = await self._client.get(lease.work_id)
            if work.state != "stopped":
                raise
        lease.work = work
        if work.state == "stopped":
            self._leaser.end(lease, pb.LEASE_STATE_STOPPED)
        elif work.state == "stopping":
            lease.stop_notified = True  # the sandbox asked for it; no StopRequested back to it
            self._leaser.stop_requested(lease)
        log.info("stop", extra={"work_id": lease.work_id, "force": force, "state": work.state})
        return pb.StopWorkResponse(work=work_message(work))

    @_unary
    async def GetWork(self, request: pb.GetWorkRequest, context: Context) -> pb.GetWorkResponse:
        lease = self._authorize(request.work_id, request.lease_token)
        with telemetry.use(lease.span):
            work = await self._client.get(lease.work_id)
        return pb.GetWorkResponse(work=work_message(work), lease=lease.status())

    @_unary
    async def ListWork(self, request: pb.ListWorkRequest, context: Context) -> pb.ListWorkResponse:
        limit = request.page_size or None
        if limit is not None and limit > self._client.provider.list_max_limit:
            raise error(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size must be at most {self._client.provider.list_max_limit}",
                "INVALID_ARGUMENT",
            )
        page = await self._client.list_page(limit=limit, cursor=request.page_token or None)
        return pb.ListWorkResponse(work=[work_message(w) for w in page.data], next_page_token=page.next_cursor or "")

    @_unary
    async def UpdateWorkMetadata(
        self, request: pb.UpdateWorkMetadataRequest, context: Context
    ) -> pb.UpdateWorkMetadataResponse:
        lease = self._authorize(request.work_id, request.lease_token)
        if lease.state == pb.LEASE_STATE_LOST:
            raise self._lost(lease)
        both = set(request.set) & set(request.remove)
        if both:
            raise error(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"keys both set and removed: {', '.join(sorted(both))}",
                "INVALID_ARGUMENT",
            )
        if not request.set and not request.remove:
            raise error(grpc.StatusCode.INVALID_ARGUMENT, "nothing to update: give set or remove", "INVALID_ARGUMENT")
        if any(not key for key in [*request.set, *request.remove]):
            raise error(grpc.StatusCode.INVALID_ARGUMENT, "metadata keys must not be empty", "INVALID_ARGUMENT")
        patch: dict[str, str | None] = {**dict(request.set), **{key: None for key in request.remove}}
        with telemetry.use(lease.span):
            work = await self._client.update_metadata(lease.work_id, patch)
        return pb.UpdateWorkMetadataResponse(work=work_message(work))

    @_unary
    async def GetQueueStats(self, request: pb.GetQueueStatsRequest, context: Context) -> pb.GetQueueStatsResponse:
        stats = await self._client.stats()
        return queue_stats_message(stats, self.sidecar_stats())

    def sidecar_stats(self) -> pb.SidecarStats:
        return pb.SidecarStats(
            active_leases=len(self._table),
            watchers=len(self._dispatcher.watchers),
            free_capacity=self._dispatcher.free_capacity(),
            draining=self._dispatcher.draining,
            environment_id=self._config.environment_id,
            provider=self._config.provider,
        )
