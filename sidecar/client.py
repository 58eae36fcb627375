"""A small client for Python sandboxes: an async iterator of assignments, each a context manager.

    async with SidecarClient("unix:///tmp/work-sidecar.sock", sandbox_id="sb-1") as sidecar:
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

The sidecar may restart under a running item (a crash, a container update): while it cannot be reached, the
watch, the KeepAlive stream and the stop reconnect with backoff for up to `reconnect_timeout` seconds; the new
watch resumes the items still held (`WatchWorkRequest.resume`), so a sidecar restarted with its `--state-dir`
carries on with them. A sidecar that does not know an item any more (restarted without one) reports it lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

import grpc

from ._address import ADDRESS_ENV, CHANNEL_OPTIONS, sidecar_address
from ._fencing import fence_margin
from .work.v1 import work_service_pb2 as pb
from .work.v1 import work_service_pb2_grpc as pb_grpc

__all__ = ["Assignment", "SidecarClient"]

T = TypeVar("T")


def sidecar_unreachable(error: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE from the transport (the sidecar is down or restarting), not an answer of the sidecar's (those
    carry status details: a Work API outage, a drain)."""
    if error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    return not any(key == "grpc-status-details-bin" for key, _ in (error.trailing_metadata() or ()))


_STREAM_ENDED = grpc.aio.AioRpcError(
    grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details="the KeepAlive stream ended"
)


class _Reconnect:
    """Backoff with full jitter between attempts (0.1 s doubling to 2 s), giving up `timeout` seconds after
    the sidecar was last reachable."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._failures = 0
        self._since: float | None = None

    def reached(self) -> None:
        self._failures = 0
        self._since = None

    async def wait(self, error: grpc.aio.AioRpcError) -> None:
        """Sleep before the next attempt; re-raise `error` once the timeout has passed."""
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if self.timeout is not None and now - self._since >= self.timeout:
            raise error
        self._failures += 1
        ceiling = min(2.0, 0.1 * 2 ** (self._failures - 1))
        await asyncio.sleep(random.uniform(ceiling / 2, ceiling))


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
        self.disconnected = asyncio.Event()
        """Set at once while the sidecar cannot be reached (cleared when the lease is re-attached). The item is still
        yours until `lost` is set: at the latest a fencing margin before the lease's last known expiry."""
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
                await self.stop(force=True, deadline=self._client.stop_timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise  # the item was not stopped: the caller must know (it returns to the queue at its TTL)
            self.lost.set()  # lost between the last status and the stop: not ours to stop any more
        finally:
            self._client._items.pop(self.work.id, None)

    async def _keep_alive(self) -> None:
        interval = self._client.keepalive_interval
        reconnect = _Reconnect(self._client.reconnect_timeout)

        async def pings() -> AsyncIterator[pb.KeepAliveRequest]:
            while True:
                yield pb.KeepAliveRequest(work_id=self.work.id, lease_token=self.lease_token)
                await asyncio.sleep(interval)

        while True:  # the same token re-attaches the lease to a restarted sidecar
            call = self._client.stub.KeepAlive(pings(), metadata=self._client.metadata)
            error: grpc.aio.AioRpcError | None = None
            try:
                async for response in call:
                    reconnect.reached()
                    self.disconnected.clear()
                    self._apply(response.lease)
                    if self.lost.is_set() or self.stopped.is_set():
                        call.cancel()
                        return
            except grpc.aio.AioRpcError as failed:
                if failed.code() == grpc.StatusCode.PERMISSION_DENIED:  # a sidecar restarted without its state
                    self._lose(pb.LEASE_LOST_REASON_UNKNOWN)
                    return
                if failed.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED):
                    self._lose(pb.LEASE_LOST_REASON_UNKNOWN)  # a mistake of this client's: retrying cannot help
                    raise
                error = failed
            # The stream ended without a final status (the sidecar went away, restarts, or shed the stream): nobody
            # may be renewing the lease now. Past its last known expiry (less the fencing margin) the Work API may
            # give the item to someone else, so the sandbox must have stopped by then: until that, re-attach.
            self.disconnected.set()
            try:
                async with asyncio.timeout(max(self._fence_at() - time.time(), 0.0)):
                    await reconnect.wait(error or _STREAM_ENDED)
            except (TimeoutError, grpc.aio.AioRpcError):
                self._lose(pb.LEASE_LOST_REASON_EXPIRED)
                return

    def _fence_at(self) -> float:
        """Wall-clock second a fencing margin (the sidecar's rule, `sidecar._fencing`) before the lease's last known
        expiry."""
        if not self.lease.HasField("expires_at"):
            return time.time()
        return self.lease.expires_at.ToMicroseconds() / 1e6 - fence_margin(float(self.lease.ttl_seconds))

    def _lose(self, reason: int) -> None:
        if not self.lost.is_set():
            self.lost_reason = reason
            self.lost.set()

    async def stop(self, *, force: bool = True, deadline: float | None = None) -> pb.Work:
        """StopWork. `deadline`: seconds, each attempt's gRPC deadline (the sidecar sees it); a second before it,
        when the Work API has not confirmed the stop, the sidecar answers UNAVAILABLE (STOP_PENDING) and goes on
        asking."""
        response = await self._client.call(
            lambda: self._client.stub.StopWork(
                pb.StopWorkRequest(work_id=self.work.id, lease_token=self.lease_token, force=force),
                metadata=self._client.metadata,
                timeout=deadline,
            )
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
        reconnect_timeout: float | None = 60.0,
        stop_timeout: float | None = None,
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
        self.reconnect_timeout = reconnect_timeout
        """How long to keep reconnecting to an unreachable sidecar (None: for ever)."""
        self.stop_timeout = stop_timeout
        """The deadline of the stop on leaving an item (None: the sidecar's own, a minute); past it the stop
        raises UNAVAILABLE (reason STOP_PENDING) and the sidecar goes on asking the Work API."""
        self.metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self._own_channel = channel is None
        self.channel = channel or grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
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

    def _on_event(self, event: pb.WatchWorkResponse) -> None:
        """A watch event other than an assignment: applied to the item it names, or to the client."""
        kind = event.WhichOneof("event")
        if kind == "stop_requested":
            if found := self._items.get(event.stop_requested.work_id):
                found.stop_requested.set()
        elif kind == "lease_lost":
            if found := self._items.get(event.lease_lost.work_id):
                found._lose(event.lease_lost.reason)
        elif kind == "draining":
            self.draining.set()

    async def assignments(self, *, max_in_flight: int = 1, max_items: int = 0) -> AsyncGenerator[Assignment, None]:
        """Yield each assigned item; stop requests and lease losses are applied to their Assignment.
        `max_items` > 0: the sidecar gives this watch no more than that many items in all.
        When the sidecar cannot be reached, the watch reconnects and resumes the items still held."""
        reconnect = _Reconnect(self.reconnect_timeout)
        given = 0
        while True:
            resume = [pb.HeldLease(work_id=i.work_id, lease_token=i.lease_token) for i in self._items.values()]
            left = max_items - (given - len(resume)) if max_items else 0  # resumed ones count as given again
            if max_items and left <= 0:
                return  # all given and done
            call = self.stub.WatchWork(
                pb.WatchWorkRequest(
                    max_in_flight=max_in_flight, sandbox_id=self.sandbox_id, max_items=left, resume=resume
                ),
                metadata=self.metadata,
            )
            began = time.monotonic()
            try:
                async for event in call:
                    reconnect.reached()
                    if event.WhichOneof("event") == "work_assigned":
                        item = Assignment(self, event.work_assigned)
                        self._items[item.work_id] = item
                        given += 1
                        yield item
                    else:
                        self._on_event(event)
                return
            except grpc.aio.AioRpcError as error:
                if not sidecar_unreachable(error):
                    raise
                if time.monotonic() - began > 1.0:
                    reconnect.reached()  # it was connected: a new outage
                await reconnect.wait(error)
            finally:
                call.cancel()

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """A unary call, retried with backoff while the sidecar cannot be reached."""
        reconnect = _Reconnect(self.reconnect_timeout)
        while True:
            try:
                return await attempt()
            except grpc.aio.AioRpcError as error:
                if not sidecar_unreachable(error):
                    raise
                await reconnect.wait(error)

    async def queue_stats(self) -> pb.GetQueueStatsResponse:
        return await self.stub.GetQueueStats(pb.GetQueueStatsRequest(), metadata=self.metadata)
