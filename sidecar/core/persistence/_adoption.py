"""Adoption at start: continue the leases a crashed predecessor held (from its journal, `--state-dir`).

Called by `Sidecar.start` before the gRPC server binds and before polling starts:

- every journaled lease is adopted (`Leases.adopt`, under the token the predecessor issued) and renewed at once
  by the leaser, by CAS from the journaled `last_heartbeat`, concurrently (bounded by the leaser's heartbeat
  concurrency). The Work API decides: success → the lease is held again; 412/409 → read, as after any heartbeat
  whose outcome is unknown (the predecessor's last renewal may have landed unjournaled): `active`/`stopping` with
  a heartbeat that moved → ours, held again; anything else → lost, PRECONDITION_FAILED; 404 → gone; `stopped` →
  over; no success within what is left of its TTL → self-fenced. Ended ones leave a tombstone, so a sandbox that
  re-attaches with the old token is told LEASE_LOST;
- an adopted lease waits `reattach_grace` for its sandbox (`_liveness.Liveness`): a KeepAlive with the old token,
  or a WatchWork stream that resumes it. Not re-attached by then → released (short TTL), back to the queue;
- an item acked but not claimed at the crash is released: one claiming heartbeat (`NO_HEARTBEAT`) asking for the
  release TTL, so it is never left `starting` (412/409/404: it was not in `starting`, nothing to do). It is not
  handed to a sandbox: the journal has no `secret` for it, and re-delivery brings it back with one;
- a lease the predecessor was releasing when it died (ended with SANDBOX_GONE or DRAINED, TTL not yet over) gets
  its release heartbeat again: by CAS, so it is harmless when the first one had landed;
- other ended leases become tombstones only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ...work.v1 import work_service_pb2 as pb
from ...workapi import NO_HEARTBEAT, Work, WorkApiClient, WorkApiError, WorkData
from ..engine._lease import Leases
from ..engine._leaser import Leaser
from ..engine._liveness import Liveness
from ..engine._policy import LeasePolicy
from ..engine._supervisor import Supervisor
from ._journal import Journal
from ._records import JournaledEnd
from ._replay import Recovered

log = logging.getLogger("sidecar.adoption")

RELEASED_REASONS = frozenset({pb.LEASE_LOST_REASON_SANDBOX_GONE, pb.LEASE_LOST_REASON_DRAINED})
CHUNK = 256
"""Leases adopted between two yields to the event loop (the leaser starts renewing them meanwhile)."""
SIDE_CONCURRENCY = 32
"""Release heartbeats (acked items, interrupted releases) in flight at once."""


@dataclass(slots=True)
class AdoptionReport:
    adopted: int = 0
    tombstones: int = 0
    acked: int = 0
    releases: int = 0
    seconds: float = 0.0


class Adoption:
    def __init__(
        self,
        client: WorkApiClient,
        policy: LeasePolicy,
        leases: Leases,
        leaser: Leaser,
        liveness: Liveness,
        journal: Journal,
        *,
        supervisor: Supervisor,
    ) -> None:
        self._client = client
        self._policy = policy
        self._leases = leases
        self._leaser = leaser
        self._liveness = liveness
        self._journal = journal
        self._limit = asyncio.Semaphore(SIDE_CONCURRENCY)
        self._supervisor = supervisor

    async def adopt(self, recovered: Recovered) -> AdoptionReport:
        """Adopt everything, yielding to the event loop every `CHUNK` leases so that the renewals of the first
        ones are under way while the rest are adopted; the release heartbeats run in the background."""
        started = time.monotonic()
        report = AdoptionReport()
        environment_id = self._client.environment_id
        for end in recovered.ended:
            self._leases.bury(
                _work(end.work_id, end.data_type, end.data_id, environment_id, "stopped"),
                nonce=end.nonce,
                state=end.state,
                reason=end.reason,
                message="ended before the sidecar restarted",
            )
            report.tombstones += 1
            interrupted = not recovered.clean and end.reason in RELEASED_REASONS
            if interrupted and end.last_heartbeat and end.expires_at > time.time():
                report.releases += 1
                self._spawn(self._release(end))
        # The most urgent first: the renewals go out in this order (the leaser's heap breaks ties by arrival).
        urgent_first = sorted(recovered.leases, key=lambda journaled: journaled.expires_at)
        for count, journaled in enumerate(urgent_first, 1):
            stopping = journaled.state == pb.LEASE_STATE_STOP_REQUESTED
            lease = self._leases.adopt(
                _work(
                    journaled.work_id,
                    journaled.data_type,
                    journaled.data_id,
                    environment_id,
                    "stopping" if stopping else "active",
                ),
                nonce=journaled.nonce,
                last_heartbeat=journaled.last_heartbeat,
                ttl_seconds=journaled.ttl_seconds,
                expires_at=datetime.fromtimestamp(journaled.expires_at, UTC),
                state=journaled.state,
                stop_notified=journaled.stop_notified,
                sandbox_id=journaled.sandbox_id,
            )
            self._leaser.track(lease, at_once=True)
            self._liveness.adopted(lease)  # absent until its sandbox re-attaches: the grace starts now
            report.adopted += 1
            if count % CHUNK == 0:
                await asyncio.sleep(0)
        for work_id in recovered.acked:
            if self._leases.get(work_id) is None:
                report.acked += 1
                self._spawn(self._release_acked(work_id))
        report.seconds = time.monotonic() - started
        if report.adopted or report.tombstones or report.acked:
            log.info(
                "adopted the leases of the previous sidecar process",
                extra={
                    "leases": report.adopted,
                    "tombstones": report.tombstones,
                    "acked_unclaimed": report.acked,
                    "interrupted_releases": report.releases,
                    "reattach_grace": self._policy.reattach_grace,
                    "seconds": round(report.seconds, 3),
                },
            )
        return report

    async def _release_acked(self, work_id: str) -> None:
        """An item acked, but not claimed, when the predecessor died: claim it with a short TTL, so it is not
        left `starting` and returns to the queue soon."""
        ttl = self._policy.release_ttl_seconds or self._policy.ttl_seconds
        async with self._limit:
            try:
                await self._client.heartbeat(
                    work_id,
                    expected_last_heartbeat=NO_HEARTBEAT,
                    desired_ttl_seconds=ttl,
                    deadline=self._policy.claim_timeout,
                )
            except WorkApiError as exc:
                log.info(
                    "an item acked before the restart was not starting; nothing to release",
                    extra={"work_id": work_id, "error": str(exc)},
                )
            else:
                log.info("released an item acked but not claimed before the restart", extra={"work_id": work_id})
        self._journal.intents.settled(work_id)

    async def _release(self, end: JournaledEnd) -> None:
        ttl = self._policy.release_ttl_seconds
        if not ttl:
            return
        async with self._limit:
            try:
                await self._client.heartbeat(
                    end.work_id,
                    expected_last_heartbeat=end.last_heartbeat,
                    desired_ttl_seconds=ttl,
                    deadline=self._policy.release_timeout,
                )
            except WorkApiError:
                return  # the first release landed (412), or the item is gone: nothing more to do
        log.info("finished a release interrupted by the restart", extra={"work_id": end.work_id})

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._supervisor.spawn(coro, name="adoption release")  # the supervisor's close cancels it


def _work(work_id: str, data_type: str, data_id: str, environment_id: str, state: str) -> Work:
    """The item as far as the journal knows it (metadata and timestamps come from GetWork when asked)."""
    return Work(
        id=work_id,
        environment_id=environment_id,
        data=WorkData(type=data_type or "session", id=data_id),
        state=state,
        metadata={},
    )
