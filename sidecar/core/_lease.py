"""A lease the sidecar holds for a sandbox, and the table of leases with token checks.

The sidecar is the only holder of a lease towards the Work API; the sandbox holds a `lease_token`, a
random capability that authorizes calls on that one item. Ended leases leave a tombstone for a while,
so a sandbox that re-attaches late learns how its lease ended instead of getting a bare error.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from ..work.v1 import work_service_pb2 as pb
from ..workapi import Work, WorkSecret
from ._convert import timestamp

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from ._dispatcher import Watcher

ENDED_STATES = (pb.LEASE_STATE_LOST, pb.LEASE_STATE_STOPPED)


@dataclass(eq=False, slots=True)
class Lease:
    work: Work
    token: str = field(repr=False)
    secret: WorkSecret | None = field(repr=False)
    last_heartbeat: str = field(repr=False)
    ttl_seconds: int
    last_success: float
    """time.monotonic() when the last successful heartbeat was *sent* (conservative for fencing)."""
    expires_at: datetime
    watcher: Watcher | None = None
    state: int = pb.LEASE_STATE_ACTIVE
    lost_reason: int = pb.LEASE_LOST_REASON_UNSPECIFIED
    lost_message: str = ""
    subscribers: set[asyncio.Queue[Any]] = field(default_factory=set)
    last_ping: float | None = None
    orphaned_since: float | None = None
    liveness_timer: asyncio.TimerHandle | None = None
    stop_notified: bool = False
    span: Span | None = None
    sandbox_id: str = ""
    assigned_at: float = field(default_factory=time.monotonic)

    @property
    def work_id(self) -> str:
        return self.work.id

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    def renewed(self, last_heartbeat: str, ttl_seconds: int, sent_at: float) -> None:
        self.last_heartbeat = last_heartbeat
        if ttl_seconds > 0:
            self.ttl_seconds = ttl_seconds
        self.last_success = sent_at
        self.expires_at = datetime.now(UTC) + timedelta(seconds=self.ttl_seconds - (time.monotonic() - sent_at))

    def status(self) -> pb.Lease:
        message = pb.Lease(
            work_id=self.work.id,
            state=self.state,  # type: ignore[arg-type]
            last_heartbeat=self.last_heartbeat,
            ttl_seconds=max(self.ttl_seconds, 0),
            lost_reason=self.lost_reason,  # type: ignore[arg-type]
        )
        if not self.ended:
            ts = timestamp(self.expires_at)
            if ts is not None:
                message.expires_at.CopyFrom(ts)
        return message

    def publish(self) -> None:
        """Push the current status to every KeepAlive stream that follows this lease."""
        response = pb.KeepAliveResponse(lease=self.status())
        for queue in self.subscribers:
            queue.put_nowait(response)


class LeaseTable:
    """Live leases by work id, and tombstones of ended ones (bounded, oldest dropped first)."""

    def __init__(self, tombstones: int = 10_000) -> None:
        self._live: dict[str, Lease] = {}
        self._ended: OrderedDict[str, Lease] = OrderedDict()
        self._tombstones = tombstones

    @staticmethod
    def new_token() -> str:
        return secrets.token_urlsafe(24)

    def add(self, lease: Lease) -> None:
        self._live[lease.work_id] = lease
        self._ended.pop(lease.work_id, None)

    def remove(self, lease: Lease) -> None:
        if self._live.get(lease.work_id) is lease:
            del self._live[lease.work_id]
        self._ended[lease.work_id] = lease
        self._ended.move_to_end(lease.work_id)
        while len(self._ended) > self._tombstones:
            self._ended.popitem(last=False)

    def authorize(self, work_id: str, token: str) -> Lease | None:
        """The lease (live or ended) if `token` is its token; None otherwise (unknown id or wrong token)."""
        lease = self._live.get(work_id) or self._ended.get(work_id)
        # Compare bytes: compare_digest refuses non-ASCII str, and a sandbox may send anything.
        if lease is None or not token or not hmac.compare_digest(lease.token.encode(), token.encode()):
            return None
        return lease

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._live.values()))

    def get(self, work_id: str) -> Lease | None:
        return self._live.get(work_id)
