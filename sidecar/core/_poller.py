"""Demand-driven polling and the hand-over of each item: poll → choose watcher → ack → claim → assign.

- No free capacity (no watcher, or all full): no poll at all.
- Free capacity: one long poll (`block_ms` near the maximum) per environment, however many sandboxes
  wait, so idle API traffic does not grow with them. While polls keep returning items and capacity is
  free, extra pollers join (up to `max_pollers`, never more polls than free slots); a poller that comes
  back empty leaves, so it falls back to one when the queue is empty.
- An item is acked only after a watcher with a free slot has been chosen and reserved; if none is left
  when the poll returns (a sandbox went away meanwhile), the item waits `unclaimed_wait` for a slot (a
  sandbox that reconnects at once gets it), and is then left unacked for the Work API to reclaim.
- Right after the ack the claiming heartbeat (`NO_HEARTBEAT`) is sent, before any slow step, so no item
  is left `starting`; only then is `WorkAssigned` queued for the sandbox.
- If the chosen watcher closed during ack and claim, the item goes to another watcher with a free slot,
  or, if there is none, the lease is released (it returns to the queue after a short TTL).
- Healthcheck items never reach sandboxes: the sidecar acks and force-stops them itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from opentelemetry.trace import Span

from ..work.v1 import work_service_pb2 as pb
from ..workapi import (
    NO_HEARTBEAT,
    ConflictError,
    NotFoundError,
    PreconditionFailedError,
    SecretDecodeError,
    TransportError,
    Work,
    WorkApiClient,
    WorkApiError,
    is_retryable,
    parse_time,
)
from . import _telemetry as telemetry
from ._config import SidecarConfig
from ._convert import work_message
from ._dispatcher import Dispatcher, Watcher
from ._lease import Lease, LeaseTable
from ._leaser import Leaser

log = logging.getLogger("sidecar.poller")


class Poller:
    def __init__(
        self,
        client: WorkApiClient,
        config: SidecarConfig,
        dispatcher: Dispatcher,
        leaser: Leaser,
        table: LeaseTable,
    ) -> None:
        self._client = client
        self._config = config
        self._dispatcher = dispatcher
        self._leaser = leaser
        self._table = table
        self._polls_in_flight = 0
        self.peak_polls_in_flight = 0
        self._pollers = 0
        self._poll_returned = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def polls_in_flight(self) -> int:
        return self._polls_in_flight

    def start(self) -> None:
        self._start_poller(primary=True)

    async def stop(self) -> None:
        """Stop polling at once (in-flight polls are cancelled: what they would return is not acked)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start_poller(self, *, primary: bool) -> None:
        # Counted from the spawn to the task's end, not from when it first runs: two loops deciding in the same
        # tick would otherwise both see room for one more and exceed max_pollers.
        self._pollers += 1
        self._spawn(self._poll_loop(primary=primary)).add_done_callback(self._poller_done)

    def _poller_done(self, _task: asyncio.Task[None]) -> None:
        self._pollers -= 1

    async def _poll_loop(self, *, primary: bool) -> None:
        while not self._dispatcher.draining:
            if primary:
                await self._wait_for_unpolled_capacity()
                if self._dispatcher.draining:
                    return
            elif self._dispatcher.free_capacity() <= self._polls_in_flight:
                return
            work = await self._poll_once()
            if work is None:
                if not primary:
                    return
                continue
            if self._dispatcher.draining:
                log.info("draining: not acking a polled item; the Work API will reclaim it", extra={"work_id": work.id})
                return
            returned_at = time.monotonic()
            if work.data.is_healthcheck:
                self._spawn(self._finish_healthcheck(work))
                continue
            # Reserve the slot now, before this loop polls again, so a full sandbox never causes an
            # extra poll whose item nobody could take.
            watcher = self._dispatcher.reserve() or await self._wait_for_slot()
            if watcher is None:
                log.info(
                    "no watcher has a free slot: not acking; the Work API will reclaim the item",
                    extra={"work_id": work.id},
                )
                continue
            if self._pollers < self._config.max_pollers and (self._dispatcher.free_capacity() > self._polls_in_flight):
                self._start_poller(primary=False)
            self._spawn(self.hand_over(work, watcher, returned_at=returned_at))

    async def _wait_for_unpolled_capacity(self) -> None:
        """Wait until a free slot is not already covered by a poll in flight: a poll that returns an item nobody
        has a slot for leaves that item unacked until the Work API reclaims it (seconds later)."""
        dispatcher = self._dispatcher
        while not dispatcher.draining:
            free = dispatcher.free_capacity()
            if free == 0:
                await dispatcher.wait_for_capacity()
            elif free <= self._polls_in_flight:
                self._poll_returned.clear()
                await self._poll_returned.wait()
            else:
                return

    async def _wait_for_slot(self) -> Watcher | None:
        """The poll returned an item but every slot is gone (a sandbox left while the poll was open): wait up to
        `unclaimed_wait` for one (a sandbox that reconnects, say), polling nothing meanwhile."""
        if self._config.unclaimed_wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.unclaimed_wait):
                    await self._dispatcher.wait_for_capacity()
        return self._dispatcher.reserve()

    async def _poll_once(self) -> Work | None:
        self._polls_in_flight += 1
        self.peak_polls_in_flight = max(self.peak_polls_in_flight, self._polls_in_flight)
        try:
            work = await self._client.poll(
                block_ms=self._config.poll_block_ms, reclaim_older_than_ms=self._config.reclaim_older_than_ms
            )
        except WorkApiError as exc:
            telemetry.polls.add(1, {"result": "error"})
            delay = random.uniform(1.0, 5.0) if not is_retryable(exc, "poll") else random.uniform(0.5, 2.0)
            log.error("poll failed", extra={"error": str(exc), "retry_in": round(delay, 2)})
            await asyncio.sleep(delay)
            return None
        finally:
            self._polls_in_flight -= 1
            self._poll_returned.set()
        telemetry.polls.add(1, {"result": "empty" if work is None else "item"})
        return work

    # -- hand-over ----------------------------------------------------------------------------------

    async def hand_over(self, work: Work, watcher: Watcher, *, returned_at: float) -> None:
        """Claim `work` for `watcher`, whose slot the caller has reserved, and assign it."""
        span = telemetry.start_work_span(work, self._client.provider.name)
        try:
            lease = await self._claim(work, span)
        except BaseException:
            self._dispatcher.unreserve(watcher)
            telemetry.end_unassigned_span(span, "not_acked", "error")
            raise
        if lease is None:
            self._dispatcher.unreserve(watcher)
            return
        if watcher.closed:
            self._dispatcher.unreserve(watcher)
            replacement = self._dispatcher.reserve()
            log.info(
                "watcher left during hand-over", extra={"work_id": work.id, "handed_to_another": bool(replacement)}
            )
            if replacement is None:
                self._leaser.start(lease)
                await self._leaser.release(
                    lease, pb.LEASE_LOST_REASON_SANDBOX_GONE, "the sandbox left before the item was assigned"
                )
                return
            watcher = replacement
        self.assign(watcher, lease)
        telemetry.dispatch_latency.record(time.monotonic() - returned_at)

    def assign(self, watcher: Watcher, lease: Lease) -> None:
        """Queue WorkAssigned on a watcher that holds a reservation for it."""
        lease.watcher = watcher
        lease.sandbox_id = watcher.sandbox_id
        if lease.span is not None and watcher.sandbox_id:
            lease.span.set_attribute("sandbox.id", watcher.sandbox_id)
        if self._table.get(lease.work_id) is None:
            self._leaser.start(lease)
        self._dispatcher.assign(watcher, lease.work_id, assignment(lease))
        log.info("work assigned", extra={"work_id": lease.work_id, "sandbox_id": watcher.sandbox_id})

    def reassign(self, message: pb.WorkAssigned) -> None:
        """An assignment that was never written (its watcher left): give it to another watcher or release it."""
        lease = self._table.get(message.work.id)
        if lease is None or lease.ended:
            return
        watcher = self._dispatcher.reserve()
        if watcher is None:
            self._spawn(
                self._leaser.release(
                    lease, pb.LEASE_LOST_REASON_SANDBOX_GONE, "the sandbox left before receiving the item"
                )
            )
            return
        log.info("reassigning an item its sandbox never received", extra={"work_id": lease.work_id})
        self.assign(watcher, lease)

    async def _claim(self, work: Work, span: Span) -> Lease | None:
        """Ack, then the claiming heartbeat. None when the item is not (or no longer) ours."""
        acked = work
        with telemetry.use(span):
            try:
                acked = await self._client.ack(work.id)
                telemetry.acks.add(1, {"result": "ok"})
            except ConflictError as exc:
                telemetry.acks.add(1, {"result": "conflict"})
                if exc.attempts <= 1:
                    return self._not_ours(work, span, "ack_conflict", exc)
                log.info(
                    "ack conflict after a retry: our first ack may have landed; claiming to find out",
                    extra={"work_id": work.id},
                )
            except NotFoundError as exc:
                telemetry.acks.add(1, {"result": "not_found"})
                return self._not_ours(work, span, "not_found", exc)
            except WorkApiError as exc:
                telemetry.acks.add(1, {"result": "error"})
                if not isinstance(exc, TransportError) and not is_retryable(exc, "ack"):
                    return self._not_ours(work, span, "ack_failed", exc)
                log.warning("ack outcome unknown; claiming to find out", extra={"work_id": work.id, "error": str(exc)})
            sent = time.monotonic()
            try:
                result = await self._client.heartbeat(
                    work.id,
                    expected_last_heartbeat=NO_HEARTBEAT,
                    desired_ttl_seconds=self._config.ttl_seconds,
                    deadline=self._config.first_heartbeat_timeout,
                )
            except (PreconditionFailedError, ConflictError, NotFoundError) as exc:
                telemetry.heartbeats.add(1, {"result": "claim_failed"})
                return self._not_ours(work, span, "claim_failed", exc)
            except WorkApiError as exc:
                telemetry.heartbeats.add(1, {"result": "claim_error"})
                log.error(
                    "claiming heartbeat failed after the ack; the item may stay starting at the Work API",
                    extra={"work_id": work.id, "error": str(exc)},
                )
                telemetry.end_unassigned_span(span, "lost", "claim_error")
                return None
        if not result.lease_extended:
            return self._not_ours(work, span, "not_extended", None)
        telemetry.heartbeats.add(1, {"result": "ok"})
        span.add_event("heartbeat", {"work.state": result.state, "lease.ttl_seconds": result.ttl_seconds})
        ttl = result.ttl_seconds or self._config.ttl_seconds
        # The claim started the item: the ack's copy has neither started_at nor latest_heartbeat_at yet.
        claimed_at = result.last_heartbeat if parse_time(result.last_heartbeat) else datetime.now(UTC).isoformat()
        lease = Lease(
            work=dataclasses.replace(
                acked,
                state=result.state,
                secret=work.secret,
                started_at=acked.started_at or claimed_at,
                latest_heartbeat_at=claimed_at,
            ),
            token=LeaseTable.new_token(),
            secret=work.secret,
            last_heartbeat=result.last_heartbeat,
            ttl_seconds=ttl,
            last_success=sent,
            expires_at=datetime.now(UTC) + timedelta(seconds=ttl),
            span=span,
        )
        if result.state == "stopping":
            lease.state = pb.LEASE_STATE_STOP_REQUESTED
        return lease

    @staticmethod
    def _not_ours(work: Work, span: Span, reason: str, exc: BaseException | None) -> None:
        log.info("item is not ours to take", extra={"work_id": work.id, "reason": reason, "error": str(exc or "")})
        telemetry.end_unassigned_span(span, "not_taken", reason)
        return None

    async def _finish_healthcheck(self, work: Work) -> None:
        span = telemetry.start_work_span(work, self._client.provider.name)
        with telemetry.use(span):
            try:
                await self._client.ack(work.id)
                await self._client.stop(work.id, force=True)
                telemetry.end_unassigned_span(span, "stopped", "healthcheck")
                log.info("healthcheck item acked and stopped", extra={"work_id": work.id})
            except WorkApiError as exc:
                telemetry.end_unassigned_span(span, "error", "healthcheck")
                log.warning("healthcheck item failed", extra={"work_id": work.id, "error": str(exc)})


def assignment(lease: Lease) -> pb.WorkAssigned:
    traceparent, tracestate = telemetry.trace_headers(lease.span)
    message = pb.WorkAssigned(
        work=work_message(lease.work),
        lease_token=lease.token,
        traceparent=traceparent,
        tracestate=tracestate,
        lease=lease.status(),
    )
    if lease.secret is not None:
        message.secret = lease.secret.reveal()
        try:
            credentials = lease.secret.decode()
        except SecretDecodeError:
            log.warning("the item's secret does not decode; passing it on raw", extra={"work_id": lease.work_id})
        else:
            message.session_credentials.sessions_token = credentials.sessions_token
            message.session_credentials.api_base_url = credentials.api_base_url or ""
    return message
