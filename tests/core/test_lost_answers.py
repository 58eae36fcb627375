"""An answer lost after the Work API applied the operation never costs a lease.

The emulator applies the operation, then spoils its answer on the wire (`after_apply`: closed, garbage, both a
length and chunked, two lengths, dripped past the deadline, or answered twice). The sidecar (real gRPC, the real
emulator over HTTP) must keep the lease, and its sandbox must hear nothing, because a refusal that follows an
unknown outcome is settled by reading the item; and it must still lose the lease when the read shows it is not
ours any more.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from tests.helpers import eventually, serving

from .conftest import ENV, KEY, Api, Running, SidecarFactory, Watch

SPOILS = ["lose", "garbage", "length_and_chunked", "two_lengths", "drip"]


async def _statuses(api: Api, operation: str, work_id: str) -> list[int | None]:
    return [entry["status"] for entry in await api.requests(operation, work_id)]


async def _still_held(api: Api, running: Running, item: pb.WorkAssigned) -> None:
    """The item is active at the Work API, its lease ACTIVE in the sidecar, and a clean renewal came after."""
    got = await running.stub.GetWork(pb.GetWorkRequest(work_id=item.work.id, lease_token=item.lease_token))
    assert got.lease.state == pb.LEASE_STATE_ACTIVE
    assert await api.state(item.work.id) == "active"


@pytest.mark.parametrize("spoil", SPOILS)
async def test_a_renewal_applied_whose_answer_was_lost_keeps_the_lease(
    api: Api, start_sidecar: SidecarFactory, spoil: str
) -> None:
    """Finding 1.
    A heartbeat applied whose answer was lost (closed, garbage, a length with chunked, two lengths, dripped past
    the deadline) is followed by a renewal that echoes the old value and gets 412 for our own heartbeat: read,
    not believed. The sandbox hears nothing and the lease goes on."""
    running = await start_sidecar(ttl_seconds=6)  # renewals every 2.25 s, an attempt given half of that
    watch, item = await running.take_one(api)
    work_id = item.work.id
    await api.fault("heartbeat", after_apply=spoil, drip_ms=100)

    async def settled() -> bool:
        statuses = await _statuses(api, "heartbeat", work_id)
        return 412 in statuses and statuses[-1] == 200 and statuses[statuses.index(412) :].count(200) >= 1

    await eventually(settled, timeout=15, message="a 412 for our own heartbeat, then a clean renewal")
    assert watch.events.empty(), "the sandbox heard nothing"
    await _still_held(api, running, item)
    watch.cancel()


@pytest.mark.parametrize("spoil", ["lose", "garbage", "two_lengths", "drip"])
async def test_a_claim_applied_whose_answer_was_lost_keeps_the_item(
    api: Api, start_sidecar: SidecarFactory, spoil: str
) -> None:
    """A claiming heartbeat applied whose answer was lost: the claim sent again gets 412 (the item is active since
    our first claim) three times over; read, it is ours, and the item reaches the sandbox once and stays held."""
    running = await start_sidecar(ttl_seconds=6, claim_timeout=3.0)
    await api.fault("heartbeat", after_apply=spoil, drip_ms=100)
    watch, item = await running.take_one(api)
    statuses = await _statuses(api, "heartbeat", item.work.id)
    assert 412 in statuses, "the claim was refused for our own first claim"
    assert (await api.item(item.work.id))["deliveries"] == 1, "delivered once: never given up and redelivered"
    assert await _statuses(api, "ack", item.work.id) == [200]

    async def renewed() -> bool:
        later = await _statuses(api, "heartbeat", item.work.id)
        return later[-1] == 200 and later.count(200) >= 2

    await eventually(renewed, timeout=10, message="renewals go on")
    assert watch.events.empty(), "the sandbox heard nothing but its assignment"
    await _still_held(api, running, item)
    watch.cancel()


async def test_an_ack_applied_whose_answer_was_lost_is_read_as_ours(api: Api, start_sidecar: SidecarFactory) -> None:
    """An ack applied whose answer was lost: its retry gets 409 (the item is `starting` since our ack). Read
    before anyone else could have been handed the item, it is ours: claimed and assigned, never redelivered."""
    running = await start_sidecar(ttl_seconds=6)
    await api.fault("ack", after_apply="lose")
    watch, item = await running.take_one(api)
    assert await _statuses(api, "ack", item.work.id) == [200, 409]
    await _still_held(api, running, item)
    assert (await api.item(item.work.id))["deliveries"] == 1
    watch.cancel()


async def test_a_stray_second_answer_is_not_taken_for_the_claims(api: Api, start_sidecar: SidecarFactory) -> None:
    """Finding 2.
    A late second answer is taken as the answer to the next request on that connection: the Work API answers
    the ack, then a stray `200 {}` arrives while the claiming heartbeat (slow to apply) waits on the same
    connection. The `{}` is not a heartbeat's answer: the connection is closed, the claim's outcome is unknown,
    and the refusals of the claims sent again are read: the item is ours and reaches the sandbox."""
    running = await start_sidecar(ttl_seconds=6, claim_timeout=3.0)
    await api.fault("ack", after_apply="twice", stray_delay_ms=100)
    await api.fault("heartbeat", latency_ms=400)  # the claim is applied after the stray answer arrived
    watch, item = await running.take_one(api)
    await _still_held(api, running, item)
    assert (await api.item(item.work.id))["deliveries"] == 1, "delivered once: never given up and redelivered"
    assert await _statuses(api, "ack", item.work.id) == [200]

    async def renewed() -> bool:
        statuses = await _statuses(api, "heartbeat", item.work.id)
        return statuses[-1] == 200 and statuses.count(200) >= 2

    await eventually(renewed, timeout=10, message="renewals go on")
    assert watch.events.empty(), "the sandbox heard nothing but its assignment"
    watch.cancel()


async def test_a_lease_read_as_someone_elses_is_still_lost(api: Api, start_sidecar: SidecarFactory) -> None:
    """The doubt does not save a lease that is gone: a renewal's answer is dripped past its deadline and, before
    the renewal is sent again, the item goes back to the queue. The 412 is read: queued, not ours. LeaseLost."""
    running = await start_sidecar(ttl_seconds=6)
    watch, item = await running.take_one(api)
    work_id = item.work.id
    before = len(await _statuses(api, "heartbeat", work_id))
    await api.fault("heartbeat", after_apply="drip", drip_ms=500)

    async def spoilt_applied() -> bool:
        return len(await _statuses(api, "heartbeat", work_id)) > before

    await eventually(spoilt_applied, timeout=5, message="the spoilt renewal was applied")
    await api.admin.expire_lease(api.environment_id, work_id)
    event = await watch.next("lease_lost", timeout=10)
    assert event.lease_lost.reason == pb.LEASE_LOST_REASON_PRECONDITION_FAILED
    assert "queued" in event.lease_lost.message
    assert not await api.requests("stop", work_id), "no stop for a lost lease"
    watch.cancel()


async def test_a_sidecar_process_keeps_a_lease_whose_renewal_answers_are_lost(api: Api, short_dir: str) -> None:
    """Finding 1.
    The same against a real `work-sidecar serve` process: every kind of answer lost after the Work API applied
    the renewal, one after another, and the sandbox (over real gRPC) hears nothing; the item runs once."""
    binary = Path(sys.executable).parent / "work-sidecar"
    socket = f"unix://{short_dir}/lost.sock"
    proc = await asyncio.create_subprocess_exec(
        str(binary), "serve", "--api-url", api.url, "--environment-id", ENV, "--listen", socket, "--ttl", "6",
        env={**os.environ, "WORK_SIDECAR_API_KEY": KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(socket) as channel:
            await eventually(lambda: serving(channel), timeout=30)
            stub = pb_grpc.WorkServiceStub(channel)
            watch = Watch(stub.WatchWork(pb.WatchWorkRequest())).start()
            await api.enqueue(1)
            item = await watch.assigned(timeout=15)
            for spoil in SPOILS:
                before = len(await _statuses(api, "heartbeat", item.work.id))
                await api.fault("heartbeat", after_apply=spoil, drip_ms=100)

                async def settled(before: int = before) -> bool:
                    statuses = (await _statuses(api, "heartbeat", item.work.id))[before:]
                    return 412 in statuses and statuses[-1] == 200

                await eventually(settled, timeout=15, message=f"{spoil}: a 412 for our own heartbeat, then a 200")
            assert watch.events.empty(), "the sandbox heard nothing"
            assert await api.state(item.work.id) == "active"
            assert (await api.item(item.work.id))["deliveries"] == 1
            await stub.StopWork(pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True))
            watch.cancel()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
