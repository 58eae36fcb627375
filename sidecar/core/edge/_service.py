"""The sidecar.work.v1.WorkService servicer: thin RPC handlers over the core components."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from ...work.v1 import work_service_pb2 as pb
from ...work.v1 import work_service_pb2_grpc as pb_grpc
from ...workapi import (
    Work,
    WorkApiClient,
    WorkApiError,
)
from .. import _telemetry as telemetry
from ..engine._dispatcher import Dispatcher, Watcher
from ..engine._handover import HandOver
from ..engine._lease import Lease, Leases
from ..engine._liveness import Liveness
from ..engine._policy import LeasePolicy
from ..engine._stops import Stops
from ._convert import fill_work, queue_stats_message
from ._limits import (
    MAX_TOKEN,
    Malformed,
    check_metadata,
    check_page_token,
    check_sandbox_id,
    check_work_id,
)
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
            if isinstance(request, Malformed):
                raise request.rejection()
            return await fn(self, request, context)
        except SidecarRpcError as exc:
            await abort(context, exc.status)
        except WorkApiError as exc:
            await abort(context, from_work_api(exc))
        except ValueError as exc:
            await abort(context, build_status(grpc.StatusCode.INVALID_ARGUMENT, str(exc), "INVALID_ARGUMENT"))

    return wrapper


UNREAD_LIMIT = 1000
"""KeepAlive answers a client may leave unread before its stream is cut (RESOURCE_EXHAUSTED)."""


class _Feed:
    """The outbound side of one KeepAlive stream: the latest status per item, then an end (None or an error)."""

    def __init__(self) -> None:
        self._latest: dict[str, pb.KeepAliveResponse] = {}
        self._end: SidecarRpcError | None = None
        self._ended = False
        self._wake = asyncio.Event()
        self.unread = 0

    def put_nowait(self, response: pb.KeepAliveResponse) -> None:
        self._latest.pop(response.lease.work_id, None)  # an item's newest status goes last
        self._latest[response.lease.work_id] = response
        self._wake.set()

    def finish(self, end: SidecarRpcError | None) -> None:
        if not self._ended:
            self._ended, self._end = True, end
            self._wake.set()

    async def take(self) -> list[pb.KeepAliveResponse] | SidecarRpcError | None:
        while not self._latest and not self._ended:
            self._wake.clear()
            await self._wake.wait()
        if self._latest:
            batch, self._latest = list(self._latest.values()), {}
            return batch
        return self._end


async def _cut_unread(context: Context, feed: _Feed) -> None:
    """End a KeepAlive stream whose client pings but does not read: RESOURCE_EXHAUSTED."""
    status = error(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{UNREAD_LIMIT} KeepAlive answers were not read: read the stream's answers",
        "KEEPALIVE_NOT_READ",
    ).status
    feed.finish(None)
    with contextlib.suppress(Exception):
        await context.abort(status.code, status.details, status.trailing_metadata)


class WorkService(pb_grpc.WorkServiceServicer):
    def __init__(
        self,
        *,
        client: WorkApiClient,
        leases: Leases,
        dispatcher: Dispatcher,
        handover: HandOver,
        liveness: Liveness,
        stops: Stops,
        policy: LeasePolicy,
    ) -> None:
        self._client = client
        self._policy = policy
        self._leases = leases
        self._dispatcher = dispatcher
        self._handover = handover
        self._liveness = liveness
        self._stops = stops

    # -- helpers -------------------------------------------------------------------------------------

    def _authorize(self, work_id: str, lease_token: str) -> Lease:
        check_work_id(work_id)
        lease = self._leases.authorize(work_id, lease_token) if len(lease_token) <= MAX_TOKEN else None
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
        reason = telemetry.reason_name(lease.lost_reason)
        return error(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"the lease on {lease.work_id} was lost ({reason}); the item is no longer yours",
            "LEASE_LOST",
            {"work_id": lease.work_id, "lost_reason": reason},
        )

    # -- WatchWork ----------------------------------------------------------------------------------

    async def WatchWork(
        self, request: pb.WatchWorkRequest | Malformed, context: Context
    ) -> AsyncIterator[pb.WatchWorkResponse]:
        if isinstance(request, Malformed):
            await abort(context, request.rejection().status)
        try:
            check_sandbox_id(request.sandbox_id)
        except SidecarRpcError as exc:
            await abort(context, exc.status)
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
        if len(request.resume) > MAX_IN_FLIGHT:
            await abort(
                context,
                build_status(
                    grpc.StatusCode.INVALID_ARGUMENT, f"resume at most {MAX_IN_FLIGHT} leases", "INVALID_ARGUMENT"
                ),
            )
        sandbox_id = request.sandbox_id or context.peer() or "sandbox"
        watcher = self._dispatcher.add_watcher(sandbox_id, request.max_in_flight or 1, request.max_items)
        log.info(
            "watcher connected",
            extra={
                "sandbox_id": sandbox_id,
                "max_in_flight": watcher.max_in_flight,
                "max_items": request.max_items,
                "resumed": len(request.resume),
            },
        )
        for held in request.resume:
            self._resume(watcher, held)
        try:
            while True:
                message = await watcher.queue.get()
                if message is None:
                    return
                yield message
        finally:
            unsent = self._dispatcher.close_watcher(watcher)
            for assignment in unsent:
                self._handover.reassign(assignment)
            self._liveness.watcher_closed(watcher.held)
            log.info("watcher disconnected", extra={"sandbox_id": sandbox_id, "leases": len(watcher.held)})

    def _resume(self, watcher: Watcher, held: pb.HeldLease) -> None:
        """Re-attach a lease the sandbox holds to its new stream, and repeat what it may have missed."""
        lease = self._leases.authorize(held.work_id, held.lease_token) if held.work_id else None
        if lease is None:
            lost = pb.LeaseLost(
                work_id=held.work_id,
                reason=pb.LEASE_LOST_REASON_UNKNOWN,
                message="this sidecar does not know the lease (not issued here, or issued before a restart "
                "without --state-dir); nobody renews it",
            )
            self._dispatcher.send(watcher, pb.WatchWorkResponse(lease_lost=lost))
            return
        if lease.ended:
            if lease.state == pb.LEASE_STATE_LOST:
                lost = pb.LeaseLost(work_id=lease.work_id, reason=lease.lost_reason, message=lease.lost_message)  # type: ignore[arg-type]
                self._dispatcher.send(watcher, pb.WatchWorkResponse(lease_lost=lost))
            return
        if lease.watcher is not None and lease.watcher is not watcher:
            self._dispatcher.release(lease.watcher, lease.work_id)
        self._leases.assign(lease, watcher)
        self._dispatcher.attach(watcher, lease.work_id)
        self._liveness.check(lease)
        if lease.state == pb.LEASE_STATE_STOP_REQUESTED:
            event = pb.StopRequested(work_id=lease.work_id)
            event.requested_at.GetCurrentTime()
            self._dispatcher.send(watcher, pb.WatchWorkResponse(stop_requested=event))

    # -- KeepAlive ----------------------------------------------------------------------------------

    async def KeepAlive(
        self, request_iterator: AsyncIterator[pb.KeepAliveRequest | Malformed], context: Context
    ) -> AsyncIterator[pb.KeepAliveResponse]:
        """Answers each ping with its lease's status and pushes every later change. Answers are coalesced (the
        latest status per item), so a stream's memory is bounded by the items it follows; a client that keeps
        pinging but does not read is cut with RESOURCE_EXHAUSTED after `UNREAD_LIMIT` unread answers."""
        feed = _Feed()
        followed: dict[str, Lease] = {}
        reader = asyncio.ensure_future(self._read_pings(request_iterator, context, feed, followed))
        try:
            while True:
                batch = await feed.take()
                if isinstance(batch, SidecarRpcError):
                    await abort(context, batch.status)
                if batch is None:
                    return
                for response in batch:
                    yield response
                feed.unread = 0
        finally:
            reader.cancel()
            for lease in followed.values():
                self._leases.unsubscribe(lease, feed)

    async def _read_pings(
        self,
        request_iterator: AsyncIterator[pb.KeepAliveRequest | Malformed],
        context: Context,
        feed: _Feed,
        followed: dict[str, Lease],
    ) -> None:
        """KeepAlive's reader: answers every ping into `feed` until the client stops sending, or ends the stream."""
        try:
            async for ping in request_iterator:
                if not self._answer_ping(ping, feed, followed):
                    await _cut_unread(context, feed)
                    return
            feed.finish(None)
        except SidecarRpcError as exc:
            feed.finish(exc)
        except Exception as exc:  # not a bad ping (those are SidecarRpcError): say what it was, end the stream
            log.warning("KeepAlive reader failed", extra={"error": type(exc).__name__}, exc_info=True)
            feed.finish(error(grpc.StatusCode.INTERNAL, "the KeepAlive stream failed", "INTERNAL"))

    def _answer_ping(self, ping: pb.KeepAliveRequest | Malformed, feed: _Feed, followed: dict[str, Lease]) -> bool:
        """Count the ping as the sandbox's sign of life, follow its lease, queue its status. False when the client
        has left more than `UNREAD_LIMIT` answers unread (the writer is stuck on a client that does not read)."""
        if isinstance(ping, Malformed):
            raise ping.rejection()
        lease = self._authorize(ping.work_id, ping.lease_token)
        self._liveness.ping(lease)
        if ping.work_id not in followed:
            followed[ping.work_id] = lease
            self._leases.subscribe(lease, feed)
        feed.put_nowait(pb.KeepAliveResponse(lease=lease.status()))
        feed.unread += 1
        return feed.unread <= UNREAD_LIMIT

    # -- unary calls --------------------------------------------------------------------------------

    @_unary
    async def StopWork(self, request: pb.StopWorkRequest, context: Context) -> pb.StopWorkResponse:
        lease = self._authorize(request.work_id, request.lease_token)
        if lease.state == pb.LEASE_STATE_LOST:
            raise self._lost(lease)
        if lease.state == pb.LEASE_STATE_STOPPED:
            return _stop_response(lease.work)
        confirming = lease.state == pb.LEASE_STATE_STOP_REQUESTED
        force = request.force or (confirming and self._client.provider.confirm_stop_with_force)
        # What the stop asks for: `stopped`, or for a graceful stop the sandbox starts itself, `stopping` already.
        done = ("stopped",) if force or confirming else ("stopped", "stopping")
        work = await self._stops.stop(lease, force, done, context.time_remaining())
        if lease.state == pb.LEASE_STATE_LOST:  # lost while the stop was asked
            raise self._lost(lease)
        # A stop that ended the lease is logged once, by the lease's end ("lease ended", state stopped).
        log.log(
            logging.DEBUG if lease.ended else logging.INFO,
            "stop",
            extra={"work_id": lease.work_id, "force": force, "state": work.state},
        )
        return _stop_response(work)

    @_unary
    async def GetWork(self, request: pb.GetWorkRequest, context: Context) -> pb.GetWorkResponse:
        lease = self._authorize(request.work_id, request.lease_token)
        with telemetry.use(lease.span):
            work = await self._client.get(lease.work_id)
        response = pb.GetWorkResponse()
        fill_work(response.work, work)
        lease.fill_status(response.lease)
        return response

    @_unary
    async def ListWork(self, request: pb.ListWorkRequest, context: Context) -> pb.ListWorkResponse:
        limit = request.page_size or None
        if limit is not None and limit > self._client.provider.list_max_limit:
            raise error(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size must be at most {self._client.provider.list_max_limit}",
                "INVALID_ARGUMENT",
            )
        check_page_token(request.page_token)
        page = await self._client.list_page(limit=limit, cursor=request.page_token or None)
        response = pb.ListWorkResponse(next_page_token=page.next_cursor or "")
        for work in page.data:
            fill_work(response.work.add(), work)
        return response

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
        check_metadata(dict(request.set), list(request.remove))
        patch: dict[str, str | None] = {**dict(request.set), **{key: None for key in request.remove}}
        with telemetry.use(lease.span):
            work = await self._client.update_metadata(lease.work_id, patch)
        response = pb.UpdateWorkMetadataResponse()
        fill_work(response.work, work)
        return response

    @_unary
    async def GetQueueStats(self, request: pb.GetQueueStatsRequest, context: Context) -> pb.GetQueueStatsResponse:
        stats = await self._client.stats()
        return queue_stats_message(stats, self.sidecar_stats())

    def sidecar_stats(self) -> pb.SidecarStats:
        return pb.SidecarStats(
            active_leases=len(self._leases),
            watchers=len(self._dispatcher.watchers),
            free_capacity=self._dispatcher.free_capacity(),
            draining=self._dispatcher.draining,
            environment_id=self._client.environment_id,
            provider=self._client.provider.name,
        )


def _stop_response(work: Work) -> pb.StopWorkResponse:
    response = pb.StopWorkResponse()
    fill_work(response.work, work)
    return response
