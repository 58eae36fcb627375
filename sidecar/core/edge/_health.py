"""What gRPC health (grpc.health.v1) says, and why.

- **Readiness**: service `""` and `sidecar.work.v1.WorkService`. SERVING while the sidecar serves and the Work
  API answers; NOT_SERVING while draining, while the Work API has not answered yet since the start, while every
  poll has failed for `unready_after` seconds (the API unreachable, the key revoked, the environment gone): a
  sandbox routed elsewhere would fare better, and while the lease journal (`--state-dir`) cannot be written: the
  sidecar takes no new work then (see `persistence.Journal.accepting`). It turns SERVING again once none of these
  holds. Each reason has a name, logged when readiness changes: `draining`, `work_api_unreached`,
  `work_api_failing`, `journal_unwritable`.
- **Liveness**: service `liveness`. NOT_SERVING only when the sidecar's own loops are dead (a supervised loop
  crashed again and again, see `_supervisor.py`). A Work API outage never fails liveness: a restart would
  cost every lease the sidecar holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

log = logging.getLogger("sidecar.health")

LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    def __init__(
        self,
        servicer: HealthServicer,
        readiness_services: tuple[str, ...],
        *,
        failing_since: Callable[[], float | None],
        alive: Callable[[], bool],
        unready_after: float,
        journal_writable: Callable[[], bool] = lambda: True,
        interval: float = 1.0,
    ) -> None:
        self._servicer = servicer
        self._readiness = readiness_services
        self._failing_since = failing_since
        self._alive = alive
        self._unready_after = unready_after
        self._journal_writable = journal_writable
        self._interval = interval
        self._ready: bool | None = None
        self._live: bool | None = None
        self.draining = False
        self.work_api_unreached = False

    @property
    def ready(self) -> bool:
        """What readiness said last (False before the first update)."""
        return bool(self._ready)

    def unready_reasons(self) -> list[str]:
        """Why readiness is NOT_SERVING (empty: SERVING)."""
        since = self._failing_since()
        reasons = {
            "draining": self.draining,
            "work_api_unreached": self.work_api_unreached,
            "work_api_failing": since is not None and time.monotonic() - since >= self._unready_after,
            "journal_unwritable": not self._journal_writable(),
        }
        return [name for name, applies in reasons.items() if applies]

    async def update(self) -> None:
        reasons = self.unready_reasons()
        ready = not reasons
        if ready != self._ready:
            if self._ready is not None or not ready:
                log.log(
                    logging.INFO if ready else logging.WARNING,
                    "readiness changed",
                    extra={"ready": ready, "reasons": reasons},
                )
            self._ready = ready
            for service in self._readiness:
                await self._servicer.set(service, SERVING if ready else NOT_SERVING)
        live = self._alive()
        if live != self._live:
            if not live:
                log.error("liveness failing: a loop of the sidecar keeps crashing")
            self._live = live
            await self._servicer.set(LIVENESS, SERVING if live else NOT_SERVING)

    async def run(self) -> None:
        while True:
            await self.update()
            await asyncio.sleep(self._interval)
