"""`sidecar.client` (the Python sandbox helper) against a real sidecar and emulator, both flavours where it matters.

Guarantees checked: leaving an item's `async with` stops it (nothing stranded); a stop request and a lost lease
reach the Assignment's events; a lost item is not stopped by the client; finished items are forgotten."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from sidecar.client import Assignment, SidecarClient
from sidecar.work.v1 import work_service_pb2 as pb
from tests.core.conftest import Api, Running, SidecarFactory
from tests.helpers import eventually


async def _first(assignments: AsyncIterator[Assignment]) -> Assignment:
    async with asyncio.timeout(10):
        return await anext(assignments)


async def test_leaving_the_block_stops_the_item(api: Api, start_sidecar: SidecarFactory, provider: str) -> None:
    running = await start_sidecar(provider)
    async with SidecarClient(running.address, sandbox_id="sb-client", keepalive_interval=0.2) as client:
        assignments = client.assignments(max_in_flight=1)
        pending = asyncio.ensure_future(_first(assignments))
        await eventually(lambda: _capacity_is(running, 1))
        (queued,) = await api.enqueue(1)
        item = await pending
        assert item.work_id == queued["id"] and item.lease_token
        assert bool(item.secret) == (provider == "anthropic"), "Anthropic items carry a secret, Qoder items none"
        assert item.lease_token not in repr(item) and (not item.secret or item.secret not in repr(item))
        async with item:
            got = await item.get()
            assert got.work.id == queued["id"]
            updated = await item.update_metadata({"step": "one"})
            assert updated.metadata["step"] == "one"
        assert item.stopped.is_set()
        assert await api.state(queued["id"]) == "stopped"
        assert [r["status"] for r in await api.requests("stop", queued["id"])] == [200]
        assert not client._items, "a finished item is forgotten"
        await assignments.aclose()


async def test_stop_request_and_lost_lease_reach_the_item(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    async with SidecarClient(running.address, keepalive_interval=0.2) as client:
        assignments = client.assignments(max_in_flight=2)
        pending = asyncio.ensure_future(_first(assignments))
        await eventually(lambda: _capacity_is(running, 2))
        await api.enqueue(2)
        first = await pending
        second = await _first(assignments)

        async with first:
            await api.platform_stop(first.work_id, force=False)
            async with asyncio.timeout(5):
                await first.stop_requested.wait()
        assert await api.state(first.work_id) == "stopped", "a graceful stop is confirmed on leaving the block"

        async with second:
            await api.steal(second.work_id)
            async with asyncio.timeout(5):
                await second.lost.wait()
            assert second.lost_reason == pb.LEASE_LOST_REASON_PRECONDITION_FAILED
        assert not [r for r in await api.requests("stop", second.work_id) if r["status"] == 200], (
            "a lost item is not ours to stop"
        )
        await assignments.aclose()


async def test_a_failed_stop_is_raised(api: Api, start_sidecar: SidecarFactory) -> None:
    """A stop the Work API keeps refusing raises UNAVAILABLE (STOP_PENDING) on leaving the item, by the client's
    `stop_timeout`."""
    running = await start_sidecar()
    async with SidecarClient(running.address, keepalive_interval=0.2, stop_timeout=3) as client:
        assignments = client.assignments()
        pending = asyncio.ensure_future(_first(assignments))
        await eventually(lambda: _capacity_is(running, 1))
        await api.enqueue(1)
        item = await pending
        await api.fault(operation="stop", count=100, status=500)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async with item:
                pass
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "STOP_PENDING" in str(raised.value.trailing_metadata())
        await api.clear_faults()
        await assignments.aclose()


async def _capacity_is(running: Running, expected: int) -> bool:
    """Seen through the sidecar's public stats, not its internals."""
    stats = await running.stub.GetQueueStats(pb.GetQueueStatsRequest())
    return stats.sidecar.free_capacity == expected


async def test_a_sidecar_that_dies_fences_the_item_before_its_lease_can_expire(
    api: Api, start_sidecar: SidecarFactory
) -> None:
    """#11.11. Guarantee: when the sidecar goes away (and does not come back), the sandbox is woken at once
    (`disconnected`) and told `lost` a fencing margin before the lease's last known expiry, so it stops before the
    Work API may hand the item to anyone else; meanwhile it keeps trying to re-attach (#12)."""
    running = await start_sidecar(ttl_seconds=4)
    async with SidecarClient(running.address, keepalive_interval=0.2, reconnect_timeout=60) as client:
        assignments = client.assignments(max_in_flight=1)
        pending = asyncio.ensure_future(_first(assignments))
        await eventually(lambda: _capacity_is(running, 1))
        await api.enqueue(1)
        item = await pending
        async with item:
            await eventually(lambda: item.lease.HasField("expires_at"), message="a status from KeepAlive")
            await running.sidecar.close()  # gone, and it does not come back
            died = time.monotonic()
            await asyncio.wait_for(item.disconnected.wait(), 5)
            assert time.monotonic() - died <= 1.5, "the sandbox is woken within a second or so"
            await asyncio.wait_for(item.lost.wait(), 10)
            fence = item.lease.expires_at.ToMicroseconds() / 1e6
            assert time.time() <= fence - 0.5, "lost before the lease's expiry, with a margin"
            assert item.lost_reason == pb.LEASE_LOST_REASON_EXPIRED
        await assignments.aclose()
