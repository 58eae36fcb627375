"""The hand-over of a polled item: ack → claim → assign (→ reassign).

- The poller has reserved a watcher's slot before it calls `take`; the ack goes out at once.
- Right after the ack the claiming heartbeat (`NO_HEARTBEAT`) is sent, before any slow step; only then is
  `WorkAssigned` queued for the sandbox. An ack that succeeded or whose outcome is unknown (no answer, a 5xx,
  an answer that does not parse, an error that may have replaced a real answer) is followed by claims with
  backoff until one answer is definitive: the lease is ours, or it is not. No acked item is left `starting`
  while the Work API can be asked.
- A refusal of the claim (412, 409) is settled by reading the item (`_doubt.settle`) once the ack is known to be
  ours (it succeeded, or a read settled a refused retry of it): an earlier claim whose answer was lost or untrusted
  may have landed, and nobody else can have claimed an item we acked. The item `active` with a heartbeat is
  ours; still `starting`, no claim landed and the refusal was invented on the way: claimed again; any other
  state is not ours. Only when the read fails, or the ack is not known to be ours, is the refusal asked again
  (`confirm_refusals` times: one such answer may be invented on the way) and then believed.
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
from datetime import UTC, datetime
from typing import Protocol

from opentelemetry.trace import Span

from ..work.v1 import work_service_pb2 as pb
from ..workapi import (
    NO_HEARTBEAT,
    ConflictError,
    HeartbeatResult,
    NotFoundError,
    PreconditionFailedError,
    ResponseError,
    SecretDecodeError,
    TransportError,
    Work,
    WorkApiClient,
    WorkApiError,
    is_retryable,
    parse_time,
)
from . import _telemetry as telemetry
from ._convert import fill_work
from ._dispatcher import Dispatcher, Watcher
from ._doubt import Settled, ack_settled, settle
from ._lease import Lease, Leases
from ._leaser import Leaser
from ._policy import LeasePolicy
from ._supervisor import Supervisor

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
        supervisor: Supervisor,
        intents: ClaimIntents | None = None,
    ) -> None:
        self._client = client
        self._policy = policy
        self._leases = leases
        self._leaser = leaser
        self._dispatcher = dispatcher
        self._supervisor = supervisor
        self._intents: ClaimIntents = intents or _NoIntents()
        self._taking = 0
        self._settled = asyncio.Event()
        self._settled.set()

    def start_healthcheck(self, work: Work) -> None:
        self._supervisor.spawn(self._finish_healthcheck(work), name="healthcheck")

    async def take(
        self,
        work: Work,
        watcher: Watcher,
        *,
        returned_at: float,
        handed: asyncio.Event | None = None,
        exclusive_until: float | None = None,
    ) -> None:
        """Claim `work` for `watcher`, whose slot the caller has reserved, and assign it. `handed` is set once the
        item's WorkAssigned is queued for the sandbox, or the ack or a claim attempt failed (the poller's successor
        polls only then, so neither the ack nor the claim queues behind further polls). `exclusive_until`:
        time.monotonic() before which nobody else can be handed `work` (`_doubt.exclusive_until`; None: unknown,
        so a refused retry of the ack cannot be settled by reading)."""
        handed = handed or asyncio.Event()
        self._taking += 1
        self._settled.clear()
        try:
            await self._take(work, watcher, returned_at, handed, exclusive_until)
        finally:
            handed.set()
            self._taking -= 1
            if not self._taking:
                self._settled.set()

    async def settled(self) -> None:
        """Until no hand-over is under way: each item on its way to a sandbox is a lease, or not ours, by then (a
        drain waits for this before it waits for the leases to end)."""
        await self._settled.wait()

    async def _take(
        self, work: Work, watcher: Watcher, returned_at: float, handed: asyncio.Event, exclusive_until: float | None
    ) -> None:
        span = telemetry.start_work_span(work, self._client.provider.name)
        self._intents.acking(work.id)
        try:
            lease = await self._claim(work, span, handed, exclusive_until)
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
                handed.set()  # the poller need not wait for the release
                await self._leaser.release(
                    lease, pb.LEASE_LOST_REASON_SANDBOX_GONE, "the sandbox left before the item was assigned"
                )
                return
            watcher = replacement
        self._assign(watcher, lease)
        telemetry.dispatch_latency.record(time.monotonic() - returned_at)

    def _assign(self, watcher: Watcher, lease: Lease) -> None:
        """Queue WorkAssigned on a watcher that holds a reservation for it, then record the assignment. Both in
        one step (nothing can see one without the other), in this order so that the stream's write is the first
        thing the loop runs next: what observers defer (log lines) comes after it."""
        self._dispatcher.assign(watcher, lease.work_id, assignment(lease))
        self._leases.assign(lease, watcher)

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

    async def _claim(
        self, work: Work, span: Span, handed: asyncio.Event, exclusive_until: float | None
    ) -> Lease | None:
        """Ack, then the claiming heartbeat; `handed` is set when a claim attempt failed (the caller sets it in
        every other case). None when the item is not (or no longer) ours."""
        acked = work
        ack_ours = False
        """The ack is known to have landed: a refusal of the claim is then settled by reading."""
        with telemetry.use(span):
            try:
                acked = await self._client.ack(work.id)
                telemetry.acks.add(1, {"result": "ok"})
                ack_ours = True
            except ConflictError as exc:
                telemetry.acks.add(1, {"result": "conflict"})
                if exc.attempts <= 1 or not exc.maybe_applied:
                    _not_ours(work, span, "ack_conflict", exc)
                    return None
                ours = (
                    None
                    if exclusive_until is None
                    else await ack_settled(self._client, work.id, exclusive_until=exclusive_until)
                )
                if ours is False:
                    _not_ours(work, span, "ack_conflict", exc)
                    return None
                ack_ours = ours is True
                log.info(
                    "ack conflict after an attempt whose outcome was unknown: claiming",
                    extra={"work_id": work.id, "ack_read_as_ours": ack_ours},
                )
            except NotFoundError as exc:
                telemetry.acks.add(1, {"result": "not_found"})
                _not_ours(work, span, "not_found", exc)
                return None
            except ResponseError as exc:
                telemetry.acks.add(1, {"result": "bad_response"})
                log.warning(
                    "ack answered with a body that does not parse; claiming to find out",
                    extra={"work_id": work.id, "error": str(exc)},
                )
            except WorkApiError as exc:
                # Any other failure may hide an ack that landed (a 5xx, no answer, or an error answer that replaced
                # the real one on the way): the claim finds out. If the ack did not land, the claim gets 409/412.
                telemetry.acks.add(1, {"result": "error"})
                log.warning(
                    "ack failed or outcome unknown; claiming to find out", extra={"work_id": work.id, "error": str(exc)}
                )
            claimed = await self._claim_until_definitive(work, span, handed, ack_ours=ack_ours)
        if claimed is None:
            return None
        result, sent, exact = claimed
        if not result.lease_extended:
            _not_ours(work, span, "not_extended", None)
            return None
        telemetry.heartbeats.add(1, {"result": "ok"})
        span.add_event("heartbeat", {"work.state": result.state, "lease.ttl_seconds": result.ttl_seconds})
        # The claim started the item: the ack's copy has neither started_at nor latest_heartbeat_at yet.
        claimed_at = result.last_heartbeat if parse_time(result.last_heartbeat) else datetime.now(UTC).isoformat()
        lease = self._leases.claim(
            dataclasses.replace(
                acked,
                state=result.state,
                secret=work.secret,
                started_at=acked.started_at or claimed_at,
                latest_heartbeat_at=claimed_at,
            ),
            result,
            sent_at=sent,
            ttl_seconds=self._policy.ttl_seconds,
            span=span,
        )
        if not exact:
            self._leases.renewed(lease, result, sent_at=sent, exact=False)
        return lease

    async def _claim_until_definitive(
        self, work: Work, span: Span, handed: asyncio.Event, *, ack_ours: bool
    ) -> tuple[HeartbeatResult, float, bool] | None:
        """The claiming heartbeat, again and again with backoff until an answer is definitive about the item:
        (answer, sent at, whether its CAS value is exact), or None when the item is not ours. A 412/409 is settled
        by reading when `ack_ours` (see the module's docstring); else, and when the read fails, it is repeated
        `confirm_refusals` more times (one such answer may have been invented on the way, and an acked item nobody
        claims stays `starting`) and then believed; 404 is final. Anything else (5xx, no answer, unparseable, 4xx
        refusals that may pass or replaced answers) is retried: the sidecar's drain or close ends it."""
        failures = refusals = 0
        first_sent: float | None = None
        while True:
            sent = time.monotonic()
            first_sent = sent if first_sent is None else first_sent
            try:
                result = await self._client.heartbeat(
                    work.id,
                    expected_last_heartbeat=NO_HEARTBEAT,
                    desired_ttl_seconds=self._policy.ttl_seconds,
                    deadline=self._policy.claim_timeout,
                    # As a renewal's: a claim applied whose answer is slow or lost is claimed again (and the refusal
                    # read) while most of its TTL is left.
                    attempt_timeout=self._policy.attempt_timeout(
                        self._policy.heartbeat_interval(self._policy.ttl_seconds)
                    ),
                )
            except (PreconditionFailedError, ConflictError, NotFoundError) as exc:
                settled = await self._read_refusal(work, exc) if ack_ours else None
                if settled is not None and settled.result is not None:
                    # One of our claims landed (its answer lost or untrusted): counted from the first one sent.
                    telemetry.heartbeats.add(1, {"result": "settled_ours"})
                    return settled.result, first_sent, settled.exact
                telemetry.heartbeats.add(1, {"result": "claim_failed"})
                if settled is not None and settled.state != "starting":
                    _not_ours(work, span, f"claim_refused_item_{settled.state or 'unknown'}", exc)
                    return None
                if settled is not None:  # still `starting` on our ack: no claim landed, the refusal was invented
                    failures += 1
                    delay = self._policy.claim_backoff.delay(failures)
                else:  # not read (the ack is not known ours, a 404, the read failed): asked again, then believed
                    refusals += 1
                    if refusals > self._policy.confirm_refusals:
                        _not_ours(work, span, "claim_failed", exc)
                        return None
                    delay = self._policy.claim_backoff.delay(refusals)
                log.info(
                    "claim refused after the ack; asking again",
                    extra={"work_id": work.id, "error": str(exc), "refusals": refusals, "retry_in": round(delay, 2)},
                )
            except WorkApiError as exc:
                # Not a definitive answer about this item (a 5xx, no answer, a body that does not parse, or a
                # refusal of our key that may pass): an acked item left alone stays `starting`, so claim again.
                telemetry.heartbeats.add(1, {"result": "claim_error"})
                failures += 1
                delay = self._policy.claim_backoff.delay(failures)
                log.log(
                    logging.WARNING
                    if is_retryable(exc, "heartbeat") or isinstance(exc, TransportError)
                    else logging.ERROR,
                    "claiming heartbeat failed after the ack; claiming again",
                    extra={"work_id": work.id, "error": str(exc), "attempt": failures, "retry_in": round(delay, 2)},
                )
            else:
                return result, sent, True  # `take` lets the poller go on once WorkAssigned is queued
            handed.set()  # this attempt failed: the poller may poll again while the claim goes on
            await asyncio.sleep(delay)

    async def _read_refusal(self, work: Work, refusal: WorkApiError) -> Settled | None:
        """A refused claim after our ack, settled by reading; None when it cannot be (a 404, a failed read)."""
        if isinstance(refusal, NotFoundError):
            return None
        settled = await settle(self._client, work.id, refusal, echoed=NO_HEARTBEAT)
        if settled.unreadable:
            return None
        if settled.result is not None and not settled.result.ttl_seconds:
            return dataclasses.replace(
                settled, result=dataclasses.replace(settled.result, ttl_seconds=self._policy.ttl_seconds)
            )
        return settled

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


def assignment(lease: Lease) -> pb.WatchWorkResponse:
    """The WatchWork event that hands `lease` to its sandbox, built in place (see `_convert`)."""
    response = pb.WatchWorkResponse()
    message = response.work_assigned
    fill_work(message.work, lease.work)
    message.lease_token = lease.token
    message.traceparent, message.tracestate = telemetry.trace_headers(lease.span)
    lease.fill_status(message.lease)
    if lease.secret is not None:
        message.secret = lease.secret.reveal()
        try:
            credentials = lease.secret.decode()
        except SecretDecodeError:
            log.warning("the item's secret does not decode; passing it on raw", extra={"work_id": lease.work_id})
        else:
            sessions = message.session_credentials
            sessions.sessions_token = credentials.sessions_token
            sessions.api_base_url = credentials.api_base_url or ""
    return response
