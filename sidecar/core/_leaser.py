"""Keeps leases alive: heartbeat compare-and-swap on a schedule, self-fencing, liveness, release.

One scheduler task and a heap of due times serve every lease (10,000 leases are 10,000 heap entries,
not 10,000 sleeping tasks); at most `heartbeat_concurrency` heartbeats run at once.

- Each lease is renewed every clamp(ttl/2, 1 s, 30 s), echoing the previous `last_heartbeat` exactly;
  a request (with its retries) may take at most that interval.
- A failed renewal is retried until the TTL since the last successful heartbeat *was sent* runs out;
  then the sidecar declares the lease lost itself (self-fencing): someone else may hold the item now.
- 412/409 on a heartbeat, or `lease_extended: false`: the lease is lost, no stop is sent.
- `stopping`: the sandbox is told once (StopRequested); `stopped`: the lease is over.
- A lease lives while its sandbox does: its WatchWork stream is open, or KeepAlive pinged it within the
  liveness window. Otherwise it waits `reattach_grace` for a KeepAlive with its token, then is released:
  renewal stops, and one last heartbeat with a short TTL sends the item back to the queue sooner.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import time
from collections.abc import Coroutine
from typing import Any

from ..work.v1 import work_service_pb2 as pb
from ..workapi import ConflictError, LeaseLostError, NotFoundError, WorkApiClient, WorkApiError
from . import _telemetry as telemetry
from ._config import SidecarConfig
from ._dispatcher import Dispatcher
from ._lease import Lease, LeaseTable

log = logging.getLogger("sidecar.leaser")


def heartbeat_interval(ttl_seconds: float) -> float:
    return max(1.0, min(ttl_seconds / 2, 30.0))


class Leaser:
    def __init__(self, client: WorkApiClient, config: SidecarConfig, table: LeaseTable, dispatcher: Dispatcher):
        self._client = client
        self._config = config
        self._table = table
        self._dispatcher = dispatcher
        self._heap: list[tuple[float, int, Lease]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        # Never more heartbeats in flight than the HTTP pool has connections (minus the pollers'): the rest wait
        # here, in O(1), and not in httpcore's pool queue, which rescans every queued request against every
        # connection on each request and response (a backlog there grows its own cost until leases expire).
        self._limit = asyncio.Semaphore(
            max(1, min(config.heartbeat_concurrency, config.max_connections - config.max_pollers))
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._all_ended = asyncio.Event()
        self._all_ended.set()

    # -- lifecycle of a lease -----------------------------------------------------------------------

    def start(self, lease: Lease) -> None:
        """Take over a freshly claimed lease (its first heartbeat already succeeded)."""
        self._table.add(lease)
        self._all_ended.clear()
        self._schedule(lease, time.monotonic() + heartbeat_interval(lease.ttl_seconds))
        log.info(
            "lease started",
            extra={"work_id": lease.work_id, "sandbox_id": lease.sandbox_id, "ttl_seconds": lease.ttl_seconds},
        )

    def end(self, lease: Lease, state: int, reason: int = pb.LEASE_LOST_REASON_UNSPECIFIED, message: str = "") -> bool:
        """End a lease: stop renewing, tell the sandbox, free the slot. False if it had ended already."""
        if lease.ended:
            return False
        lease.state = state
        lease.lost_reason = reason
        lease.lost_message = message
        if lease.liveness_timer is not None:
            lease.liveness_timer.cancel()
            lease.liveness_timer = None
        self._table.remove(lease)
        lease.publish()
        watcher = lease.watcher
        if watcher is not None:
            if reason != pb.LEASE_LOST_REASON_UNSPECIFIED and reason not in (pb.LEASE_LOST_REASON_SANDBOX_GONE,):
                event = pb.LeaseLost(work_id=lease.work_id, reason=reason, message=message)  # type: ignore[arg-type]
                self._dispatcher.send(watcher, pb.WatchWorkResponse(lease_lost=event))
            self._dispatcher.release(watcher, lease.work_id)
            self._dispatcher.finish_watcher_if_idle(watcher)
        outcome = "stopped" if state == pb.LEASE_STATE_STOPPED else "lost"
        reason_name = telemetry.REASON_NAMES.get(reason, "unspecified")
        if state == pb.LEASE_STATE_LOST:
            telemetry.lease_losses.add(1, {"reason": reason_name})
        telemetry.items_completed.add(1, {"final_state": outcome, "reason": reason_name})
        telemetry.item_duration.record(time.monotonic() - lease.assigned_at, {"final_state": outcome})
        telemetry.end_work_span(lease, outcome)
        fields = {"work_id": lease.work_id, "state": outcome}
        if reason != pb.LEASE_LOST_REASON_UNSPECIFIED:
            fields.update(reason=reason_name, detail=message)
        log.log(logging.INFO if state == pb.LEASE_STATE_STOPPED else logging.WARNING, "lease ended", extra=fields)
        if len(self._table) == 0:
            self._all_ended.set()
        return True

    def lose(self, lease: Lease, reason: int, message: str) -> bool:
        return self.end(lease, pb.LEASE_STATE_LOST, reason, message)

    def stop_requested(self, lease: Lease) -> None:
        if lease.state != pb.LEASE_STATE_ACTIVE:
            return
        lease.state = pb.LEASE_STATE_STOP_REQUESTED
        lease.publish()
        if lease.watcher is not None and not lease.stop_notified:
            lease.stop_notified = True
            event = pb.StopRequested(work_id=lease.work_id)
            event.requested_at.GetCurrentTime()
            self._dispatcher.send(lease.watcher, pb.WatchWorkResponse(stop_requested=event))
        log.info("stop requested", extra={"work_id": lease.work_id})

    async def release(self, lease: Lease, reason: int, message: str) -> None:
        """Give a lease up on purpose: end it, then ask for a short TTL so the item requeues sooner."""
        last_heartbeat = lease.last_heartbeat
        if not self.lose(lease, reason, message):
            return
        ttl = self._config.release_ttl_seconds
        if not ttl:
            return
        try:
            with telemetry.use(None):
                await self._client.heartbeat(
                    lease.work_id, expected_last_heartbeat=last_heartbeat, desired_ttl_seconds=ttl, deadline=5.0
                )
        except WorkApiError as exc:
            log.info(
                "release heartbeat failed; the item returns at its TTL",
                extra={"work_id": lease.work_id, "error": str(exc)},
            )

    async def wait_all_ended(self) -> None:
        await self._all_ended.wait()

    # -- liveness -----------------------------------------------------------------------------------

    def ping(self, lease: Lease) -> None:
        lease.last_ping = time.monotonic()
        self.check_liveness(lease)

    def watcher_closed(self, work_ids: set[str]) -> None:
        for work_id in list(work_ids):
            lease = self._table.get(work_id)
            if lease is not None:
                self.check_liveness(lease)

    def _alive(self, lease: Lease, now: float) -> bool:
        if lease.watcher is not None and not lease.watcher.closed:
            return True
        return lease.last_ping is not None and now - lease.last_ping <= self._config.liveness_window

    def check_liveness(self, lease: Lease) -> None:
        if lease.ended:
            return
        if lease.liveness_timer is not None:
            lease.liveness_timer.cancel()
            lease.liveness_timer = None
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        if self._alive(lease, now):
            if lease.orphaned_since is not None:
                log.info("sandbox re-attached", extra={"work_id": lease.work_id})
            lease.orphaned_since = None
            if lease.watcher is None or lease.watcher.closed:
                assert lease.last_ping is not None
                due = lease.last_ping + self._config.liveness_window - now
                lease.liveness_timer = loop.call_later(max(due, 0) + 0.01, self.check_liveness, lease)
            return
        if lease.orphaned_since is None:
            lease.orphaned_since = now
            log.info(  # routine (a sandbox that closes its watch and keeps the lease with KeepAlive); a release warns
                "sandbox gone; waiting for it to re-attach",
                extra={"work_id": lease.work_id, "grace_seconds": self._config.reattach_grace},
            )
        remaining = lease.orphaned_since + self._config.reattach_grace - now
        if remaining > 0:
            lease.liveness_timer = loop.call_later(remaining + 0.01, self.check_liveness, lease)
            return
        self._spawn(
            self.release(
                lease, pb.LEASE_LOST_REASON_SANDBOX_GONE, "the sandbox did not re-attach within the grace period"
            )
        )

    # -- the heartbeat scheduler --------------------------------------------------------------------

    def _schedule(self, lease: Lease, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), lease))
        if self._heap[0][2] is lease:
            self._wake.set()

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                _, _, lease = heapq.heappop(self._heap)
                if not lease.ended:
                    self._spawn(self._renew(lease))
            self._wake.clear()
            timeout = self._heap[0][0] - now if self._heap else None
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _renew(self, lease: Lease) -> None:
        async with self._limit:
            if lease.ended:
                return
            now = time.monotonic()
            fence_at = lease.last_success + lease.ttl_seconds
            budget = min(heartbeat_interval(lease.ttl_seconds), fence_at - now)
            if budget <= 0:
                self._fence(lease)
                return
            sent = time.monotonic()
            try:
                with telemetry.use(lease.span):
                    async with asyncio.timeout(budget):
                        result = await self._client.heartbeat(
                            lease.work_id,
                            expected_last_heartbeat=lease.last_heartbeat,
                            desired_ttl_seconds=self._config.ttl_seconds,
                            deadline=budget,
                        )
            except (LeaseLostError, ConflictError) as exc:
                telemetry.heartbeats.add(1, {"result": "precondition_failed"})
                self.lose(lease, pb.LEASE_LOST_REASON_PRECONDITION_FAILED, _describe(exc))
                return
            except NotFoundError as exc:
                telemetry.heartbeats.add(1, {"result": "not_found"})
                self.lose(lease, pb.LEASE_LOST_REASON_NOT_FOUND, _describe(exc))
                return
            except (WorkApiError, TimeoutError) as exc:
                telemetry.heartbeats.add(1, {"result": _failure_kind(exc)})
                if lease.ended:
                    return
                if time.monotonic() >= fence_at:
                    self._fence(lease)
                    return
                retry_in = min(
                    random.uniform(0.2, 1.0) * min(2.0, heartbeat_interval(lease.ttl_seconds) / 2),
                    fence_at - time.monotonic(),
                )
                log.warning(
                    "heartbeat failed; retrying within the TTL",
                    extra={"work_id": lease.work_id, "error": _describe(exc), "retry_in": round(retry_in, 3)},
                )
                self._schedule(lease, time.monotonic() + max(retry_in, 0.0))
                return
            if lease.ended:
                return
            lease.renewed(result.last_heartbeat, result.ttl_seconds, sent)
            if lease.span is not None:
                lease.span.add_event("heartbeat", {"work.state": result.state, "lease.ttl_seconds": result.ttl_seconds})
            if result.state == "stopped":  # stopped by someone else (before lease_extended: it is false then)
                telemetry.heartbeats.add(1, {"result": "stopped"})
                self.end(lease, pb.LEASE_STATE_STOPPED, pb.LEASE_LOST_REASON_STOPPED, "the item was stopped")
                return
            if not result.lease_extended:
                telemetry.heartbeats.add(1, {"result": "not_extended"})
                self.lose(lease, pb.LEASE_LOST_REASON_NOT_EXTENDED, "the Work API did not extend the lease")
                return
            telemetry.heartbeats.add(1, {"result": "ok"})
            if result.state == "stopping":
                self.stop_requested(lease)
            self._schedule(lease, time.monotonic() + heartbeat_interval(lease.ttl_seconds))

    def _fence(self, lease: Lease) -> None:
        telemetry.heartbeats.add(1, {"result": "expired"})
        self.lose(
            lease,
            pb.LEASE_LOST_REASON_EXPIRED,
            f"no heartbeat succeeded for a whole TTL ({lease.ttl_seconds}s); someone else may hold the item",
        )


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _failure_kind(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"http_{status}"
    return "timeout" if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__ else "transport"
