"""The hand-over of a polled item: ack → claim → assign (→ reassign).

- The poller has reserved a watcher's slot before it calls `take`; the ack goes out at once.
- Right after the ack the claiming heartbeat (`NO_HEARTBEAT`) is sent, before any slow step, so no item
  is left `starting`; only then is `WorkAssigned` queued for the sandbox.
- If the chosen watcher closed during ack and claim, the item goes to another watcher with a free slot,
  or, if there is none, the lease is released (it returns to the queue after a short TTL).
- An assignment that was queued but never written (its watcher left) is `reassign`ed the same way.
- Healthcheck items never reach sandboxes: the sidecar acks and force-stops them itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

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
)
from . import _telemetry as telemetry
from ._convert import work_message
from ._dispatcher import Dispatcher, Watcher
from ._lease import Lease, Leases
from ._leaser import Leaser
from ._policy import LeasePolicy

log = logging.getLogger("sidecar.handover")


class ClaimIntents(Protocol):
    """Told before an item is acked and when its claim settled (the lease journal, with `--state-dir`)."""

    def acking(self, work_id: str) -> None: ...
    def settled(self, work_id: str) -> None: ...


class _NoIntents:
    def acking(self, work_id: str) -> None:
        pass

    def settled(self, work_id: str) -> None:
        pass


class HandOver:
    def __init__(
        self,
        client: WorkApiClient,
        policy: LeasePolicy,
        leases: Leases,
        leaser: Leaser,
        dispatcher: Dispatcher,
        *,
        intents: ClaimIntents | None = None,
    ) -> None:
        self._client = client
        self._policy = policy
        self._leases = leases
        self._leaser = leaser
        self._dispatcher = dispatcher
        self._intents: ClaimIntents = intents or _NoIntents()
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, work: Work, watcher: Watcher, *, returned_at: float) -> None:
        """Hand `work` over to `watcher` (whose slot the caller reserved) in the background."""
        self._spawn(self.take(work, watcher, returned_at=returned_at))

    def start_healthcheck(self, work: Work) -> None:
        self._spawn(self._finish_healthcheck(work))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def take(self, work: Work, watcher: Watcher, *, returned_at: float) -> None:
        """Claim `work` for `watcher`, whose slot the caller has reserved, and assign it."""
        span = telemetry.start_work_span(work, self._client.provider.name)
        self._intents.acking(work.id)
        try:
            lease = await self._claim(work, span)
        except BaseException:
            self._dispatcher.unreserve(watcher)
            telemetry.end_unassigned_span(span, "not_acked", "error")
            raise  # an interrupted claim stays unsettled: a successor releases the item
        self._intents.settled(work.id)
        if lease is None:
            self._dispatcher.unreserve(watcher)
            return
        self._leaser.track(lease)
        if watcher.closed:
            self._dispatcher.unreserve(watcher)
            replacement = self._dispatcher.reserve()
            log.info(
                "watcher left during hand-over", extra={"work_id": work.id, "handed_to_another": bool(replacement)}
            )
            if replacement is None:
                await self._leaser.release(
                    lease, pb.LEASE_LOST_REASON_SANDBOX_GONE, "the sandbox left before the item was assigned"
                )
                return
            watcher = replacement
        self._assign(watcher, lease)
        telemetry.dispatch_latency.record(time.monotonic() - returned_at)

    def _assign(self, watcher: Watcher, lease: Lease) -> None:
        """Queue WorkAssigned on a watcher that holds a reservation for it."""
        self._leases.assign(lease, watcher)
        self._dispatcher.assign(watcher, lease.work_id, assignment(lease))

    def reassign(self, message: pb.WorkAssigned) -> None:
        """An assignment that was never written (its watcher left): give it to another watcher or release it."""
        lease = self._leases.get(message.work.id)
        if lease is None or lease.ended:
            return
        watcher = self._dispatcher.reserve()
        if watcher is None:
            self._leaser.spawn_release(
                lease, pb.LEASE_LOST_REASON_SANDBOX_GONE, "the sandbox left before receiving the item"
            )
            return
        log.info("reassigning an item its sandbox never received", extra={"work_id": lease.work_id})
        self._assign(watcher, lease)

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
                    _not_ours(work, span, "ack_conflict", exc)
                    return None
                log.info(
                    "ack conflict after a retry: our first ack may have landed; claiming to find out",
                    extra={"work_id": work.id},
                )
            except NotFoundError as exc:
                telemetry.acks.add(1, {"result": "not_found"})
                _not_ours(work, span, "not_found", exc)
                return None
            except WorkApiError as exc:
                telemetry.acks.add(1, {"result": "error"})
                if not isinstance(exc, TransportError) and not is_retryable(exc, "ack"):
                    _not_ours(work, span, "ack_failed", exc)
                    return None
                log.warning("ack outcome unknown; claiming to find out", extra={"work_id": work.id, "error": str(exc)})
            sent = time.monotonic()
            try:
                result = await self._client.heartbeat(
                    work.id,
                    expected_last_heartbeat=NO_HEARTBEAT,
                    desired_ttl_seconds=self._policy.ttl_seconds,
                    deadline=self._policy.claim_timeout,
                )
            except (PreconditionFailedError, ConflictError, NotFoundError) as exc:
                telemetry.heartbeats.add(1, {"result": "claim_failed"})
                _not_ours(work, span, "claim_failed", exc)
                return None
            except WorkApiError as exc:
                telemetry.heartbeats.add(1, {"result": "claim_error"})
                log.error(
                    "claiming heartbeat failed after the ack; the item may stay starting at the Work API",
                    extra={"work_id": work.id, "error": str(exc)},
                )
                telemetry.end_unassigned_span(span, "lost", "claim_error")
                return None
        if not result.lease_extended:
            _not_ours(work, span, "not_extended", None)
            return None
        telemetry.heartbeats.add(1, {"result": "ok"})
        span.add_event("heartbeat", {"work.state": result.state, "lease.ttl_seconds": result.ttl_seconds})
        return self._leases.claim(
            dataclasses.replace(acked, state=result.state, secret=work.secret),
            result,
            sent_at=sent,
            ttl_seconds=self._policy.ttl_seconds,
            span=span,
        )

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


def _not_ours(work: Work, span: Span, reason: str, exc: BaseException | None) -> None:
    log.info("item is not ours to take", extra={"work_id": work.id, "reason": reason, "error": str(exc or "")})
    telemetry.end_unassigned_span(span, "not_taken", reason)


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
