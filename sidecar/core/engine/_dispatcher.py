"""Watchers (open WatchWork streams), their capacity, and fair choice among them.

Capacity is the sum over open watchers of `max_in_flight - held - reserved` (for a watcher with `max_items`,
no more than `max_items - given - reserved`). A watcher is *reserved*
for an item from the moment the poller picks it until the item is assigned or dropped, so parallel
polls never promise the same slot twice. Choice is fair: the least loaded watcher (held/max) wins,
ties go to the one that waited longest since its last assignment.

The dispatcher also observes the leases (it is a `LeaseObserver`): a lease that ends frees its watcher's
slot and, when the sandbox does not know yet, sends it `LeaseLost`; a stop request sends `StopRequested`.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ...work.v1 import work_service_pb2 as pb

if TYPE_CHECKING:
    from ...workapi import HeartbeatResult
    from ._lease import Lease

SILENT_REASONS = frozenset({pb.LEASE_LOST_REASON_UNSPECIFIED, pb.LEASE_LOST_REASON_SANDBOX_GONE})
"""Ends the sandbox is not told about with LeaseLost: a plain stop (it asked for it) and its own absence."""


@dataclass(eq=False, slots=True)
class Watcher:
    id: int
    sandbox_id: str
    max_in_flight: int
    queue: asyncio.Queue[pb.WatchWorkResponse | None] = field(default_factory=asyncio.Queue)
    held: set[str] = field(default_factory=set)
    reserved: int = 0
    closed: bool = False
    last_assigned: int = 0
    max_items: int = 0
    """Items this watcher is given in all (0: no limit)."""
    given: int = 0

    @property
    def free(self) -> int:
        if self.closed:
            return 0
        free = self.max_in_flight - len(self.held) - self.reserved
        if self.max_items:
            free = min(free, self.max_items - self.given - self.reserved)
        return max(0, free)

    @property
    def load(self) -> float:
        return (len(self.held) + self.reserved) / self.max_in_flight


class Dispatcher:
    def __init__(self) -> None:
        self._watchers: dict[int, Watcher] = {}
        self._ids = itertools.count(1)
        self._assignments = itertools.count(1)
        self._capacity = asyncio.Event()
        self._free = 0
        """The sum of every open watcher's `free`, kept up to date by each change below (read once per poll, per
        reservation and per stats call: no walk over all watchers)."""
        self.draining = False

    # -- watchers -----------------------------------------------------------------------------------

    def add_watcher(self, sandbox_id: str, max_in_flight: int, max_items: int = 0) -> Watcher:
        watcher = Watcher(
            id=next(self._ids), sandbox_id=sandbox_id, max_in_flight=max(1, max_in_flight), max_items=max_items
        )
        self._watchers[watcher.id] = watcher
        self._free += watcher.free
        self._update()
        return watcher

    def close_watcher(self, watcher: Watcher) -> list[pb.WorkAssigned]:
        """Mark the watcher gone; return the assignments that were queued but never written."""
        if self._watchers.pop(watcher.id, None) is not None:
            self._free -= watcher.free
        watcher.closed = True
        unsent: list[pb.WorkAssigned] = []
        while not watcher.queue.empty():
            message = watcher.queue.get_nowait()
            if message is not None and message.HasField("work_assigned"):
                unsent.append(message.work_assigned)
        self._update()
        return unsent

    @property
    def watchers(self) -> list[Watcher]:
        return list(self._watchers.values())

    def free_capacity(self) -> int:
        return 0 if self.draining else self._free

    async def wait_for_capacity(self) -> None:
        """Return once some watcher has a free slot, or the sidecar drains."""
        while not self.draining and self.free_capacity() == 0:
            self._capacity.clear()
            await self._capacity.wait()

    # -- slots --------------------------------------------------------------------------------------

    def reserve(self) -> Watcher | None:
        """Pick the fairest watcher with a free slot and hold that slot; None when there is none."""
        if self.draining or not self._free:
            return None
        best: Watcher | None = None
        for watcher in self._watchers.values():
            if watcher.free <= 0:
                continue
            if best is None or (watcher.load, watcher.last_assigned) < (best.load, best.last_assigned):
                best = watcher
        if best is not None:
            before = best.free
            best.reserved += 1
            best.last_assigned = next(self._assignments)
            self._changed(best, before)
        return best

    def unreserve(self, watcher: Watcher) -> None:
        before = watcher.free
        watcher.reserved = max(0, watcher.reserved - 1)
        self._changed(watcher, before)

    def assign(self, watcher: Watcher, work_id: str, event: pb.WatchWorkResponse) -> None:
        """Turn the watcher's reservation into a held lease and queue the assignment (a `work_assigned` event)."""
        before = watcher.free
        watcher.reserved = max(0, watcher.reserved - 1)
        watcher.held.add(work_id)
        watcher.given += 1
        watcher.queue.put_nowait(event)
        self._changed(watcher, before)

    def attach(self, watcher: Watcher, work_id: str) -> None:
        """A lease the sandbox already holds is held by this watcher again (WatchWork resume): it takes a slot
        and counts as given (towards `max_items`)."""
        before = watcher.free
        if work_id not in watcher.held:
            watcher.held.add(work_id)
            watcher.given += 1
        self._changed(watcher, before)

    def release(self, watcher: Watcher, work_id: str) -> None:
        before = watcher.free
        watcher.held.discard(work_id)
        self._changed(watcher, before)

    def send(self, watcher: Watcher, event: pb.WatchWorkResponse) -> None:
        if not watcher.closed:
            watcher.queue.put_nowait(event)

    # -- lease transitions (LeaseObserver) ----------------------------------------------------------------

    def claimed(self, lease: Lease) -> None:
        pass

    def assigned(self, lease: Lease) -> None:
        pass

    def renewed(self, lease: Lease, result: HeartbeatResult) -> None:
        pass

    def stop_requested(self, lease: Lease) -> None:
        if lease.watcher is not None and not lease.stop_notified:
            event = pb.StopRequested(work_id=lease.work_id)
            event.requested_at.GetCurrentTime()
            self.send(lease.watcher, pb.WatchWorkResponse(stop_requested=event))

    def ended(self, lease: Lease) -> None:
        watcher = lease.watcher
        if watcher is None:
            return
        if lease.lost_reason not in SILENT_REASONS:
            event = pb.LeaseLost(work_id=lease.work_id, reason=lease.lost_reason, message=lease.lost_message)  # type: ignore[arg-type]
            self.send(watcher, pb.WatchWorkResponse(lease_lost=event))
        self.release(watcher, lease.work_id)
        self.finish_watcher_if_idle(watcher)

    # -- drain --------------------------------------------------------------------------------------

    def start_drain(self, notice: pb.Draining) -> None:
        """No more assignments; tell every watcher; end the streams of watchers that hold nothing."""
        self.draining = True
        for watcher in self._watchers.values():
            self.send(watcher, pb.WatchWorkResponse(draining=notice))
            self.finish_watcher_if_idle(watcher)
        self._capacity.set()

    def finish_watcher_if_idle(self, watcher: Watcher) -> None:
        """While draining, end a watcher's stream once it holds nothing more."""
        if self.draining and not watcher.held and not watcher.reserved and not watcher.closed:
            watcher.queue.put_nowait(None)

    def end_all(self) -> None:
        for watcher in self._watchers.values():
            watcher.queue.put_nowait(None)

    def _changed(self, watcher: Watcher, before: int) -> None:
        """`watcher`'s slots changed (it had `before` free): keep the total, wake those waiting for capacity."""
        self._free += watcher.free - before  # a closed watcher's `free` is 0 before and after: no change
        self._update()

    def _update(self) -> None:
        if self.draining or self.free_capacity() > 0:
            self._capacity.set()
        else:
            self._capacity.clear()
