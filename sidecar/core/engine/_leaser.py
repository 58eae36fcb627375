"""Keeps leases alive: heartbeat compare-and-swap on a schedule, self-fencing, release.

One scheduler task and a heap of due times serve every lease (10,000 leases are 10,000 heap entries,
not 10,000 sleeping tasks). Due leases queue for at most `concurrency` renewal workers, started as the queue
needs them (a worker per renewal would be a task, a guard and two callbacks for every heartbeat). A lease put
in the queue also gets a fencing entry in the heap: the scheduler fences it by the clock when its fencing point
passes, whether it still waits for a worker or its renewal is still in flight. The rules are `LeasePolicy`'s:

- each lease is renewed every `heartbeat_interval(ttl)`, echoing the previous `last_heartbeat` exactly; a
  request (with its retries) may take at most that interval;
- a failed renewal is retried after `retry_delay(ttl)` until `fence_margin(ttl)` before the TTL since the
  last successful heartbeat *was sent* runs out; then the sidecar declares the lease lost itself
  (self-fencing), so the sandbox hears LeaseLost before the Work API may hand the item to anyone else;
- 412/409 on a heartbeat, or `lease_extended: false`: the lease is lost, no stop is sent; but a refusal that
  follows a heartbeat whose outcome is unknown is settled by reading the lease (`_doubt`): the sandbox hears
  nothing when the read shows our own heartbeat landed;
- `stopping`: the lease turns STOP_REQUESTED; `stopped`: the lease is over;
- release: waits for a renewal in flight (and uses its answer), ends the lease, then sends one last heartbeat
  asking for a short TTL so the item requeues sooner;
- a renewal that fails in an unexpected way (a bug, an answer nobody foresaw) fences the lease: the sandbox
  hears LeaseLost (reason INTERNAL) and the lease is released. The scheduler itself is a supervised loop.

The leaser never changes a lease itself: it reports what the Work API answered to `Leases`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import time
from functools import partial

from ...work.v1 import work_service_pb2 as pb
from ...workapi import ConflictError, HeartbeatResult, LeaseLostError, NotFoundError, WorkApiClient, WorkApiError
from .. import _telemetry as telemetry
from ._doubt import settle
from ._lease import Lease, Leases
from ._policy import MIN_SEND_SECONDS, LeasePolicy
from ._supervisor import Supervisor

log = logging.getLogger("sidecar.leaser")


class Leaser:
    def __init__(
        self,
        client: WorkApiClient,
        policy: LeasePolicy,
        leases: Leases,
        *,
        concurrency: int,
        supervisor: Supervisor,
    ) -> None:
        self._client = client
        self._policy = policy
        self._leases = leases
        self._supervisor = supervisor
        # The renewals in flight; a lease maps to a future only once a release waits for its renewal.
        self._renewing: dict[Lease, asyncio.Future[None] | None] = {}
        self._releasing: set[asyncio.Task[None]] = set()
        # (when, sequence, lease, fencing entry?): a renewal due, or a fencing point to check.
        self._heap: list[tuple[float, int, Lease, bool]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        # Never more renewals in flight than the client's heartbeat lane has connections (the composition root gives
        # both the same number): the rest wait in this queue, in O(1), and not in the lane's.
        self._due: asyncio.Queue[Lease] = asyncio.Queue()
        self._max_workers = max(1, concurrency)
        self._workers = 0
        self._idle_workers = 0

    def track(self, lease: Lease, *, at_once: bool = False) -> None:
        """Start renewing a freshly claimed lease (its first heartbeat already succeeded); `at_once`: renew it
        now (an adopted lease, confirmed by its first renewal). The next renewal is due one interval after the
        last successful heartbeat was *sent*: the TTL counts from about then, not from when the answer came."""
        due = time.monotonic() if at_once else lease.last_success + self._policy.heartbeat_interval(lease.ttl_seconds)
        self._schedule(lease, due)

    async def release(self, lease: Lease, reason: int, message: str) -> None:
        """Give a lease up on purpose: end it, then ask for a short TTL so the item requeues sooner.

        A renewal in flight is waited for first: it may change the CAS value at the Work API, and a release
        sent with the old one would get 412 while the renewal extends the lease by a whole TTL for nobody."""
        if lease in self._renewing:
            waiter = self._renewing[lease]
            if waiter is None:
                waiter = self._renewing[lease] = asyncio.get_running_loop().create_future()
            await waiter
        last_heartbeat, doubtful, cas_read = lease.last_heartbeat, lease.doubtful_since is not None, lease.cas_read
        if not self._leases.lose(lease, reason, message):
            return
        ttl = self._policy.release_ttl_seconds
        if not ttl:
            return
        with telemetry.use(None):
            try:
                await self._release_heartbeat(lease.work_id, last_heartbeat, ttl)
            except (LeaseLostError, ConflictError) as exc:
                if not (doubtful or exc.maybe_applied):
                    _log_release_failed(lease.work_id, exc)
                    return
                # Our own heartbeat whose answer was lost may have moved the CAS value: read it, and release with it.
                settled = await settle(
                    self._client,
                    lease.work_id,
                    exc,
                    echoed=last_heartbeat,
                    echoed_exact=not cas_read,
                    deadline=self._policy.release_timeout,
                )
                if settled.result is None:
                    _log_release_failed(lease.work_id, exc)
                    return
                try:
                    await self._release_heartbeat(lease.work_id, settled.result.last_heartbeat, ttl)
                except WorkApiError as again:
                    _log_release_failed(lease.work_id, again)
            except WorkApiError as exc:
                _log_release_failed(lease.work_id, exc)

    async def _release_heartbeat(self, work_id: str, last_heartbeat: str, ttl: int) -> None:
        await self._client.heartbeat(
            work_id,
            expected_last_heartbeat=last_heartbeat,
            desired_ttl_seconds=ttl,
            deadline=self._policy.release_timeout,
        )

    def spawn_release(self, lease: Lease, reason: int, message: str) -> None:
        task = self._supervisor.spawn(self.release(lease, reason, message), name="release")
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def releases_sent(self) -> None:
        """Wait for the release heartbeats in flight (each bounded by `release_timeout`): a drain that ended
        every lease waits for them before the process exits, or the items would return only at their TTL."""
        if self._releasing:
            await asyncio.wait(list(self._releasing))

    def _crashed(self, lease: Lease, exc: BaseException) -> None:
        """A renewal failed unexpectedly: fence the lease (the sandbox hears LeaseLost), then release it."""
        self.spawn_release(
            lease, pb.LEASE_LOST_REASON_INTERNAL, f"the sidecar failed to renew the lease ({type(exc).__name__})"
        )

    # -- the heartbeat scheduler --------------------------------------------------------------------

    def _schedule(self, lease: Lease, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), lease, False))
        if self._heap[0][2] is lease:
            self._wake.set()

    def _fence_point(self, lease: Lease) -> float:
        return lease.expires - self._policy.fence_margin(lease.ttl_seconds)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        wake, heap = self._wake, self._heap
        while True:
            now = time.monotonic()
            while heap and heap[0][0] <= now:
                _, _, lease, fencing = heapq.heappop(heap)
                if lease.ended:
                    continue
                if fencing:
                    # Renewed since (the fencing point moved on), or fenced now: never later than the point.
                    if now >= self._fence_point(lease):
                        self._fence(lease)
                    continue
                self._due.put_nowait(lease)
                heapq.heappush(heap, (self._fence_point(lease), next(self._seq), lease, True))
            # Workers waiting on the queue take one lease each; start more for the rest, up to the limit.
            while self._due.qsize() > self._idle_workers and self._workers < self._max_workers:
                self._workers += 1
                self._supervisor.keep(self._renewals, name="renewals")
            wake.clear()
            # Until the next renewal is due, or an earlier one is scheduled: a timer that sets the event (this
            # loop wakes hundreds of times a second with 10,000 leases; an asyncio.timeout costs more).
            timer = loop.call_later(heap[0][0] - now, wake.set) if heap else None
            try:
                await wake.wait()
            finally:
                if timer is not None:
                    timer.cancel()

    async def _renewals(self) -> None:
        """A renewal worker: renews due leases one at a time, until the sidecar closes."""
        due, renewing, supervisor = self._due, self._renewing, self._supervisor
        while True:
            self._idle_workers += 1
            try:
                lease = await due.get()
            finally:
                self._idle_workers -= 1
            if lease.ended:  # released or lost while it waited
                continue
            renewing[lease] = None
            try:
                # A renewal that fails unexpectedly is logged once and fences its lease; the worker goes on.
                await supervisor.run(self._renew(lease), name="renewal", on_crash=partial(self._crashed, lease))
            finally:
                waiter = renewing.pop(lease, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

    async def _renew(self, lease: Lease) -> None:
        policy = self._policy
        fence_at = self._fence_point(lease)
        budget = min(policy.heartbeat_interval(lease.ttl_seconds), fence_at - time.monotonic())
        if budget < MIN_SEND_SECONDS:  # no time for an answer: nothing is sent, the scheduler fences at the point
            if budget <= 0:
                self._fence(lease)
            return
        sent = time.monotonic()
        try:
            with telemetry.use(lease.span):
                # `deadline` bounds the request and its retries (the exchange bounds each attempt): no
                # second timeout around it, which would be one more timer per heartbeat.
                result = await self._client.heartbeat(
                    lease.work_id,
                    expected_last_heartbeat=lease.last_heartbeat,
                    desired_ttl_seconds=policy.ttl_seconds,
                    deadline=budget,
                    attempt_timeout=policy.attempt_timeout(budget),
                )
        except (LeaseLostError, ConflictError) as exc:
            if not (exc.maybe_applied or lease.doubtful_since is not None):
                telemetry.heartbeats.add(1, {"result": "precondition_failed"})
                self._leases.lose(lease, pb.LEASE_LOST_REASON_PRECONDITION_FAILED, _describe(exc))
                return
            settled = await self._settle(lease, exc, sent)
            if settled is None:
                return
            result, sent, exact = settled
        except NotFoundError as exc:
            telemetry.heartbeats.add(1, {"result": "not_found"})
            self._leases.lose(lease, pb.LEASE_LOST_REASON_NOT_FOUND, _describe(exc))
            return
        except (WorkApiError, TimeoutError) as exc:
            telemetry.heartbeats.add(1, {"result": _failure_kind(exc)})
            if isinstance(exc, WorkApiError) and exc.maybe_applied:
                self._leases.doubt(lease, sent)
            self._retry_later(lease, fence_at, exc)
            return
        else:
            exact = True
        self._apply(lease, result, sent, exact)

    def _apply(self, lease: Lease, result: HeartbeatResult, sent: float, exact: bool) -> None:
        """A renewal's answer (or the lease as a read settled it), applied to the lease; the next renewal scheduled."""
        policy = self._policy
        if not self._leases.renewed(lease, result, sent_at=sent, exact=exact):
            return
        if result.state == "stopped":  # stopped by someone else (before lease_extended: it is false then)
            telemetry.heartbeats.add(1, {"result": "stopped"})
            self._leases.end(lease, pb.LEASE_STATE_STOPPED, pb.LEASE_LOST_REASON_STOPPED, "the item was stopped")
            return
        if not result.lease_extended:
            telemetry.heartbeats.add(1, {"result": "not_extended"})
            self._leases.lose(lease, pb.LEASE_LOST_REASON_NOT_EXTENDED, "the Work API did not extend the lease")
            return
        telemetry.heartbeats.add(1, {"result": "ok"})
        if result.state == "stopping":
            self._leases.request_stop(lease)
        self._schedule(lease, sent + policy.heartbeat_interval(lease.ttl_seconds))  # from the send: see track()

    async def _settle(
        self, lease: Lease, refusal: WorkApiError, sent: float
    ) -> tuple[HeartbeatResult, float, bool] | None:
        """A renewal refused after a doubt (`_doubt`): (the lease as read, the send time to count from, whether the
        CAS value is exact) when our own heartbeat landed; None when the lease was lost or the read failed (then
        the renewal is tried again within the fencing window, as after any failure)."""
        fence_at = self._fence_point(lease)
        with telemetry.use(lease.span):
            settled = await settle(
                self._client,
                lease.work_id,
                refusal,
                echoed=lease.last_heartbeat,
                echoed_exact=not lease.cas_read,
                deadline=fence_at - time.monotonic(),
            )
        if lease.ended:
            return None
        if settled.result is not None:
            telemetry.heartbeats.add(1, {"result": "settled_ours"})
            since = sent if lease.doubtful_since is None else min(sent, lease.doubtful_since)
            result = settled.result
            if not result.ttl_seconds:
                result = dataclasses.replace(result, ttl_seconds=lease.ttl_seconds)
            return result, since, settled.exact
        if settled.unreadable:
            telemetry.heartbeats.add(1, {"result": "unsettled"})
            self._leases.doubt(lease, sent)
            self._retry_later(lease, fence_at, refusal)
            return None
        telemetry.heartbeats.add(1, {"result": "precondition_failed"})
        self._leases.lose(
            lease,
            pb.LEASE_LOST_REASON_PRECONDITION_FAILED,
            f"{_describe(refusal)}; the item reads {settled.state or 'unknown'}: the lease is not ours",
        )
        return None

    def _retry_later(self, lease: Lease, fence_at: float, exc: BaseException) -> None:
        """A renewal failed: try again after `retry_delay`, or fence the lease when the fencing window is over."""
        policy = self._policy
        if lease.ended:
            return
        if time.monotonic() >= fence_at:
            self._fence(lease)
            return
        retry_in = max(0.0, min(policy.retry_delay(lease.ttl_seconds), fence_at - time.monotonic()))
        log.warning(
            "heartbeat failed; retrying within the TTL",
            extra={"work_id": lease.work_id, "error": _describe(exc), "retry_in": round(retry_in, 3)},
        )
        self._schedule(lease, time.monotonic() + retry_in)

    def _fence(self, lease: Lease) -> None:
        if lease.ended:
            return
        telemetry.heartbeats.add(1, {"result": "expired"})
        self._leases.lose(
            lease,
            pb.LEASE_LOST_REASON_EXPIRED,
            f"no heartbeat succeeded for a whole TTL ({lease.ttl_seconds}s); someone else may hold the item",
        )


def _log_release_failed(work_id: str, exc: BaseException) -> None:
    log.info("release heartbeat failed; the item returns at its TTL", extra={"work_id": work_id, "error": str(exc)})


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


def _failure_kind(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    if status is not None:
        return f"http_{status}"
    return "timeout" if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__ else "transport"
