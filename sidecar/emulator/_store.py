"""The emulator's state: environments, their queues, items and leases, with the Work API's rules.

Everything runs on one event loop, so no locks. Long polls wait on futures that an enqueue or a requeue
resolves (no busy waiting); lease expiry runs on loop timers, not a sweep.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ._errors import ApiError
from ._settings import EmulatorSettings

NO_HEARTBEAT = "NO_HEARTBEAT"
_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def now() -> datetime:
    return datetime.now(UTC)


def rfc3339(when: datetime | None) -> str | None:
    return None if when is None else when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(value: str) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


@dataclass(eq=False)
class Item:
    id: str
    environment_id: str
    data_type: str
    data_id: str
    created_at: datetime
    metadata: dict[str, str] = field(default_factory=dict)
    state: str = "queued"
    acknowledged_at: datetime | None = None
    started_at: datetime | None = None
    latest_heartbeat_at: datetime | None = None
    stop_requested_at: datetime | None = None
    stopped_at: datetime | None = None
    secret: str | None = None
    last_heartbeat: str | None = None
    last_heartbeat_at: datetime | None = None
    ttl_seconds: int = 0
    lease_expires_at: float | None = None
    delivered_to: str | None = None
    delivered_at: float | None = None
    acked_by: str | None = None
    expiry: asyncio.TimerHandle | None = None
    deliveries: int = 0

    def to_json(self, *, with_secret: bool = False) -> dict[str, Any]:
        return {
            "type": "work",
            "id": self.id,
            "environment_id": self.environment_id,
            "data": {"type": self.data_type, "id": self.data_id},
            "state": self.state,
            "metadata": dict(self.metadata),
            "created_at": rfc3339(self.created_at),
            "acknowledged_at": rfc3339(self.acknowledged_at),
            "started_at": rfc3339(self.started_at),
            "latest_heartbeat_at": rfc3339(self.latest_heartbeat_at),
            "stop_requested_at": rfc3339(self.stop_requested_at),
            "stopped_at": rfc3339(self.stopped_at),
            "secret": self.secret if with_secret else None,
        }

    def lease_state(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "last_heartbeat": self.last_heartbeat,
            "lease_extended": self.state in ("active", "stopping") and self.last_heartbeat is not None,
            "ttl_seconds": self.ttl_seconds,
            "lease_updated_at": rfc3339(self.last_heartbeat_at),
        }

    def internal(self) -> dict[str, Any]:
        view = self.to_json()
        view.update(
            last_heartbeat=self.last_heartbeat,
            ttl_seconds=self.ttl_seconds,
            lease_expires_in=None
            if self.lease_expires_at is None
            else round(self.lease_expires_at - time.monotonic(), 3),
            delivered_to=self.delivered_to,
            acked_by=self.acked_by,
            deliveries=self.deliveries,
            has_secret=self.secret is not None,
        )
        return view


@dataclass(eq=False)
class Environment:
    id: str
    self_hosted: bool = True
    items: dict[str, Item] = field(default_factory=dict)
    queue: OrderedDict[str, Item] = field(default_factory=OrderedDict)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    pollers: dict[str, float] = field(default_factory=dict)

    def wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


class Store:
    def __init__(self, settings: EmulatorSettings, base_url: str = "") -> None:
        self.settings = settings
        self.base_url = base_url
        self.environments: dict[str, Environment] = {}
        self._created = 0

    # -- ids, secrets, time -------------------------------------------------------------------------

    def _id(self, prefix: str) -> str:
        if self.settings.id_style == "qoder":
            return f"{prefix}_{secrets.token_hex(16)}"
        return f"{prefix}_011C" + "".join(secrets.choice(_B58) for _ in range(20))

    def _secret(self) -> str:
        payload = {"sessions_token": "sk-ant-req-" + secrets.token_urlsafe(24), "api_base_url": self.base_url}
        raw = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()
        every = self.settings.strip_secret_padding_every
        if every and self._created % every == 0:
            raw = raw.rstrip("=")
        return raw

    @staticmethod
    def _heartbeat_stamp(item: Item) -> datetime:
        stamp = now()
        if item.last_heartbeat_at is not None and stamp <= item.last_heartbeat_at:
            stamp = item.last_heartbeat_at + timedelta(microseconds=1)  # strictly increasing: CAS stays exact
        return stamp

    # -- environments and items ---------------------------------------------------------------------

    def environment(self, environment_id: str) -> Environment:
        env = self.environments.get(environment_id)
        if env is None:
            env = self.environments[environment_id] = Environment(environment_id)
        return env

    def item(self, environment_id: str, work_id: str) -> Item:
        item = self.environment(environment_id).items.get(work_id)
        if item is None:
            raise ApiError(404, f"work item {work_id} not found")
        return item

    def enqueue(
        self, environment_id: str, count: int = 1, data_type: str = "session", metadata: dict[str, str] | None = None
    ) -> list[Item]:
        env = self.environment(environment_id)
        created = []
        for _ in range(count):
            self._created += 1
            session_prefix = "sess" if self.settings.id_style == "qoder" else "sesn"
            item = Item(
                id=self._id("work"),
                environment_id=environment_id,
                data_type=data_type,
                data_id=self._id(session_prefix) if data_type == "session" else self._id("hc"),
                created_at=now(),
                metadata=dict(metadata or {}),
            )
            env.items[item.id] = item
            env.queue[item.id] = item
            created.append(item)
        env.wake()
        return created

    def _requeue(self, item: Item) -> None:
        env = self.environment(item.environment_id)
        item.state = "queued"
        item.last_heartbeat = None
        item.last_heartbeat_at = None
        item.ttl_seconds = 0
        item.lease_expires_at = None
        item.acknowledged_at = None
        item.started_at = None
        item.delivered_to = None
        item.delivered_at = None
        item.acked_by = None
        env.queue[item.id] = item
        env.wake()

    # -- poll ---------------------------------------------------------------------------------------

    def _take(self, env: Environment, worker_id: str, reclaim_ms: int) -> Item | None:
        clock = time.monotonic()
        for item in env.queue.values():
            if item.delivered_at is None or (clock - item.delivered_at) * 1000 >= reclaim_ms:
                item.delivered_to = worker_id
                item.delivered_at = clock
                item.deliveries += 1
                env.queue.move_to_end(item.id)  # fairness among pending redeliveries
                return item
        return None

    async def poll(
        self, environment_id: str, worker_id: str, block_ms: int | None, reclaim_ms: int | None
    ) -> Item | None:
        env = self.environment(environment_id)
        env.pollers[worker_id] = time.monotonic()
        reclaim = self.settings.reclaim_default_ms if reclaim_ms is None else reclaim_ms
        item = self._take(env, worker_id, reclaim)
        if item is not None or not block_ms:
            return item
        deadline = time.monotonic() + block_ms / 1000
        loop = asyncio.get_running_loop()
        while (remaining := deadline - time.monotonic()) > 0:
            waiter: asyncio.Future[None] = loop.create_future()
            env.waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                break
            finally:
                if waiter in env.waiters:
                    env.waiters.remove(waiter)
            item = self._take(env, worker_id, reclaim)
            if item is not None:
                return item
        return self._take(env, worker_id, reclaim)

    # -- ack, heartbeat, stop -------------------------------------------------------------------------

    def ack(self, environment_id: str, work_id: str, worker_id: str | None, strict_worker: bool) -> Item:
        item = self.item(environment_id, work_id)
        if item.state != "queued":
            raise ApiError(409, f"work item {work_id} is {item.state}, not queued: it cannot be acknowledged")
        if item.delivered_to is None:
            raise ApiError(409, f"work item {work_id} was not polled: poll before acknowledging")
        if strict_worker and worker_id != item.delivered_to:
            raise ApiError(409, f"work item {work_id} was polled by another worker")
        env = self.environment(environment_id)
        env.queue.pop(work_id, None)
        item.state = "starting"
        item.acknowledged_at = now()
        item.acked_by = worker_id
        if self.settings.reclaim_starting_after_seconds is not None:
            self._arm(item, self.settings.reclaim_starting_after_seconds)
        return item

    def heartbeat(
        self,
        environment_id: str,
        work_id: str,
        *,
        expected: str | None,
        desired_ttl: int | None,
        flavour: str,
        precondition_type: str,
    ) -> dict[str, Any]:
        item = self.item(environment_id, work_id)
        if flavour == "qoder" and item.state in ("queued", "stopped"):
            raise ApiError(409, f"work item {work_id} is {item.state} and cannot be heartbeated")
        if item.state == "stopped":
            return self._heartbeat_body(item, extended=False)
        compare = not (flavour == "anthropic" and item.state == "stopping")
        if compare and expected is not None:
            matches = item.last_heartbeat is None if expected == NO_HEARTBEAT else expected == item.last_heartbeat
            if item.state == "queued" or not matches:
                raise ApiError(
                    412,
                    "expected_last_heartbeat does not match the current lease",
                    error_type=precondition_type,
                    details={"error_code": "heartbeat_precondition_failed", "current_state": item.lease_state()},
                )
        if item.state == "queued":
            raise ApiError(409, f"work item {work_id} is queued and cannot be heartbeated")
        ttl = desired_ttl if desired_ttl is not None else self.settings.default_ttl_seconds
        ttl = max(self.settings.min_ttl_seconds, min(self.settings.max_ttl_seconds, ttl))
        stamp = self._heartbeat_stamp(item)
        item.last_heartbeat_at = stamp
        item.last_heartbeat = rfc3339(stamp)
        item.latest_heartbeat_at = stamp
        item.ttl_seconds = ttl
        if item.state == "starting":
            item.state = "active"
            item.started_at = stamp
        self._arm(item, ttl)
        return self._heartbeat_body(item, extended=True)

    @staticmethod
    def _heartbeat_body(item: Item, *, extended: bool) -> dict[str, Any]:
        return {
            "type": "work_heartbeat",
            "last_heartbeat": item.last_heartbeat or "",
            "lease_extended": extended,
            "state": item.state,
            "ttl_seconds": item.ttl_seconds,
        }

    def _arm(self, item: Item, seconds: float) -> None:
        if item.expiry is not None:
            item.expiry.cancel()
        item.lease_expires_at = time.monotonic() + seconds
        item.expiry = asyncio.get_running_loop().call_later(seconds, self._expire, item)

    def _expire(self, item: Item) -> None:
        item.expiry = None
        if item.state in ("active", "starting"):
            self._requeue(item)
        elif item.state == "stopping":
            self._finish(item)

    def _finish(self, item: Item) -> None:
        item.state = "stopped"
        item.stopped_at = now()
        item.lease_expires_at = None
        if item.expiry is not None:
            item.expiry.cancel()
            item.expiry = None
        self.environment(item.environment_id).queue.pop(item.id, None)

    def stop(self, environment_id: str, work_id: str, force: bool) -> Item:
        item = self.item(environment_id, work_id)
        if item.state == "stopped":
            if self.settings.stop_of_stopped_conflicts:
                raise ApiError(409, f"work item {work_id} is already stopped")
            return item
        if force or item.state in ("queued", "starting", "stopping"):
            if item.stop_requested_at is None:
                item.stop_requested_at = now()
            self._finish(item)
        else:
            item.state = "stopping"
            item.stop_requested_at = now()
        return item

    def steal(self, environment_id: str, work_id: str) -> Item:
        """Lease theft: another holder heartbeats; the old holder's next CAS fails with 412."""
        item = self.item(environment_id, work_id)
        if item.state not in ("active", "stopping", "starting"):
            raise ApiError(409, f"work item {work_id} is {item.state}: no lease to steal")
        stamp = self._heartbeat_stamp(item)
        item.last_heartbeat_at = stamp
        item.last_heartbeat = rfc3339(stamp)
        if item.state == "starting":
            item.state = "active"
            item.started_at = stamp
        self._arm(item, item.ttl_seconds or self.settings.default_ttl_seconds)
        return item

    # -- get, update, list, stats --------------------------------------------------------------------

    def update(self, environment_id: str, work_id: str, patch: Any) -> Item:
        item = self.item(environment_id, work_id)
        if patch is None:
            return item
        if not isinstance(patch, dict):
            raise ApiError(400, "metadata must be an object")
        for key, value in patch.items():
            if not isinstance(key, str) or not key or not (value is None or isinstance(value, str)):
                raise ApiError(400, "metadata keys must be non-empty strings and values strings or null")
        for key, value in patch.items():
            if value is None:
                item.metadata.pop(key, None)
            else:
                item.metadata[key] = value
        return item

    def listing(self, environment_id: str) -> list[Item]:
        return list(self.environment(environment_id).items.values())

    def stats(self, environment_id: str) -> dict[str, Any]:
        env = self.environment(environment_id)
        clock = time.monotonic()
        reclaim = self.settings.reclaim_default_ms / 1000
        depth = pending = 0
        oldest: datetime | None = None
        for item in env.queue.values():
            if item.delivered_at is not None and clock - item.delivered_at < reclaim:
                pending += 1
            else:
                depth += 1
            if oldest is None or item.created_at < oldest:
                oldest = item.created_at
        window = self.settings.workers_polling_window_seconds
        polling = sum(1 for seen in env.pollers.values() if clock - seen <= window)
        return {
            "type": "work_queue_stats",
            "depth": depth,
            "pending": pending,
            "oldest_queued_at": rfc3339(oldest),
            "workers_polling": polling,
        }

    def reset(self) -> None:
        for env in self.environments.values():
            for item in env.items.values():
                if item.expiry is not None:
                    item.expiry.cancel()
            env.wake()
        self.environments.clear()
