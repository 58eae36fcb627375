"""Is a lease's sandbox still there? A lease lives while its sandbox does.

A sandbox is present for a lease while its WatchWork stream is open, or while KeepAlive pinged the lease
within `liveness_window`. Once absent, the lease waits `reattach_grace` for a KeepAlive with its token (the
sandbox re-attaching), then it is released, unless a stop the sandbox asked for is still going on (`Stops`): a
release would requeue work the sandbox finished, so the lease waits for the stop (checked every `STOP_RECHECK`
seconds). While the sidecar drains there is no grace: the pod is going
away, nothing is assigned again, and a lease nobody holds would only keep the drain (and the exit) waiting.
The state kept per lease (last ping, absent since, one timer) is this module's own: it never writes a lease's
fields.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from ...work.v1 import work_service_pb2 as pb
from ._lease import Lease, Leases
from ._leaser import Leaser
from ._policy import LeasePolicy
from ._stops import Stops

log = logging.getLogger("sidecar.liveness")

STOP_RECHECK = 1.0
"""Seconds between looks at a gone sandbox's lease whose stop is still being asked."""


@dataclass(slots=True)
class _Presence:
    last_ping: float | None = None
    absent_since: float | None = None
    timer: asyncio.TimerHandle | None = None


class Liveness:
    def __init__(self, policy: LeasePolicy, leases: Leases, leaser: Leaser, stops: Stops) -> None:
        self._policy = policy
        self._leases = leases
        self._leaser = leaser
        self._stops = stops
        self._presence: dict[Lease, _Presence] = {}
        self._draining = False

    def ping(self, lease: Lease) -> None:
        """A KeepAlive ping for a live lease."""
        if lease.ended:
            return
        self._of(lease).last_ping = time.monotonic()
        self.check(lease)

    def adopted(self, lease: Lease) -> None:
        """A lease adopted after a restart: absent until its sandbox re-attaches, the grace starting now (the
        adoption logs one line for all of them)."""
        presence = self._of(lease)
        presence.absent_since = time.monotonic()
        presence.timer = asyncio.get_running_loop().call_later(self._policy.reattach_grace + 0.01, self.check, lease)

    def start_drain(self) -> None:
        """The sidecar drains: a lease whose sandbox is gone (now or later) is released at once. A sandbox that
        is still there (its stream open, or KeepAlive pinging) keeps its lease until it stops the item or the
        drain timeout passes, as before."""
        self._draining = True
        for lease, presence in list(self._presence.items()):
            if presence.absent_since is not None:
                self.check(lease)

    def watcher_closed(self, work_ids: set[str]) -> None:
        for work_id in list(work_ids):
            lease = self._leases.get(work_id)
            if lease is not None:
                self.check(lease)

    def ended(self, lease: Lease) -> None:
        presence = self._presence.pop(lease, None)
        if presence is not None and presence.timer is not None:
            presence.timer.cancel()

    def _of(self, lease: Lease) -> _Presence:
        presence = self._presence.get(lease)
        if presence is None:
            presence = self._presence[lease] = _Presence()
        return presence

    def _watched(self, lease: Lease) -> bool:
        return lease.watcher is not None and not lease.watcher.closed

    def check(self, lease: Lease) -> None:
        if lease.ended:
            self.ended(lease)
            return
        presence = self._of(lease)
        if presence.timer is not None:
            presence.timer.cancel()
            presence.timer = None
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        window = self._policy.liveness_window
        pinged = presence.last_ping is not None and now - presence.last_ping <= window
        if self._watched(lease) or pinged:
            if presence.absent_since is not None:
                log.info("sandbox re-attached", extra={"work_id": lease.work_id})
            presence.absent_since = None
            if not self._watched(lease):
                assert presence.last_ping is not None
                due = presence.last_ping + window - now
                presence.timer = loop.call_later(max(due, 0) + 0.01, self.check, lease)
            return
        if presence.absent_since is None:
            presence.absent_since = now
            if self._draining:
                log.info("sandbox gone while draining; releasing its lease", extra={"work_id": lease.work_id})
            else:
                # routine (a sandbox that closes its watch and keeps the lease with KeepAlive); a release warns
                log.info(
                    "sandbox gone; waiting for it to re-attach",
                    extra={"work_id": lease.work_id, "grace_seconds": self._policy.reattach_grace},
                )
        grace = 0.0 if self._draining else self._policy.reattach_grace
        remaining = presence.absent_since + grace - now
        if remaining > 0:
            presence.timer = loop.call_later(remaining + 0.01, self.check, lease)
            return
        if self._stops.pending(lease):  # the stop ends the lease; until then it is renewed, not released
            presence.timer = loop.call_later(STOP_RECHECK, self.check, lease)
            return
        self.ended(lease)
        self._leaser.spawn_release(
            lease,
            pb.LEASE_LOST_REASON_SANDBOX_GONE,
            "the sandbox left while the sidecar drained"
            if self._draining
            else "the sandbox did not re-attach within the grace period",
        )

    def close(self) -> None:
        """Cancel every grace timer (the sidecar is closing)."""
        for presence in self._presence.values():
            if presence.timer is not None:
                presence.timer.cancel()
        self._presence.clear()

    # -- LeaseObserver: forget a lease when it ends -------------------------------------------------

    def claimed(self, lease: Lease) -> None:
        pass

    def assigned(self, lease: Lease) -> None:
        pass

    def renewed(self, lease: Lease, result: object) -> None:
        pass

    def stop_requested(self, lease: Lease) -> None:
        pass
