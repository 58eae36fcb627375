"""The emulator's state: environments, their queues, work items and leases, with the Work API's rules.

Everything runs on one event loop, so there are no locks, and every operation is O(1) (list is O(log n + limit),
stats O(workers)):

- a queued item sits in `stream` (all queued items, oldest first) and in either `ready` (never polled since it was
  queued) or `pending` (polled, not acked, in poll order); a poll takes the oldest pending item whose poll is older
  than `reclaim_older_than_ms`, else the oldest ready one;
- a long poll waits on a future that an enqueue or a requeue resolves (one waiter per new item), or that a loop
  timer resolves at `block_ms` or when a pending item becomes reclaimable: no busy waiting;
- a lease is one loop timer per item. A heartbeat only moves the item's deadline; the timer, when it fires early,
  re-arms itself at the new deadline, so a heartbeat costs no timer-heap work.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..wire import (
    HEARTBEAT_PRECONDITION_FAILED,
    HEARTBEAT_TYPE,
    LEASED_STATES,
    NO_HEARTBEAT,
    QUEUE_STATS_TYPE,
    WORK_TIMESTAMPS,
    work_object,
)
from ._errors import ApiError
from ._ids import ONE_MICROSECOND, new_id, new_secret, rfc3339, utcnow
from ._settings import EmulatorSettings

__all__ = ["Environment", "Item", "MemoryStore", "decode_cursor", "encode_cursor"]

LEASED = LEASED_STATES
_EPSILON = 1e-6


@dataclass(eq=False, slots=True)
class Item:
    seq: int
    id: str
    environment_id: str
    data_type: str
    data_id: str
    created_at: str
    queued_at: str
    ttl_seconds: int
    metadata: dict[str, str] = field(default_factory=dict)
    state: str = "queued"
    acknowledged_at: str | None = None
    started_at: str | None = None
    latest_heartbeat_at: str | None = None
    stop_requested_at: str | None = None
    stopped_at: str | None = None
    secret: str | None = None
    sessions_token: str | None = None
    last_heartbeat: str | None = None
    """The compare-and-swap value: the last heartbeat's timestamp while a lease is held, else None."""
    last_stamp: datetime | None = None
    """The last heartbeat instant ever given to this item (never reset): stamps are strictly increasing."""
    polled_by: str | None = None
    polled_at: float | None = None
    acked_by: str | None = None
    holder: str | None = None
    lease_deadline: float | None = None
    timer: asyncio.TimerHandle | None = None
    timer_at: float = 0.0
    deliveries: int = 0
    heartbeats: int = 0
    requeues: int = 0

    def to_json(self, *, with_secret: bool = False) -> dict[str, Any]:
        return work_object(
            id=self.id,
            environment_id=self.environment_id,
            data={"type": self.data_type, "id": self.data_id},
            state=self.state,
            metadata=self.metadata,
            timestamps={name: getattr(self, name) for name in WORK_TIMESTAMPS},
            secret=self.secret if with_secret else None,
        )

    def lease_state(self) -> dict[str, Any]:
        """`details.current_state` of a 412."""
        return {
            "state": self.state,
            "last_heartbeat": self.last_heartbeat,
            "lease_extended": False,
            "ttl_seconds": self.ttl_seconds,
            "lease_updated_at": self.last_heartbeat,
        }


@dataclass(eq=False)
class Environment:
    id: str
    self_hosted: bool = True
    permitted: bool = True
    closed: bool = False
    items: dict[str, Item] = field(default_factory=dict)
    seqs: list[int] = field(default_factory=list)
    ordered: list[Item] = field(default_factory=list)
    stream: OrderedDict[str, Item] = field(default_factory=OrderedDict)
    ready: OrderedDict[str, Item] = field(default_factory=OrderedDict)
    pending: OrderedDict[str, Item] = field(default_factory=OrderedDict)
    waiters: OrderedDict[asyncio.Future[bool], None] = field(default_factory=OrderedDict)
    pollers: dict[str, float] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for item in self.items.values():
            states[item.state] = states.get(item.state, 0) + 1
        return {
            "id": self.id,
            "self_hosted": self.self_hosted,
            "permitted": self.permitted,
            "items": len(self.items),
            "states": states,
            "waiting_polls": len(self.waiters),
        }


def _resolve(waiter: asyncio.Future[bool], value: bool) -> None:
    if not waiter.done():
        waiter.set_result(value)


class MemoryStore:
    """The in-memory `Store` (see `_backend.py`): every environment and item in this process."""

    def __init__(self, settings: EmulatorSettings) -> None:
        self.settings = settings
        self.base_url = ""
        self.environments: dict[str, Environment] = {}
        self.tokens: dict[str, Item] = {}
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    # -- the loop ---------------------------------------------------------------------------------------

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve on `loop`: arm the timers of the leases that have a deadline."""
        self._loop = loop
        self._closing = False
        for env in self.environments.values():
            for item in env.items.values():
                if item.lease_deadline is not None and item.timer is None:
                    self._arm(item, max(0.0, item.lease_deadline - time.monotonic()))

    def unbind(self) -> None:
        """Stop serving: waiting polls return at once, timers are cancelled (deadlines are kept)."""
        self._closing = True
        for env in self.environments.values():
            self._notify(env, len(env.waiters))
            for item in env.items.values():
                if item.timer is not None:
                    item.timer.cancel()
                    item.timer = None
        self._loop = None

    def _running_loop(self) -> asyncio.AbstractEventLoop | None:
        if self._closing:
            return None
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                return None
        return self._loop

    # -- environments and items -------------------------------------------------------------------------

    def environment(self, environment_id: str, *, create: bool | None = None) -> Environment:
        env = self.environments.get(environment_id)
        if env is None:
            if not (self.settings.auto_create_environments if create is None else create):
                raise ApiError(404, f"environment {environment_id} not found")
            env = self.environments[environment_id] = Environment(environment_id)
        return env

    def item(self, environment_id: str, work_id: str) -> Item:
        item = self.environment(environment_id).items.get(work_id)
        if item is None:
            raise ApiError(404, f"work item {work_id} not found in environment {environment_id}")
        return item

    def items(self, environment_id: str) -> list[Item]:
        """Every item of an existing environment, oldest first (404 when there is no such environment)."""
        return list(self.environment(environment_id, create=False).items.values())

    def item_for_token(self, token: str) -> Item | None:
        """The item whose `secret` carries this sessions token."""
        return self.tokens.get(token)

    def check_access(self, environment_id: str) -> None:
        """404 unknown (unless auto-created), 403 not permitted, 400 not self-hosted."""
        env = self.environment(environment_id)
        if not env.permitted:
            raise ApiError(403, f"this credential is not authorized for environment {environment_id}")
        if not env.self_hosted:
            raise ApiError(400, f"environment {environment_id} is not self_hosted")

    def environment_view(self, environment_id: str) -> dict[str, Any]:
        return self.environment(environment_id, create=False).view()

    def set_environment(
        self, environment_id: str, *, self_hosted: bool | None = None, permitted: bool | None = None
    ) -> dict[str, Any]:
        env = self.environment(environment_id, create=True)
        if self_hosted is not None:
            env.self_hosted = self_hosted
        if permitted is not None:
            env.permitted = permitted
        return env.view()

    def environment_count(self) -> int:
        return len(self.environments)

    def seq_of(self, environment_id: str, work_id: str) -> int | None:
        """The list position of an item (for `after_id` / `before_id`), None when it is not there."""
        item = self.environment(environment_id).items.get(work_id)
        return None if item is None else item.seq

    def enqueue(
        self, environment_id: str, count: int = 1, data_type: str = "session", metadata: dict[str, str] | None = None
    ) -> list[Item]:
        env = self.environment(environment_id, create=True)
        style = self.settings.id_style
        data_prefix = ("sess" if style == "qoder" else "sesn") if data_type == "session" else "hc"
        created = []
        for _ in range(count):
            self._seq += 1
            stamp = rfc3339(utcnow())
            item = Item(
                seq=self._seq,
                id=new_id("work", style),
                environment_id=environment_id,
                data_type=data_type,
                data_id=new_id(data_prefix, style),
                created_at=stamp,
                queued_at=stamp,
                ttl_seconds=self._clamp_ttl(self.settings.default_ttl_seconds),
                metadata=dict(metadata or {}),
            )
            env.items[item.id] = item
            env.seqs.append(item.seq)
            env.ordered.append(item)
            env.stream[item.id] = item
            env.ready[item.id] = item
            created.append(item)
        self._notify(env, count)
        return created

    def issue_secret(self, item: Item) -> str:
        """The item's `secret` (made on its first Anthropic delivery, then kept), its sessions token registered."""
        if item.secret is None:
            every = self.settings.strip_secret_padding_every
            item.secret, item.sessions_token = new_secret(self.base_url, padded=not (every and item.seq % every == 0))
            self.tokens[item.sessions_token] = item
        return item.secret

    def _clamp_ttl(self, ttl: int) -> int:
        return max(self.settings.min_ttl_seconds, min(self.settings.max_ttl_seconds, ttl))

    # -- poll -------------------------------------------------------------------------------------------

    def _notify(self, env: Environment, count: int) -> None:
        """Wake up to `count` waiting polls, oldest first."""
        while count > 0 and env.waiters:
            waiter, _ = env.waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_result(True)
                count -= 1

    def _take(self, env: Environment, worker_id: str, reclaim: float) -> Item | None:
        now = time.monotonic()
        item: Item | None = None
        if env.pending:
            head = next(iter(env.pending.values()))
            if head.polled_at is not None and now - head.polled_at >= reclaim - _EPSILON:
                item = head
                env.pending.move_to_end(head.id)
        if item is None and env.ready:
            _, item = env.ready.popitem(last=False)
            env.pending[item.id] = item
        if item is None:
            return None
        item.polled_by = worker_id
        item.polled_at = now
        item.deliveries += 1
        return item

    async def poll(
        self, environment_id: str, worker_id: str, block_ms: int | None, reclaim_ms: int | None
    ) -> Item | None:
        env = self.environment(environment_id)
        started = time.monotonic()
        if worker_id:
            env.pollers[worker_id] = started
        reclaim = (self.settings.reclaim_default_ms if reclaim_ms is None else reclaim_ms) / 1000
        item = self._take(env, worker_id, reclaim)
        if item is not None or not block_ms or self._closing:
            return item
        loop = asyncio.get_running_loop()
        deadline = started + block_ms / 1000
        while True:
            now = time.monotonic()
            if now >= deadline or env.closed or self._closing:
                return None
            wake_in = deadline - now
            if env.pending:  # wake when the oldest pending item becomes reclaimable for this poll
                head = next(iter(env.pending.values()))
                if head.polled_at is not None:
                    wake_in = min(wake_in, max(0.0, head.polled_at + reclaim - now))
            waiter: asyncio.Future[bool] = loop.create_future()
            env.waiters[waiter] = None
            timer = loop.call_later(wake_in, _resolve, waiter, False)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result():
                    self._notify(env, 1)  # this poll was woken for an item it will not take: pass it on
                raise
            finally:
                timer.cancel()
                env.waiters.pop(waiter, None)
            item = self._take(env, worker_id, reclaim)
            if item is not None:
                return item

    # -- ack, heartbeat, stop ---------------------------------------------------------------------------

    def ack(self, environment_id: str, work_id: str, worker_id: str, *, same_worker: bool) -> Item:
        item = self.item(environment_id, work_id)
        if item.state != "queued":
            raise ApiError(409, f"work item {work_id} is {item.state}: only a queued item can be acknowledged")
        if item.polled_at is None:
            raise ApiError(409, f"work item {work_id} has not been polled: poll it before acknowledging it")
        if same_worker and worker_id != item.polled_by:
            raise ApiError(409, f"work item {work_id} was polled by another worker")
        env = self.environment(environment_id)
        env.stream.pop(work_id, None)
        env.pending.pop(work_id, None)
        env.ready.pop(work_id, None)
        item.state = "starting"
        item.acknowledged_at = rfc3339(utcnow())
        item.acked_by = item.holder = worker_id
        if self.settings.reclaim_starting_after_seconds is not None:
            self._extend(item, self.settings.reclaim_starting_after_seconds)
        return item

    def heartbeat(
        self,
        environment_id: str,
        work_id: str,
        *,
        expected: str | None,
        desired_ttl: int | None,
        strict: bool,
        precondition_type: str,
    ) -> dict[str, Any]:
        """`strict`: the flavour's `strict_heartbeats` (see `_flavours.py`)."""
        item = self.item(environment_id, work_id)
        state = item.state
        if strict and state in ("queued", "stopped"):
            raise ApiError(409, f"work item {work_id} is {state} and cannot be heartbeated")
        if state == "stopped":  # Anthropic: answered, never compared, never extended
            return self._heartbeat_body(item, extended=False)
        compares = expected is not None and (
            state != "stopping" or strict or self.settings.anthropic_compare_while_stopping
        )
        if compares:
            matches = item.last_heartbeat is None if expected == NO_HEARTBEAT else expected == item.last_heartbeat
            if state == "queued" or not matches:
                raise ApiError(
                    412,
                    "expected_last_heartbeat does not match the work item's last heartbeat: "
                    "another worker holds the lease or the item went back to the queue",
                    error_type=precondition_type,
                    details={"error_code": HEARTBEAT_PRECONDITION_FAILED, "current_state": item.lease_state()},
                )
        if state == "queued":
            raise ApiError(409, f"work item {work_id} is queued: acknowledge it before heartbeating")
        ttl = self._clamp_ttl(self.settings.default_ttl_seconds if desired_ttl is None else desired_ttl)
        self._stamp(item)
        item.ttl_seconds = ttl
        item.heartbeats += 1
        if state == "starting":
            item.state = "active"
            item.started_at = item.last_heartbeat
        self._extend(item, ttl)
        return self._heartbeat_body(item, extended=True)

    @staticmethod
    def _heartbeat_body(item: Item, *, extended: bool) -> dict[str, Any]:
        return {
            "type": HEARTBEAT_TYPE,
            "last_heartbeat": item.last_heartbeat or item.latest_heartbeat_at or item.stopped_at or item.created_at,
            "lease_extended": extended,
            "state": item.state,
            "ttl_seconds": item.ttl_seconds,
        }

    @staticmethod
    def _stamp(item: Item) -> None:
        stamp = utcnow()
        if item.last_stamp is not None and stamp <= item.last_stamp:
            stamp = item.last_stamp + ONE_MICROSECOND  # strictly increasing, so the CAS stays exact
        item.last_stamp = stamp
        item.last_heartbeat = item.latest_heartbeat_at = rfc3339(stamp)

    def stop(self, environment_id: str, work_id: str, *, force: bool) -> Item:
        item = self.item(environment_id, work_id)
        state = item.state
        if state == "stopped":
            if self.settings.stop_of_stopped_conflicts:
                raise ApiError(409, f"work item {work_id} is already stopped")
            return item
        graceful_to_stopping = state == "active" or (
            state == "starting" and self.settings.graceful_stop_of_starting == "stopping"
        )
        if not force and graceful_to_stopping:
            item.state = "stopping"
            item.stop_requested_at = rfc3339(utcnow())
        else:
            self._finish(item)
        return item

    # -- leases -----------------------------------------------------------------------------------------

    def _extend(self, item: Item, seconds: float) -> None:
        item.lease_deadline = time.monotonic() + seconds
        if item.timer is None or item.timer_at > item.lease_deadline + 0.001:
            if item.timer is not None:
                item.timer.cancel()
                item.timer = None
            self._arm(item, seconds)

    def _arm(self, item: Item, delay: float) -> None:
        loop = self._running_loop()
        if loop is None:
            return  # armed by bind()
        item.timer = loop.call_later(delay, self._on_timer, item)
        item.timer_at = time.monotonic() + delay

    def _on_timer(self, item: Item) -> None:
        item.timer = None
        if item.lease_deadline is None:
            return
        remaining = item.lease_deadline - time.monotonic()
        if remaining > 0:
            self._arm(item, remaining)
            return
        self._expire(item)

    def _expire(self, item: Item) -> None:
        if item.state == "stopping" and self.settings.stopping_expiry == "stopped":
            self._finish(item)
        elif item.state in LEASED:
            self._requeue(item)

    def _drop_lease(self, item: Item) -> None:
        item.lease_deadline = None
        if item.timer is not None:
            item.timer.cancel()
            item.timer = None

    def _requeue(self, item: Item) -> None:
        env = self.environment(item.environment_id)
        self._drop_lease(item)
        item.state = "queued"
        item.last_heartbeat = None
        item.acknowledged_at = item.started_at = item.latest_heartbeat_at = item.stop_requested_at = None
        item.polled_by = item.polled_at = item.acked_by = item.holder = None
        item.requeues += 1
        item.queued_at = rfc3339(utcnow())
        env.stream[item.id] = item
        env.ready[item.id] = item
        self._notify(env, 1)

    def _finish(self, item: Item) -> None:
        env = self.environment(item.environment_id)
        self._drop_lease(item)
        now = rfc3339(utcnow())
        item.state = "stopped"
        item.stopped_at = now
        if item.stop_requested_at is None:
            item.stop_requested_at = now
        env.stream.pop(item.id, None)
        env.ready.pop(item.id, None)
        env.pending.pop(item.id, None)

    def steal(self, environment_id: str, work_id: str) -> Item:
        """Lease theft: another holder heartbeats, so the old holder's next compare-and-swap fails with 412."""
        item = self.item(environment_id, work_id)
        if item.state not in LEASED:
            raise ApiError(409, f"work item {work_id} is {item.state}: there is no lease to steal")
        self._stamp(item)
        item.holder = "<thief>"
        if item.state == "starting":
            item.state = "active"
            item.started_at = item.last_heartbeat
        self._extend(item, item.ttl_seconds)
        return item

    def expire(self, environment_id: str, work_id: str) -> Item:
        """Let the item's lease run out now (as if no heartbeat came for its TTL)."""
        item = self.item(environment_id, work_id)
        if item.state not in LEASED:
            raise ApiError(409, f"work item {work_id} is {item.state}: there is no lease to expire")
        if item.state == "starting":
            self._requeue(item)
        else:
            self._expire(item)
        return item

    # -- get, update, list, stats -------------------------------------------------------------------------

    def update(self, environment_id: str, work_id: str, patch: Any) -> Item:
        item = self.item(environment_id, work_id)
        if patch is None:
            return item
        if not isinstance(patch, dict):
            raise ApiError(400, "metadata must be an object mapping keys to strings (or null to delete a key)")
        for key, value in patch.items():
            if not key:
                raise ApiError(400, "metadata keys must be non-empty strings")
            if value is not None and not isinstance(value, str):
                raise ApiError(400, f"metadata.{key}: values must be strings (or null to delete the key)")
        for key, value in patch.items():
            if value is None:
                item.metadata.pop(key, None)
            else:
                item.metadata[key] = value
        return item

    def list_page(
        self, environment_id: str, *, limit: int, after_seq: int | None, before_seq: int | None
    ) -> tuple[list[Item], bool]:
        """One page in list order (`list_order`): items after `after_seq` (or the `limit` items just before
        `before_seq`), and whether there are more in that direction."""
        env = self.environment(environment_id)
        seqs, ordered = env.seqs, env.ordered
        newest_first = self.settings.list_order == "newest_first"
        # Window of indices (ascending seq) between the two bounds.
        lo, hi = 0, len(seqs)
        if newest_first:
            if after_seq is not None:
                hi = bisect_left(seqs, after_seq)
            if before_seq is not None:
                lo = bisect_right(seqs, before_seq)
            if before_seq is not None and after_seq is None:  # the page nearest `before`: the oldest in the window
                chosen = ordered[lo : min(hi, lo + limit)][::-1]
                return chosen, lo + limit < hi
            start = max(lo, hi - limit)
            return ordered[start:hi][::-1], start > lo
        if after_seq is not None:
            lo = bisect_right(seqs, after_seq)
        if before_seq is not None:
            hi = bisect_left(seqs, before_seq)
        if before_seq is not None and after_seq is None:
            start = max(lo, hi - limit)
            return ordered[start:hi], start > lo
        return ordered[lo : min(hi, lo + limit)], lo + limit < hi

    def stats(self, environment_id: str) -> dict[str, Any]:
        env = self.environment(environment_id)
        now = time.monotonic()
        window = self.settings.workers_polling_window_seconds
        for worker in [w for w, seen in env.pollers.items() if now - seen > window]:
            del env.pollers[worker]
        oldest = next(iter(env.stream.values())).queued_at if env.stream else None
        return {
            "type": QUEUE_STATS_TYPE,
            "depth": len(env.ready),
            "pending": len(env.pending),
            "oldest_queued_at": oldest,
            "workers_polling": len(env.pollers),
        }

    def internal(self, item: Item) -> dict[str, Any]:
        """The emulator's whole view of an item (admin API; never the secret itself)."""
        env = self.environments.get(item.environment_id)
        now = time.monotonic()
        view = item.to_json()
        del view["secret"]
        view.update(
            last_heartbeat=item.last_heartbeat,
            ttl_seconds=item.ttl_seconds,
            lease_expires_at=None
            if item.lease_deadline is None
            else rfc3339(utcnow() + timedelta(seconds=item.lease_deadline - now)),
            lease_expires_in_seconds=None if item.lease_deadline is None else round(item.lease_deadline - now, 3),
            holder=item.holder,
            polled_by=item.polled_by,
            acked_by=item.acked_by,
            queue=None
            if env is None
            else ("pending" if item.id in env.pending else "ready" if item.id in env.ready else None),
            queued_at=item.queued_at if item.state == "queued" else None,
            deliveries=item.deliveries,
            heartbeats=item.heartbeats,
            requeues=item.requeues,
            has_secret=item.secret is not None,
        )
        return view

    def reset(self) -> None:
        for env in self.environments.values():
            env.closed = True
            self._notify(env, len(env.waiters))
            for item in env.items.values():
                self._drop_lease(item)
        self.environments.clear()
        self.tokens.clear()


def encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"after:{seq}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        prefix, _, number = text.partition(":")
        if prefix != "after" or not number.isdigit():
            raise ValueError(cursor)
        return int(number)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "page is not a cursor this API returned") from None
