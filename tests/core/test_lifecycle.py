"""End-to-end lifecycle through the sidecar: watch → assigned (acked + claimed) → keep alive → stop.

Guarantees checked here: an item is acked only after a watcher slot is chosen and is heartbeated
(NO_HEARTBEAT) before WorkAssigned is written, so it is never left `starting`; every call on an item
needs its lease token; healthcheck items never reach a sandbox.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.workapi import WorkSecret
from tests.helpers import eventually, stays

from ._probes import free_capacity, peak_overlap, polls_in_flight, watchers
from .conftest import Api, SidecarFactory, Watch


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(exc)
    assert status is not None, "no rich status details"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status details")


async def test_full_lifecycle(api: Api, start_sidecar: SidecarFactory, provider: str) -> None:
    running = await start_sidecar(provider)
    watch = running.watch(sandbox_id="sb-1")
    [queued] = await api.enqueue(1)
    item = await watch.assigned()

    assert item.work.id == queued["id"]
    assert item.work.data.type == "session" and item.work.data.id == queued["data"]["id"]
    assert item.lease_token and len(item.lease_token) >= 24
    assert item.lease.state == pb.LEASE_STATE_ACTIVE and item.lease.ttl_seconds == 2
    assert item.work.state == pb.WORK_STATE_ACTIVE
    # The claim heartbeat happened before the assignment was written: the item is active, not starting.
    assert await api.state(item.work.id) == "active"
    if provider == "anthropic":
        assert item.secret, "Anthropic items carry a secret"
        decoded = WorkSecret(item.secret).decode()
        assert item.session_credentials.sessions_token == decoded.sessions_token
        assert item.session_credentials.sessions_token.startswith("sk-ant-req-")
    else:
        assert item.secret == "" and not item.session_credentials.sessions_token

    got = await running.stub.GetWork(pb.GetWorkRequest(work_id=item.work.id, lease_token=item.lease_token))
    assert got.work.id == item.work.id and got.lease.state == pb.LEASE_STATE_ACTIVE
    updated = await running.stub.UpdateWorkMetadata(
        pb.UpdateWorkMetadataRequest(work_id=item.work.id, lease_token=item.lease_token, set={"step": "1"})
    )
    assert updated.work.metadata["step"] == "1"
    updated = await running.stub.UpdateWorkMetadata(
        pb.UpdateWorkMetadataRequest(work_id=item.work.id, lease_token=item.lease_token, remove=["step"])
    )
    assert "step" not in updated.work.metadata
    listed = await running.stub.ListWork(pb.ListWorkRequest(page_size=10))
    assert item.work.id in [w.id for w in listed.work]
    stats = await running.stub.GetQueueStats(pb.GetQueueStatsRequest())
    assert stats.sidecar.active_leases == 1 and stats.sidecar.watchers == 1 and stats.depth == 0
    assert stats.sidecar.provider == provider

    stopped = await running.stop(item)
    assert stopped.work.state == pb.WORK_STATE_STOPPED
    assert await api.state(item.work.id) == "stopped"
    acks = await api.requests("ack", item.work.id)
    heartbeats = await api.requests("heartbeat", item.work.id)
    assert len(acks) == 1
    assert heartbeats[0]["query"]["expected_last_heartbeat"] == "NO_HEARTBEAT"
    stats = await running.stub.GetQueueStats(pb.GetQueueStatsRequest())
    assert stats.sidecar.active_leases == 0
    watch.cancel()


async def test_list_pages(api: Api, start_sidecar: SidecarFactory, provider: str) -> None:
    running = await start_sidecar(provider)
    ids = {item["id"] for item in await api.enqueue(5)}
    seen: list[str] = []
    token = ""
    for _ in range(10):
        page = await running.stub.ListWork(pb.ListWorkRequest(page_size=2, page_token=token))
        assert len(page.work) <= 2
        seen += [w.id for w in page.work]
        token = page.next_page_token
        if not token:
            break
    assert set(seen) == ids and len(seen) == 5


async def test_no_poll_without_watchers(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    await running.stub.GetQueueStats(pb.GetQueueStatsRequest())  # the sidecar is up and talks to the API

    async def no_polls() -> bool:
        return not await api.requests("poll")

    await stays(no_polls, seconds=1.5)
    watch = running.watch()
    await eventually(lambda: api.requests("poll"), message="a watcher should start a poll")
    watch.cancel()
    await watch.ended.wait()
    await eventually(lambda: _zero(polls_in_flight(api)), message="the last poll should end")
    count = len(await api.requests("poll"))

    async def unchanged() -> bool:
        return len(await api.requests("poll")) == count

    await stays(unchanged, seconds=1.5)


async def test_idle_watchers_share_one_long_poll(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    watches = [running.watch(sandbox_id=f"sb-{i}") for i in range(10)]
    await eventually(lambda: _equals(watchers(running), 10))

    async def at_most_one_poll() -> bool:
        return await polls_in_flight(api) <= 1

    await stays(at_most_one_poll, seconds=2.5, interval=0.01)
    polls = await api.requests("poll")
    assert peak_overlap(polls) <= 1, "one long poll at a time, however many watchers wait"
    assert 1 <= len(polls) <= 5, f"idle traffic must not grow with watchers: {len(polls)} polls in 2.5 s"
    assert all(p["query"].get("block_ms") == "999" for p in polls)
    for watch in watches:
        watch.cancel()


@pytest.mark.parametrize("watchers", [1, 50])
async def test_concurrent_watchers_each_get_distinct_items(
    api: Api, start_sidecar: SidecarFactory, watchers: int
) -> None:
    running = await start_sidecar()
    watches = [running.watch(sandbox_id=f"sb-{i}") for i in range(watchers)]
    await eventually(lambda: _equals(free_capacity(running), watchers))
    queued = {item["id"] for item in await api.enqueue(watchers)}
    assigned = await asyncio.gather(*(w.assigned(timeout=20) for w in watches))
    assert {a.work.id for a in assigned} == queued, "every item went to exactly one watcher"
    assert len(await api.requests("ack")) == watchers, "one ack per item, no more"
    await asyncio.gather(*(running.stop(a) for a in assigned))
    for work_id in queued:
        assert await api.state(work_id) == "stopped"
    for watch in watches:
        watch.cancel()


async def test_full_watchers_do_not_take_more(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    watch = running.watch(max_in_flight=1)
    await api.enqueue(1)
    first = await watch.assigned()
    await api.enqueue(2)

    async def one_ack() -> bool:
        return len(await api.requests("ack")) == 1

    await stays(one_ack, seconds=1.5)
    stats = await running.stub.GetQueueStats(pb.GetQueueStatsRequest())
    assert stats.depth == 2 and stats.sidecar.free_capacity == 0
    await running.stop(first)
    second = await watch.assigned()
    assert second.work.id != first.work.id
    watch.cancel()


async def test_max_items_bounds_what_a_watch_is_given(api: Api, start_sidecar: SidecarFactory) -> None:
    """Guarantee: a one-shot sandbox (max_items) is never handed an item it will not take as it leaves."""
    running = await start_sidecar()
    call = running.stub.WatchWork(pb.WatchWorkRequest(max_in_flight=2, max_items=3, sandbox_id="bounded"))
    watch = Watch(call).start()
    await api.enqueue(5)
    first, second = await watch.assigned(), await watch.assigned()
    await running.stop(first)
    third = await watch.assigned()
    await asyncio.gather(running.stop(second), running.stop(third))
    assert await free_capacity(running) == 0, "three given: the open watch takes no more"
    await eventually(lambda: _zero(polls_in_flight(api)))
    polls = len(await api.requests("poll"))

    async def nothing_more() -> bool:
        return watch.events.empty() and len(await api.requests("poll")) == polls

    await stays(nothing_more, seconds=1.5)
    assert len(await api.requests("ack")) == 3
    watch.cancel()


@pytest.mark.parametrize("unclaimed_wait", [10.0, 0.0])
async def test_item_polled_after_its_sandbox_left(
    api: Api, start_sidecar: SidecarFactory, unclaimed_wait: float
) -> None:
    """Guarantee: an item whose only sandbox left while the poll was open is never acked without a slot (no
    stranded item); a sandbox that reconnects within --unclaimed-wait gets it at once, not after a reclaim."""
    running = await start_sidecar(unclaimed_wait=unclaimed_wait)
    (queued,) = await api.enqueue(1)
    await api.fault(operation="poll", count=1, latency_ms=1500)  # the poll is open while the sandbox leaves
    first = running.watch()
    await eventually(lambda: _equals(polls_in_flight(api), 1))
    first.cancel()
    await first.ended.wait()
    await eventually(lambda: _zero(free_capacity(running)))
    await eventually(lambda: _zero(polls_in_flight(api)), message="the open poll returns the item")
    assert (await api.item(queued["id"]))["polled_by"], "the poll took the item"

    async def no_acks() -> bool:
        return not await api.requests("ack")

    if unclaimed_wait:
        second = running.watch()
        assert (await second.assigned(timeout=5)).work.id == queued["id"]
        assert len(await api.requests("ack")) == 1
        assert len(await api.requests("poll")) == 1, "handed over from the held poll, not polled again"
        second.cancel()
    else:
        await stays(no_acks, seconds=1.0)
        assert await api.state(queued["id"]) == "queued", "left unacked for the Work API to reclaim"


async def test_healthcheck_items_never_reach_sandboxes(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    watch = running.watch(max_in_flight=2)
    [check] = await api.enqueue(1, data_type="healthcheck")
    [session] = await api.enqueue(1)
    item = await watch.assigned()
    assert item.work.id == session["id"]
    await eventually(lambda: api.state(check["id"]), message="healthcheck item state")
    await eventually(
        lambda: _equals(api.state(check["id"]), "stopped"), message="the sidecar stops healthcheck items itself"
    )
    assert watch.events.empty()
    watch.cancel()


async def test_wrong_lease_token_is_permission_denied(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    watch, item = await running.take_one(api)
    work_id = item.work.id
    calls: list[Awaitable[object]] = [
        running.stub.StopWork(pb.StopWorkRequest(work_id=work_id, lease_token="wrong", force=True)),
        running.stub.GetWork(pb.GetWorkRequest(work_id=work_id, lease_token="")),
        running.stub.UpdateWorkMetadata(
            pb.UpdateWorkMetadataRequest(work_id=work_id, lease_token=item.lease_token[:-1] + "x", set={"a": "b"})
        ),
        running.stub.GetWork(pb.GetWorkRequest(work_id="work_unknown", lease_token=item.lease_token)),
        running.stub.GetWork(pb.GetWorkRequest(work_id=work_id, lease_token="jeton-\u00e9\u2603")),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_info(caught.value).reason == "LEASE_TOKEN_MISMATCH"
        assert item.lease_token not in (caught.value.details() or "")
    keepalive = running.stub.KeepAlive(iter([pb.KeepAliveRequest(work_id=work_id, lease_token="nope")]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in keepalive:
            pass
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert await api.state(work_id) == "active", "nothing happened to the item"
    watch.cancel()


async def test_bad_arguments_are_invalid_argument(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    watch, item = await running.take_one(api)
    bad: list[Awaitable[object]] = [
        running.stub.UpdateWorkMetadata(
            pb.UpdateWorkMetadataRequest(
                work_id=item.work.id, lease_token=item.lease_token, set={"k": "v"}, remove=["k"]
            )
        ),
        running.stub.UpdateWorkMetadata(
            pb.UpdateWorkMetadataRequest(work_id=item.work.id, lease_token=item.lease_token)
        ),
        running.stub.ListWork(pb.ListWorkRequest(page_size=100_000)),
        running.stub.GetWork(pb.GetWorkRequest(work_id="", lease_token=item.lease_token)),
    ]
    for call in bad:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in running.stub.WatchWork(pb.WatchWorkRequest(max_in_flight=1_000_000)):
            pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    watch.cancel()


async def test_watchers_are_served_fairly(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    watches = [running.watch(max_in_flight=5, sandbox_id=f"sb-{i}") for i in range(3)]
    await eventually(lambda: _equals(free_capacity(running), 15))
    await api.enqueue(6)
    counts = []
    for watch in watches:
        got = [await watch.assigned() for _ in range(2)]
        counts.append(len(got))
    assert counts == [2, 2, 2], "six items over three equal watchers: two each"
    assert all(w.events.empty() for w in watches)
    for watch in watches:
        watch.cancel()


async def test_polls_scale_up_while_items_flow_and_back_to_one(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar(max_pollers=3)
    watch = running.watch(max_in_flight=60)
    await eventually(lambda: _equals(polls_in_flight(api), 1), message="one idle long poll")
    # Each poll takes 50 ms at the emulator, so polls that run side by side overlap in its request log too.
    await api.fault(operation="poll", count=None, latency_ms=50)
    await api.enqueue(60)
    items = [await watch.assigned() for _ in range(60)]
    assert len({i.work.id for i in items}) == 60
    peak = peak_overlap(await api.requests("poll"))
    assert 1 < peak <= 3, f"parallel polls while items flow, bounded by max_pollers (peak {peak})"
    await api.clear_faults()

    async def one_poll() -> bool:
        return await polls_in_flight(api) <= 1

    await eventually(one_poll, message="back to one poll when the queue is empty")
    await stays(one_poll, seconds=2.0, interval=0.01)
    watch.cancel()


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def _zero(value: Awaitable[int]) -> bool:
    return await value == 0
