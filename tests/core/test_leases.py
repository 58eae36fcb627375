"""The lease: heartbeat CAS, stop requests, theft, outages, self-fencing, sandbox liveness.

Guarantees: a sandbox never keeps working on an item someone else may hold (theft → LeaseLost within
one heartbeat interval; no successful heartbeat for a whole TTL → LeaseLost by self-fencing; no stop is
sent for a lost lease); a short Work API outage does not cost the lease; a vanished sandbox's item goes
back to the queue (never stuck in `starting`) unless it re-attaches within the grace period.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from sidecar.work.v1 import work_service_pb2 as pb
from tests.helpers import eventually, stays

from .conftest import Api, Running, SidecarFactory
from .test_lifecycle import error_info


async def _keepalive(running: Running, item: pb.WorkAssigned, pings: asyncio.Queue[bool]) -> AsyncIterator[pb.Lease]:
    async def requests() -> AsyncIterator[pb.KeepAliveRequest]:
        while await pings.get():
            yield pb.KeepAliveRequest(work_id=item.work.id, lease_token=item.lease_token)

    async for response in running.stub.KeepAlive(requests()):
        yield response.lease


async def test_stop_requested_then_stop_confirms(api: Api, start_sidecar: SidecarFactory, provider: str) -> None:
    running = await start_sidecar(provider)
    watch, item = await running.take_one(api)
    await api.platform_stop(item.work.id, force=False, provider=provider)
    event = await watch.next("stop_requested", timeout=5)
    assert event.stop_requested.work_id == item.work.id
    got = await running.stub.GetWork(pb.GetWorkRequest(work_id=item.work.id, lease_token=item.lease_token))
    assert got.lease.state == pb.LEASE_STATE_STOP_REQUESTED
    stopped = await running.stop(item, force=False)
    assert stopped.work.state == pb.WORK_STATE_STOPPED
    stops = await api.requests("stop", item.work.id)
    assert stops[-1]["status"] == 200
    watch.cancel()


async def test_platform_force_stop_is_lease_lost_stopped(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    watch, item = await running.take_one(api)
    await api.platform_stop(item.work.id, force=True)
    event = await watch.next("lease_lost", timeout=5)
    assert event.lease_lost.reason == pb.LEASE_LOST_REASON_STOPPED
    watch.cancel()


async def test_stolen_lease_is_lost_within_one_interval(api: Api, start_sidecar: SidecarFactory, provider: str) -> None:
    running = await start_sidecar(provider)  # TTL 2 s: heartbeat every 1 s
    watch, item = await running.take_one(api)
    pings: asyncio.Queue[bool] = asyncio.Queue()
    statuses = _keepalive(running, item, pings)
    pings.put_nowait(True)
    assert (await anext(statuses)).state == pb.LEASE_STATE_ACTIVE
    await api.steal(item.work.id)
    stolen_at = time.monotonic()
    event = await watch.next("lease_lost", timeout=5)
    assert time.monotonic() - stolen_at <= 1.0 + 0.5, "LeaseLost within one heartbeat interval"
    assert event.lease_lost.reason == pb.LEASE_LOST_REASON_PRECONDITION_FAILED
    pushed = await asyncio.wait_for(anext(statuses), 5)  # pushed without another ping
    assert pushed.state == pb.LEASE_STATE_LOST
    assert not [r for r in await api.requests("stop", item.work.id)], "no stop for a lost lease"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await running.stop(item)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "LEASE_LOST"
    pings.put_nowait(False)
    watch.cancel()


async def test_outage_shorter_than_ttl_keeps_the_lease(api: Api, start_sidecar: SidecarFactory, provider: str) -> None:
    running = await start_sidecar(provider, ttl_seconds=6)  # heartbeat every 3 s, fence 1 s before the TTL: 5 s
    watch, item = await running.take_one(api)
    before = len(await api.requests("heartbeat", item.work.id))
    await api.fault(operation="heartbeat", status=503, count=2)

    async def recovered() -> bool:
        beats = (await api.requests("heartbeat", item.work.id))[before:]
        return any(b["status"] == 503 for b in beats) and beats[-1]["status"] == 200

    await eventually(recovered, timeout=12, message="heartbeats fail twice, then succeed")
    got = await running.stub.GetWork(pb.GetWorkRequest(work_id=item.work.id, lease_token=item.lease_token))
    assert got.lease.state == pb.LEASE_STATE_ACTIVE
    assert watch.events.empty(), "no LeaseLost"
    assert await api.state(item.work.id) == "active"
    watch.cancel()


async def test_outage_longer_than_ttl_self_fences(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar(ttl_seconds=2)
    watch, item = await running.take_one(api)
    await api.fault(operation="heartbeat", drop=True, count=1000)
    started = time.monotonic()
    event = await watch.next("lease_lost", timeout=6)
    assert event.lease_lost.reason == pb.LEASE_LOST_REASON_EXPIRED
    assert time.monotonic() - started <= 2 + 1.5, "fenced within the TTL (plus one interval)"
    await api.clear_faults()
    assert not await api.requests("stop", item.work.id)
    watch.cancel()


async def test_sandbox_gone_item_returns_to_queue(api: Api, start_sidecar: SidecarFactory, provider: str) -> None:
    running = await start_sidecar(provider)
    watch, item = await running.take_one(api)
    watch.cancel()  # the sandbox disappears mid-work
    states: list[str] = []

    async def requeued() -> bool:
        states.append(await api.state(item.work.id))
        return states[-1] == "queued"

    await eventually(requeued, timeout=10, message="the item returns to the queue")
    assert "starting" not in states, "never stuck in starting"
    again = running.watch()
    redelivered = await again.assigned()
    assert redelivered.work.id == item.work.id and redelivered.lease_token != item.lease_token
    await running.stop(redelivered)
    again.cancel()


async def test_reattach_with_keepalive_keeps_the_lease(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar(reattach_grace=1.0, liveness_window=1.0)
    watch, item = await running.take_one(api)
    pings: asyncio.Queue[bool] = asyncio.Queue()
    statuses = _keepalive(running, item, pings)
    watch.cancel()
    await watch.ended.wait()
    for _ in range(8):  # 8 pings, 0.4 s apart: 3.2 s > grace + window + TTL
        pings.put_nowait(True)
        lease = await asyncio.wait_for(anext(statuses), 5)
        assert lease.state == pb.LEASE_STATE_ACTIVE
        await asyncio.sleep(0.4)  # the sandbox's own ping cadence, not synchronisation
    assert await api.state(item.work.id) == "active"
    stopped = await running.stop(item)
    assert stopped.work.state == pb.WORK_STATE_STOPPED
    pings.put_nowait(True)
    assert (await asyncio.wait_for(anext(statuses), 5)).state == pb.LEASE_STATE_STOPPED
    pings.put_nowait(False)


async def test_keepalive_without_watch_expires_after_window(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar(reattach_grace=0.5, liveness_window=0.5)
    watch, item = await running.take_one(api)
    pings: asyncio.Queue[bool] = asyncio.Queue()
    statuses = _keepalive(running, item, pings)
    pings.put_nowait(True)
    await anext(statuses)
    watch.cancel()  # and no more pings: the sandbox is gone
    lost = await asyncio.wait_for(anext(statuses), 5)
    assert lost.state == pb.LEASE_STATE_LOST and lost.lost_reason == pb.LEASE_LOST_REASON_SANDBOX_GONE
    pings.put_nowait(False)


async def test_state_stays_consistent_while_idle(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    watch, item = await running.take_one(api)

    async def active() -> bool:
        return await api.state(item.work.id) == "active"

    await stays(active, seconds=3, interval=0.2)  # 3 heartbeats at TTL 2 keep it active
    beats = await api.requests("heartbeat", item.work.id)
    assert len(beats) >= 3
    for previous, current in itertools.pairwise(beats):
        assert current["query"]["expected_last_heartbeat"] != previous["query"]["expected_last_heartbeat"]
    await running.stop(item)
    watch.cancel()
