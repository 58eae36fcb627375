"""A refusal after an unknown outcome is settled by reading, never believed at once.

A heartbeat whose outcome is unknown (no answer, a timeout, a broken or untrusted answer, a 5xx that a gateway may
have put in place of the Work API's) may have been applied: the lease's compare-and-swap value moved at the Work
API, and the next heartbeat that echoes the old value is refused (412, or 409) because of our own heartbeat. So a
refusal that follows such a doubt is settled by reading the lease's state before anything reaches the sandbox. A
doubt is either a later attempt of the same client call (`WorkApiError.maybe_applied` on the refusal) or a
renewal call that failed doubtfully before this one (`Lease.doubtful_since`).

The read: the 412's `details.current_state`, else a GET of the item. Inside the fencing window nobody else can
have renewed the item (the Work API hands it to another worker only once a TTL since our last successful
heartbeat ran out, and the leaser fences the lease before that; an acked item is never handed out by a poll), so an
`active` or `stopping` item whose `last_heartbeat` moved away from the value we echoed was renewed by us: that
value (and the TTL read) is adopted and the sandbox hears nothing. Any other state (queued again, stopped, never
started) is a lost lease; for a claim, `starting` means no claim landed and it is sent again (`_handover`). A read
that fails leaves the doubt in place (`Settled.unreadable`).

A GET gives `latest_heartbeat_at`, which an API may format differently from the heartbeat's `last_heartbeat`:
that value is adopted with `exact` False, so the lease stays doubtful; when the next renewal is refused in turn,
a read naming the same instant as the value adopted (the 412's exact string for it) is the same heartbeat, ours,
and is adopted; a read that has not moved otherwise loses the lease.

The ack: an ack retried after an unknown outcome and refused (409) is settled by a GET too (`ack_settled`): the
item `starting` (acked, never heartbeated), read before any other worker could have been handed the item (the
Work API reclaims a polled item only `reclaim_older_than_ms` after the poll that delivered it), is ours.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ...workapi import (
    NO_HEARTBEAT,
    HeartbeatResult,
    LeaseSnapshot,
    PreconditionFailedError,
    WorkApiClient,
    WorkApiError,
    parse_time,
)

log = logging.getLogger("sidecar.doubt")

HELD_STATES = ("active", "stopping")
"""The states of an item whose lease someone holds."""
DEFAULT_RECLAIM_MS = 5000
"""The Work API's documented `reclaim_older_than_ms` when a poll gives none."""


@dataclass(frozen=True, slots=True)
class Settled:
    """What a read said about a refused heartbeat: `result` (ours: the lease as read, to adopt), or not ours
    (`result` None, `state` what was read), or `unreadable` (the read failed: the doubt stays)."""

    result: HeartbeatResult | None = None
    exact: bool = True
    """The result's `HeartbeatResult.last_heartbeat` is the compare-and-swap value itself (from a 412), not a GET's
    timestamp."""
    state: str = ""
    unreadable: bool = False


async def read_lease(
    client: WorkApiClient, work_id: str, refusal: WorkApiError, *, deadline: float | None = None
) -> tuple[LeaseSnapshot, bool] | None:
    """The lease's current state: the refusal's `current_state` (exact), else a GET within `deadline` seconds (not
    exact); None when the read failed."""
    if isinstance(refusal, PreconditionFailedError):
        snapshot = refusal.current_state
        if snapshot is not None and snapshot.state is not None:
            return snapshot, True
    try:
        work = await client.get(work_id, deadline=deadline)
    except WorkApiError as exc:
        log.warning("cannot read the item to settle a refused heartbeat", extra={"work_id": work_id, "error": str(exc)})
        return None
    snapshot = LeaseSnapshot(
        state=work.state,
        last_heartbeat=work.latest_heartbeat_at,
        lease_extended=None,
        ttl_seconds=None,
        lease_updated_at=work.latest_heartbeat_at,
    )
    return snapshot, False


async def settle(
    client: WorkApiClient,
    work_id: str,
    refusal: WorkApiError,
    *,
    echoed: str,
    echoed_exact: bool = True,
    deadline: float | None = None,
) -> Settled:
    """Settle a heartbeat refused after a doubt. `echoed`: the `expected_last_heartbeat` the refused heartbeat sent
    (NO_HEARTBEAT for a claim); `echoed_exact` False when it was adopted from a GET; `deadline`: seconds the read
    may take (a renewal's read ends at its lease's fencing point)."""
    read = await read_lease(client, work_id, refusal, deadline=deadline)
    if read is None:
        return Settled(unreadable=True)
    snapshot, exact = read
    state = snapshot.state or ""
    value = snapshot.last_heartbeat
    if state not in HELD_STATES or not value or value == NO_HEARTBEAT:
        return Settled(state=state)
    if not _moved(echoed, value) and (echoed_exact or not exact or not _same_instant(echoed, value)):
        return Settled(state=state)  # nobody renewed it since the value we echoed: the refusal is not our doing
    result = HeartbeatResult(
        last_heartbeat=value,
        lease_extended=True,
        state=state,
        ttl_seconds=snapshot.ttl_seconds or 0,
    )
    log.info(
        "a refused heartbeat followed one whose outcome was unknown: the read shows our own heartbeat landed",
        extra={"work_id": work_id, "state": state, "exact": exact},
    )
    return Settled(result=result, exact=exact, state=state)


def _moved(echoed: str, value: str) -> bool:
    """Whether `value` is a heartbeat other than the one `echoed` names (as strings; NO_HEARTBEAT: any value)."""
    if echoed == NO_HEARTBEAT:
        return True
    return value != echoed and not _same_instant(echoed, value)


def _same_instant(a: str, b: str) -> bool:
    when_a, when_b = parse_time(a), parse_time(b)
    return when_a is not None and when_b is not None and when_a == when_b


async def ack_settled(client: WorkApiClient, work_id: str, *, exclusive_until: float) -> bool | None:
    """An ack refused after a doubt: True when a GET shows the item `starting` (acked) before anyone else could
    have been handed it (`exclusive_until`, time.monotonic(): see `exclusive_until`), so our ack landed; False when
    it shows another state by then; None when that cannot be told (the read failed, or came too late)."""
    try:
        work = await client.get(work_id, deadline=exclusive_until - time.monotonic())
    except WorkApiError as exc:
        log.warning("cannot read the item to settle a refused ack", extra={"work_id": work_id, "error": str(exc)})
        return None
    if time.monotonic() >= exclusive_until:
        return None
    return work.state == "starting" and bool(work.acknowledged_at)


def exclusive_until(poll_sent: float, reclaim_older_than_ms: int | None) -> float:
    """The time.monotonic() instant before which nobody else can be handed an item our poll (sent at `poll_sent`)
    returned: the Work API delivers a polled, unacked item again only `reclaim_older_than_ms` after the poll that
    delivered it, and that poll was answered after it was sent."""
    reclaim = DEFAULT_RECLAIM_MS if reclaim_older_than_ms is None else reclaim_older_than_ms
    return poll_sent + reclaim / 1000
