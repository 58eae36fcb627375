"""A stop the sandbox asked for is the sidecar's to finish.

`Stops.stop` (StopWork) asks the Work API to stop an item and applies the answer to the lease. It asks again for
either of two reasons:

- a doubtful answer, settled first by reading the item: the sidecar builds every stop itself, so a 4xx for one
  (409 "already stopped" for an item that is not, 400, 412) may have been invented on the way, and an answer that
  does not parse leaves the outcome unknown. Asked again (at most `confirm_refusals` more times) while the item is
  in none of the states asked for, then as below if it may pass. 404 (the item is gone) is not doubted;
- a failure that may pass (5xx, 429, no answer: the client's own retries ran out in a storm).

StopWork waits for the outcome while the sandbox's deadline leaves `STOP_MARGIN` (without a deadline:
`STOP_PERSIST` seconds). If the Work API has not answered for good by then, or the sandbox cancels the call, the
sandbox hears UNAVAILABLE (reason STOP_PENDING) but the stop is not dropped: the sidecar goes on asking, with
capped backoff, until the Work API stops the item, refuses for good, or the lease ends (it is renewed meanwhile,
as always). While a stop is pending a sandbox that leaves does not get its item released (liveness waits: a
release would requeue work the sandbox finished), and a StopWork for the item joins the stop in progress instead
of sending another (a force stop replaces a graceful one). Found by `make chaos`: a sandbox that gave up after an
error left its item held (fuzzed-answers, storm-5xx), and once it left, the item went back to the queue.

Not journaled: a sidecar restart forgets a pending stop (the adopted lease is released if its sandbox does not
re-attach).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass

import grpc

from ...work.v1 import work_service_pb2 as pb
from ...workapi import APIStatusError, NotFoundError, ResponseError, Work, WorkApiClient, WorkApiError, is_retryable
from .. import _telemetry as telemetry
from ..edge._status import SidecarRpcError, error
from ._lease import Lease, Leases
from ._policy import LeasePolicy
from ._supervisor import Supervisor

log = logging.getLogger("sidecar.stops")

STOP_PERSIST = 60.0
"""Seconds StopWork waits for a stop's outcome when the sandbox set no deadline."""
STOP_MARGIN = 1.0
"""Seconds of the sandbox's deadline left for the answer when StopWork stops waiting."""


class _LeaseEnded(Exception):
    """The lease ended while its stop was being asked: asking further could stop an item someone else holds."""


class _OutOfTime(Exception):
    """A stop answer still in doubt when the sandbox's deadline leaves no time to ask again."""

    def __init__(self, error: WorkApiError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class _Pending:
    force: bool
    outcome: asyncio.Future[Work]


class Stops:
    def __init__(self, client: WorkApiClient, policy: LeasePolicy, leases: Leases, supervisor: Supervisor) -> None:
        self._client = client
        self._policy = policy
        self._leases = leases
        self._supervisor = supervisor
        self._pending: dict[Lease, _Pending] = {}

    def pending(self, lease: Lease) -> bool:
        """A stop of this lease's item goes on after its StopWork answered."""
        return lease in self._pending

    async def stop(self, lease: Lease, force: bool, done: tuple[str, ...], time_remaining: float | None) -> Work:
        """Stop the item (`done`: the states that count as stopped), apply the answer to the lease, return it.

        Raises the Work API's error when it refused for good (NotFoundError: `_ask` lost the lease too), or
        UNAVAILABLE (STOP_PENDING) when the sandbox's deadline ran out first: the stop then goes on. A lease that
        ended meanwhile (lost, say) stops the asking: its item as last seen is returned."""
        until = time.monotonic() + (STOP_PERSIST if time_remaining is None else time_remaining - STOP_MARGIN)
        pending = self._pending.get(lease)
        if pending is not None:
            if pending.force or not force:
                return await self._join(lease, pending, until)
            pending.outcome.cancel()  # a force stop replaces the graceful one in progress
        try:
            work = await self._ask(lease, force, done, until)
        except _LeaseEnded:
            return lease.work
        except _OutOfTime as out:
            raise _still_pending(lease, self._go_on(lease, force, done, out.error)) from out.error
        except WorkApiError as exc:
            if lease.ended or not is_retryable(exc, "stop"):
                raise
            # Out of time, not of reasons: the sandbox hears why, the stop goes on.
            raise _still_pending(lease, self._go_on(lease, force, done, exc)) from exc
        except asyncio.CancelledError:
            if not lease.ended:  # the sandbox cancelled (or left): what it asked for still happens
                self._go_on(lease, force, done, None)
            raise
        return self._apply(lease, work)

    def _apply(self, lease: Lease, work: Work) -> Work:
        self._leases.update_work(lease, work)
        if work.state == "stopped":
            self._leases.end(lease, pb.LEASE_STATE_STOPPED)
        elif work.state == "stopping":
            self._leases.request_stop(lease, by_sandbox=True)  # the sandbox asked for it: no StopRequested back
        return work

    # -- a stop that goes on after its StopWork ------------------------------------------------------

    def _go_on(self, lease: Lease, force: bool, done: tuple[str, ...], last: WorkApiError | None) -> _Pending:
        outcome: asyncio.Future[Work] = asyncio.get_running_loop().create_future()
        outcome.add_done_callback(_retrieved)
        pending = self._pending[lease] = _Pending(force, outcome)
        log.warning(
            "stop not confirmed before its StopWork ended; the sidecar keeps asking",
            extra={"work_id": lease.work_id, "force": force, "error": str(last) if last else "cancelled"},
        )
        task = self._supervisor.spawn(self._finish(lease, pending, done), name="stop")
        task.add_done_callback(lambda _: self._settled(lease, pending))  # runs even if it never started
        return pending

    def _settled(self, lease: Lease, pending: _Pending) -> None:
        if not pending.outcome.done():  # cancelled (the sidecar closes) or crashed: joiners hear STOP_PENDING
            pending.outcome.cancel()
        if self._pending.get(lease) is pending:
            del self._pending[lease]

    async def _finish(self, lease: Lease, pending: _Pending, done: tuple[str, ...]) -> None:
        outcome = pending.outcome
        if lease.ended:  # ended before this task ran (a drain's release, say): nothing left to stop
            outcome.set_result(lease.work)
            return
        asking = asyncio.ensure_future(self._ask(lease, pending.force, done, math.inf))
        try:
            await asyncio.wait([asking, outcome], return_when=asyncio.FIRST_COMPLETED)  # outcome: replaced
            if outcome.done():
                return
            try:
                work = asking.result()
            except _LeaseEnded:
                outcome.set_result(lease.work)
                return
            except WorkApiError as exc:
                log.warning(
                    "the stop the sandbox asked for was refused", extra={"work_id": lease.work_id, "error": str(exc)}
                )
                outcome.set_exception(exc)
                return
            self._apply(lease, work)
            log.info("stop went through after its StopWork answered", extra={"work_id": lease.work_id})
            outcome.set_result(work)
        finally:
            asking.cancel()

    async def _join(self, lease: Lease, pending: _Pending, until: float) -> Work:
        """Wait for a stop in progress while the sandbox's deadline leaves room."""
        try:
            async with asyncio.timeout(max(0.0, until - time.monotonic())):
                return await asyncio.shield(pending.outcome)
        except TimeoutError:
            raise _still_pending(lease, pending) from None
        except asyncio.CancelledError:
            if pending.outcome.cancelled() and not _cancelling():
                raise error(
                    grpc.StatusCode.UNAVAILABLE,
                    "the stop in progress ended with the sidecar's shutdown or the lease; ask again",
                    "STOP_PENDING",
                    {"work_id": lease.work_id},
                ) from None
            raise

    # -- asking --------------------------------------------------------------------------------------

    async def _ask(self, lease: Lease, force: bool, done: tuple[str, ...], until: float) -> Work:
        doubts = failures = 0
        while True:
            if lease.ended:
                raise _LeaseEnded
            try:
                with telemetry.use(lease.span):
                    return await self._client.stop(lease.work_id, force=force, deadline=_left(until))
            except WorkApiError as exc:
                if isinstance(exc, APIStatusError | ResponseError) and _doubtful_stop_answer(exc):
                    with contextlib.suppress(WorkApiError), telemetry.use(lease.span):
                        work = await self._client.get(lease.work_id, deadline=_left(until))
                        if work.state in done:
                            return work
                    doubts += 1
                    if doubts <= self._policy.confirm_refusals:
                        delay = self._policy.claim_backoff.delay(doubts)
                        if time.monotonic() + delay >= until:
                            raise _OutOfTime(exc) from exc
                        message = "stop answered but the item has not stopped; asking again"
                        await self._again(lease, exc, logging.INFO, message, ("doubts", doubts), delay)
                        continue
                if isinstance(exc, NotFoundError):  # the item is gone: so is the lease
                    self._leases.lose(lease, pb.LEASE_LOST_REASON_NOT_FOUND, str(exc))
                if lease.ended or not is_retryable(exc, "stop"):
                    raise
                failures += 1
                delay = self._policy.claim_backoff.delay(failures)
                if time.monotonic() + delay >= until:
                    raise
                level = logging.INFO if until == math.inf else logging.WARNING
                message = "stop failed after its retries; asking again"
                await self._again(lease, exc, level, message, ("failures", failures), delay)

    async def _again(
        self, lease: Lease, exc: WorkApiError, level: int, message: str, counted: tuple[str, int], delay: float
    ) -> None:
        """Log why the stop is asked again (`counted`: the reason's name and count), then wait `delay`."""
        name, count = counted
        extra = {"work_id": lease.work_id, "error": str(exc), name: count, "retry_in": round(delay, 2)}
        log.log(level, message, extra=extra)
        await asyncio.sleep(delay)


def _left(until: float) -> float | None:
    """Seconds to `until` for the Work API client's deadline; None when there is no deadline."""
    return None if until == math.inf else until - time.monotonic()


def _still_pending(lease: Lease, pending: _Pending) -> SidecarRpcError:
    return error(
        grpc.StatusCode.UNAVAILABLE,
        "the Work API has not confirmed the stop yet; the sidecar keeps asking and ends the lease when it does "
        "(StopWork again waits for the same stop)",
        "STOP_PENDING",
        {"work_id": lease.work_id, "force": str(pending.force).lower()},
    )


def _doubtful_stop_answer(exc: APIStatusError | ResponseError) -> bool:
    """A stop answer to check by reading the item: one that does not parse, or a 4xx but 404 and 429."""
    if isinstance(exc, ResponseError):
        return True
    return 400 <= exc.status_code < 500 and exc.status_code not in (404, 429)


def _retrieved(outcome: asyncio.Future[Work]) -> None:
    """Mark a pending stop's error as seen: nobody may be waiting for it (it was logged)."""
    if not outcome.cancelled():
        outcome.exception()


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
