"""The lease state machine: one owner (`Leases`) for every lease the sidecar holds.

The sidecar is the only holder of a lease towards the Work API; the sandbox holds a `lease_token`, a
capability that authorizes calls on that one item (`_tokens.TokenIssuer`: a MAC over the work id and a random
nonce, so a sidecar restarted with the same `--state-dir` recomputes the tokens of the leases it adopts).

    claimed ──assign──▶ assigned ──renewed──▶ …            (ACTIVE)
    adopted ──┘  (from the journal of a crashed predecessor, `adopt`; `bury` for one found ended)
       │                   │
       │                   └──request_stop──▶ STOP_REQUESTED
       └───────────────────┴──────end(reason)──▶ STOPPED | LOST   (final)

Invariants, enforced here and nowhere else:
- a lease is in the table exactly while it is held: `claim` puts it there, `end` takes it out;
- an ended lease never renews, never changes state again and never re-enters the table: a new claim of the
  same item makes a new lease with a new token (and ends a stale one still held under that id);
- only this module assigns a `Lease`'s fields (a test checks the source for it).

Every transition is reported to the observers (`LeaseObserver`): `_telemetry.TelemetryObserver` turns them into
metrics, span events and log lines, `_dispatcher.Dispatcher` tells the sandbox's WatchWork stream, `_liveness.Liveness`
starts and stops the wait for a gone sandbox and, with a state dir, `_journal.Journal` writes them to disk.
KeepAlive streams follow a lease through `subscribe`. Ended leases leave a tombstone for a while, so a
sandbox that re-attaches late learns how its lease ended instead of getting a bare error.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol

from ...work.v1 import work_service_pb2 as pb
from ...workapi import HeartbeatResult, Work, WorkSecret
from ..edge._convert import fill_timestamp
from ..persistence._tokens import TokenIssuer

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from ._dispatcher import Watcher

ENDED_STATES = (pb.LEASE_STATE_LOST, pb.LEASE_STATE_STOPPED)
UNSPECIFIED = pb.LEASE_LOST_REASON_UNSPECIFIED


@dataclass(eq=False, slots=True)
class Lease:
    """One held (or ended) lease. Read its fields anywhere; change them only through `Leases`."""

    work: Work
    token: str = field(repr=False)
    secret: WorkSecret | None = field(repr=False)
    last_heartbeat: str = field(repr=False)
    """The compare-and-swap value: echoed exactly in the next heartbeat."""
    ttl_seconds: int
    last_success: float
    """time.monotonic() when the last successful heartbeat was *sent* (conservative for fencing)."""
    expires_at: datetime
    span: Span | None = None
    watcher: Watcher | None = None
    sandbox_id: str = ""
    state: int = pb.LEASE_STATE_ACTIVE
    lost_reason: int = UNSPECIFIED
    lost_message: str = ""
    stop_notified: bool = False
    """The sandbox knows a stop was requested (it was told, or it asked for the stop itself)."""
    claimed_at: float = field(default_factory=time.monotonic)
    nonce: str = field(default="", repr=False)
    """The token's nonce (the journal keeps it; the token is recomputed from it with the key)."""
    adopted: bool = False
    """Taken over from the journal of a crashed predecessor (not claimed by this process)."""
    doubtful_since: float | None = None
    """time.monotonic() when a heartbeat whose outcome is unknown was sent (it may have moved the CAS value at the
    Work API): a refusal of a later renewal is settled by reading (`_doubt.settle`). None once a renewal succeeds."""
    cas_read: bool = False
    """`last_heartbeat` was adopted from a GET (`latest_heartbeat_at`), which may not be the CAS value's exact
    string: the lease stays doubtful until a renewal succeeds."""

    @property
    def work_id(self) -> str:
        return self.work.id

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    @property
    def expires(self) -> float:
        """The monotonic instant from which someone else may hold the item: a whole TTL after the last
        successful heartbeat was sent (the Work API started counting later than that)."""
        return self.last_success + self.ttl_seconds

    def status(self) -> pb.Lease:
        return self.fill_status(pb.Lease())

    def fill_status(self, target: pb.Lease) -> pb.Lease:
        """Fill an empty `pb.Lease` (a field of the message being built) with this lease's status."""
        target.work_id = self.work.id
        target.state = self.state  # type: ignore[assignment]
        target.last_heartbeat = self.last_heartbeat
        target.ttl_seconds = min(max(self.ttl_seconds, 0), 2**31 - 1)
        target.lost_reason = self.lost_reason  # type: ignore[assignment]
        if not self.ended:
            fill_timestamp(target.expires_at, self.expires_at)
        return target


class Follower(Protocol):
    """Something that follows a lease's status (a KeepAlive stream's outbound feed)."""

    def put_nowait(self, response: pb.KeepAliveResponse) -> None: ...


class LeaseObserver(Protocol):
    """Hears every transition, after it happened. Observers must not raise."""

    def claimed(self, lease: Lease) -> None: ...
    def assigned(self, lease: Lease) -> None: ...
    def renewed(self, lease: Lease, result: HeartbeatResult) -> None: ...
    def stop_requested(self, lease: Lease) -> None: ...
    def ended(self, lease: Lease) -> None: ...


class LeaseTable:
    """Live leases by work id, and tombstones of ended ones (bounded, oldest dropped first)."""

    def __init__(self, tombstones: int = 10_000) -> None:
        self._live: dict[str, Lease] = {}
        self._ended: OrderedDict[str, Lease] = OrderedDict()
        self._tombstones = tombstones

    def _add(self, lease: Lease) -> None:
        self._live[lease.work_id] = lease
        self._ended.pop(lease.work_id, None)

    def _remove(self, lease: Lease) -> None:
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

    def get(self, work_id: str) -> Lease | None:
        return self._live.get(work_id)

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Lease]:
        return iter(list(self._live.values()))


class Leases:
    """The owner of every lease: the table, the transitions, the KeepAlive subscribers."""

    def __init__(
        self,
        observers: Sequence[LeaseObserver] = (),
        table: LeaseTable | None = None,
        *,
        tokens: TokenIssuer | None = None,
    ) -> None:
        self.table = table or LeaseTable()
        self.tokens = tokens or TokenIssuer.ephemeral()
        self._observers = list(observers)
        self._subscribers: dict[Lease, set[Follower]] = {}
        self._all_ended = asyncio.Event()
        self._all_ended.set()

    def observe(self, observer: LeaseObserver) -> None:
        self._observers.append(observer)

    # -- transitions --------------------------------------------------------------------------------

    def claim(
        self, work: Work, result: HeartbeatResult, *, sent_at: float, ttl_seconds: int, span: Span | None = None
    ) -> Lease:
        """The claiming heartbeat succeeded: the lease is held from now on, under a fresh token. `ttl_seconds`:
        the TTL in force (the answer's, or the one asked for when the answer names none).

        A lease still held under the same work id is stale (the Work API handed the item out again, so that
        lease expired there): it ends as lost first, so its sandbox is told and its token stops working."""
        stale = self.table.get(work.id)
        if stale is not None:
            self.end(
                stale,
                pb.LEASE_STATE_LOST,
                pb.LEASE_LOST_REASON_EXPIRED,
                "the Work API handed the item out again: this lease had expired there",
            )
        ttl = result.ttl_seconds or ttl_seconds
        token, nonce = self.tokens.issue(work.id)
        lease = Lease(
            work=work,
            token=token,
            nonce=nonce,
            secret=work.secret,
            last_heartbeat=result.last_heartbeat,
            ttl_seconds=ttl,
            last_success=sent_at,
            expires_at=_expiry(ttl, sent_at),
            span=span,
        )
        if result.state == "stopping":
            lease.state = pb.LEASE_STATE_STOP_REQUESTED
        self.table._add(lease)
        self._all_ended.clear()
        for observer in self._observers:
            observer.claimed(lease)
        return lease

    def adopt(
        self,
        work: Work,
        *,
        nonce: str,
        last_heartbeat: str,
        ttl_seconds: int,
        expires_at: datetime,
        state: int = pb.LEASE_STATE_ACTIVE,
        stop_notified: bool = False,
        sandbox_id: str = "",
    ) -> Lease:
        """Take over a lease a crashed predecessor held (from its journal), under the token it issued.

        The lease is held from now on as if its last successful heartbeat was sent a TTL before the journaled
        expiry: the next renewal (at once, by CAS from `last_heartbeat`) confirms it or ends it, and self-fencing
        counts from there. It is doubtful from that instant: the predecessor may have sent a renewal the Work API
        applied and died before it heard the answer, so a refusal of the first renewal is settled by reading
        (`_doubt.settle`), not believed. It has no watcher until its sandbox re-attaches."""
        stale = self.table.get(work.id)
        if stale is not None:
            raise ValueError(f"a lease on {work.id} is already held")
        remaining = (expires_at - datetime.now(UTC)).total_seconds()
        last_success = time.monotonic() + remaining - ttl_seconds
        lease = Lease(
            work=work,
            token=self.tokens.token(work.id, nonce),
            nonce=nonce,
            secret=None,
            last_heartbeat=last_heartbeat,
            ttl_seconds=ttl_seconds,
            last_success=last_success,
            expires_at=expires_at,
            sandbox_id=sandbox_id,
            state=pb.LEASE_STATE_STOP_REQUESTED if state == pb.LEASE_STATE_STOP_REQUESTED else pb.LEASE_STATE_ACTIVE,
            stop_notified=stop_notified,
            adopted=True,
            doubtful_since=last_success,
        )
        self.table._add(lease)
        self._all_ended.clear()
        for observer in self._observers:
            observer.claimed(lease)
        return lease

    def bury(self, work: Work, *, nonce: str, state: int, reason: int, message: str = "") -> Lease:
        """A tombstone for a lease the predecessor held that has ended (or was found ended on adoption): its
        sandbox, re-attaching with the old token, learns how it ended instead of getting a bare refusal.
        Observers are not told: this process never held it."""
        if state not in ENDED_STATES:
            raise ValueError(f"{state} is not a final lease state")
        lease = Lease(
            work=work,
            token=self.tokens.token(work.id, nonce),
            nonce=nonce,
            secret=None,
            last_heartbeat="",
            ttl_seconds=0,
            last_success=time.monotonic(),
            expires_at=datetime.now(UTC),
            state=state,
            lost_reason=reason,
            lost_message=message,
            stop_notified=True,
            adopted=True,
        )
        if self.table.get(work.id) is None:
            self.table._remove(lease)
        return lease

    def assign(self, lease: Lease, watcher: Watcher) -> None:
        """Give a held lease to a watcher (its sandbox)."""
        if lease.ended:
            raise ValueError(f"lease on {lease.work_id} has ended; it cannot be assigned")
        lease.watcher = watcher
        lease.sandbox_id = watcher.sandbox_id
        for observer in self._observers:
            observer.assigned(lease)

    def doubt(self, lease: Lease, sent_at: float) -> None:
        """A heartbeat sent at `sent_at` failed with an unknown outcome: it may have been applied."""
        if lease.doubtful_since is None:
            lease.doubtful_since = sent_at

    def renewed(self, lease: Lease, result: HeartbeatResult, *, sent_at: float, exact: bool = True) -> bool:
        """A heartbeat succeeded (or a read showed that ours did): record the new CAS value and expiry. `exact`
        False: the value was read by a GET, so the lease stays doubtful. False (nothing changes) once ended."""
        if lease.ended:
            return False
        if exact:
            lease.doubtful_since = None
            lease.cas_read = False
        else:
            lease.doubtful_since = lease.doubtful_since if lease.doubtful_since is not None else sent_at
            lease.cas_read = True
        lease.last_heartbeat = result.last_heartbeat
        if result.ttl_seconds > 0:
            lease.ttl_seconds = result.ttl_seconds
        lease.last_success = sent_at
        lease.expires_at = _expiry(lease.ttl_seconds, sent_at)
        for observer in self._observers:
            observer.renewed(lease, result)
        return True

    def update_work(self, lease: Lease, work: Work) -> None:
        """The Work API's latest view of the item (after a stop, say)."""
        lease.work = work

    def request_stop(self, lease: Lease, *, by_sandbox: bool = False) -> bool:
        """ACTIVE → STOP_REQUESTED. `by_sandbox`: the sandbox asked for it, so it is not told again."""
        if by_sandbox:
            lease.stop_notified = True
        if lease.state != pb.LEASE_STATE_ACTIVE:
            return False
        lease.state = pb.LEASE_STATE_STOP_REQUESTED
        self._publish(lease)
        for observer in self._observers:
            observer.stop_requested(lease)
        lease.stop_notified = True
        return True

    def end(self, lease: Lease, state: int, reason: int = UNSPECIFIED, message: str = "") -> bool:
        """STOPPED or LOST, for good: out of the table, subscribers told. False if it had ended already."""
        if lease.ended:
            return False
        if state not in ENDED_STATES:
            raise ValueError(f"{state} is not a final lease state")
        lease.state = state
        lease.lost_reason = reason
        lease.lost_message = message
        self.table._remove(lease)
        self._publish(lease)
        self._subscribers.pop(lease, None)
        for observer in self._observers:
            observer.ended(lease)
        if not self.table:
            self._all_ended.set()
        return True

    def lose(self, lease: Lease, reason: int, message: str) -> bool:
        return self.end(lease, pb.LEASE_STATE_LOST, reason, message)

    # -- followers ----------------------------------------------------------------------------------

    def subscribe(self, lease: Lease, queue: Follower) -> None:
        """Push every later status change of `lease` to `queue` (a KeepAlive stream)."""
        if not lease.ended:
            self._subscribers.setdefault(lease, set()).add(queue)

    def unsubscribe(self, lease: Lease, queue: Follower) -> None:
        followers = self._subscribers.get(lease)
        if followers is not None:
            followers.discard(queue)

    def _publish(self, lease: Lease) -> None:
        followers = self._subscribers.get(lease)
        if followers:
            response = pb.KeepAliveResponse(lease=lease.status())
            for queue in followers:
                queue.put_nowait(response)

    # -- queries ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.table)

    def __iter__(self) -> Iterator[Lease]:
        return iter(self.table)

    def get(self, work_id: str) -> Lease | None:
        return self.table.get(work_id)

    def authorize(self, work_id: str, token: str) -> Lease | None:
        return self.table.authorize(work_id, token)

    async def wait_all_ended(self) -> None:
        await self._all_ended.wait()


def _expiry(ttl_seconds: int, sent_at: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=ttl_seconds - (time.monotonic() - sent_at))
