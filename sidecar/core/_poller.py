"""Demand-driven polling: poll → reserve a watcher's slot → hand the item over (`_handover.py`).

- No free capacity (no watcher, or all full): no poll at all.
- Free capacity: one long poll (`block_ms` near the maximum) per environment, however many sandboxes
  wait, so idle API traffic does not grow with them. While polls keep returning items and capacity is
  free, extra pollers join (up to `max_pollers`, never more polls than free slots); a poller that comes
  back empty leaves, so it falls back to one when the queue is empty.
- An item is handed over only after a watcher with a free slot has been chosen and reserved; if none is
  left when the poll returns (a sandbox went away meanwhile), the item waits `unclaimed_wait` for a slot (a
  sandbox that reconnects at once gets it), and is then left unacked for the Work API to reclaim.
- The loop whose poll returned the item does the hand-over itself (ack, claim, WorkAssigned), in its own task:
  no task switch between the poll's answer and the ack. A successor loop takes over its place (and its count
  and supervision) and polls once the item is handed over, so no poll queues ahead of the ack or the claim.
- A failed poll waits `PollPolicy`'s backoff (exponential, capped; longer for errors that will not heal by
  themselves, such as a revoked key) before the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from ..workapi import Work, WorkApiClient, WorkApiError, is_retryable
from . import _telemetry as telemetry
from ._dispatcher import Dispatcher, Watcher
from ._doubt import exclusive_until
from ._handover import HandOver
from ._policy import PollPolicy
from ._supervisor import Supervisor

log = logging.getLogger("sidecar.poller")

HAND_OVER_WAIT = 2.0
"""Seconds a poll loop waits, before it polls again, for the item it just polled to be handed over (ack, claim,
WorkAssigned queued) or for the ack or a claim attempt to fail."""


class Poller:
    def __init__(
        self,
        client: WorkApiClient,
        policy: PollPolicy,
        dispatcher: Dispatcher,
        handover: HandOver,
        *,
        supervisor: Supervisor,
    ) -> None:
        self._supervisor = supervisor
        self._client = client
        self._policy = policy
        self._dispatcher = dispatcher
        self._handover = handover
        self._polls_in_flight = 0
        self._failures = 0
        self.failing_since: float | None = None
        """time.monotonic() of the first failure of the current run of failed polls (None: the last one worked)."""
        self._pollers = 0
        self._poll_returned = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        """The poll loops (a loop that turned into a hand-over is not one any more: `stop` lets it finish)."""
        self._stopped = False

    @property
    def polls_in_flight(self) -> int:
        return self._polls_in_flight

    def start(self) -> None:
        self._start_poller(primary=True)

    async def stop(self) -> None:
        """Stop polling at once (in-flight polls are cancelled: what they would return is not acked). Hand-overs
        under way go on."""
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start_poller(self, *, primary: bool) -> None:
        # Counted from the spawn to the task's end, not from when it first runs: two loops deciding in the same
        # tick would otherwise both see room for one more and exceed max_pollers.
        self._pollers += 1
        self._spawn_poller(primary, None)

    def _spawn_poller(self, primary: bool, after: asyncio.Event | None) -> None:
        """A poll loop already counted in `_pollers`; with `after`, it polls once that is set (a successor)."""
        if self._stopped:
            self._pollers -= 1
            return
        if primary:  # the one poll loop that must always run: restarted if it ever fails
            task = self._supervisor.keep(lambda: self._poll_loop(primary=True, after=after), name="poll loop")
        else:
            task = self._supervisor.spawn(self._poll_loop(primary=False, after=after), name="extra poller")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._poller_done)

    def _poller_done(self, _task: asyncio.Task[None]) -> None:
        self._pollers -= 1

    async def _poll_loop(self, *, primary: bool, after: asyncio.Event | None = None) -> None:
        if after is not None:
            await self._take_over(after)
        while not self._dispatcher.draining:
            if primary:
                await self._wait_for_unpolled_capacity()
                if self._dispatcher.draining:
                    return
            elif self._dispatcher.free_capacity() <= self._polls_in_flight:
                return
            polled_at = time.monotonic()
            work = await self._poll_once()
            if work is None:
                if not primary:
                    return
                if self._policy.idle_poll_gap > 0 and not self._failures:
                    await asyncio.sleep(self._policy.idle_poll_gap)
                continue
            if self._dispatcher.draining:
                log.info("draining: not acking a polled item; the Work API will reclaim it", extra={"work_id": work.id})
                return
            returned_at = time.monotonic()
            if work.data.is_healthcheck:
                self._handover.start_healthcheck(work)
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
            exclusive = exclusive_until(polled_at, self._policy.reclaim_older_than_ms)
            await self._hand_over_here(work, watcher, returned_at, primary=primary, exclusive_until=exclusive)
            return

    async def _take_over(self, handed: asyncio.Event) -> None:
        """A successor waits for its predecessor's item to be handed over; then, while items keep coming and
        capacity is free, one more poller joins."""
        if not handed.is_set():
            # A timer that sets the event, not an asyncio.timeout: this runs once per item (issue #13).
            timer = asyncio.get_running_loop().call_later(HAND_OVER_WAIT, handed.set)
            try:
                await handed.wait()
            finally:
                timer.cancel()
        if self._pollers < self._policy.max_pollers and (self._dispatcher.free_capacity() > self._polls_in_flight):
            self._start_poller(primary=False)

    async def _hand_over_here(
        self, work: Work, watcher: Watcher, returned_at: float, *, primary: bool, exclusive_until: float | None = None
    ) -> None:
        """Turn this poll loop into the item's hand-over. Its successor (counted in its place, and the primary if
        this was) is started once the ack is on its way (`call_soon` runs when this task first waits on the
        network) and polls once `handed` is set: WorkAssigned queued, the ack or a claim attempt failed, or
        `HAND_OVER_WAIT` passed (a hang holds intake no longer). So no poll goes out before the ack and the claim,
        and neither they, the handling of their answers nor the stream write queue behind polls."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.discard(task)  # no longer a poll loop: `stop` must not cancel a hand-over
            task.remove_done_callback(self._poller_done)  # its count goes to the successor
            task.remove_done_callback(self._tasks.discard)
        handed = asyncio.Event()
        asyncio.get_running_loop().call_soon(self._spawn_poller, primary, handed)
        # Crashes are logged here, as for any one-shot task: a primary's supervisor must not restart it (its
        # successor is the primary now).
        await self._supervisor.run(
            self._handover.take(work, watcher, returned_at=returned_at, handed=handed, exclusive_until=exclusive_until),
            name="hand-over",
        )

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
        if self._policy.unclaimed_wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._policy.unclaimed_wait):
                    await self._dispatcher.wait_for_capacity()
        return self._dispatcher.reserve()

    async def _poll_once(self) -> Work | None:
        self._polls_in_flight += 1
        try:
            work = await self._client.poll(
                block_ms=self._policy.block_ms, reclaim_older_than_ms=self._policy.reclaim_older_than_ms
            )
        except WorkApiError as exc:
            telemetry.polls.add(1, {"result": "error"})
            self._failures += 1
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            backoff = self._policy.transient_backoff if is_retryable(exc, "poll") else self._policy.final_backoff
            delay = backoff.delay(self._failures)
            log.error("poll failed", extra={"error": str(exc), "failures": self._failures, "retry_in": round(delay, 2)})
            await asyncio.sleep(delay)
            return None
        finally:
            self._polls_in_flight -= 1
            self._poll_returned.set()
        self._failures = 0
        self.failing_since = None
        telemetry.polls.add(1, {"result": "empty" if work is None else "item"})
        return work
