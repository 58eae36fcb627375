"""Issue #11 against an in-process sidecar: each test attacks one guarantee that used to break.

The number in each docstring is the defect's point in issue #11.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterable, Awaitable
from datetime import datetime
from typing import Any

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.core import Backoff
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.workapi import RetryPolicy
from tests.helpers import eventually

from .conftest import Api, SidecarFactory
from .test_lifecycle import error_info


def _at(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


async def test_lease_lost_reaches_the_sandbox_before_the_api_can_redeliver(
    api: Api, start_sidecar: SidecarFactory
) -> None:
    """#11.6. Guarantee: with heartbeats failing, the sandbox hears LeaseLost at least the fencing margin before
    the Work API's lease runs out (here a 1.5 s margin; the default rule is max(1 s, 10% of the TTL))."""
    running = await start_sidecar(ttl_seconds=4, fence_margin_min=1.5)
    watch, item = await running.take_one(api)
    await api.fault(operation="heartbeat", status=503, count=None)
    lost = await watch.next("lease_lost", timeout=10)
    heard_at = time.time()
    assert lost.lease_lost.reason == pb.LEASE_LOST_REASON_EXPIRED
    expires = (await api.item(item.work.id))["lease_expires_at"]
    assert expires is not None, "the Work API still holds the lease when the sandbox is told"
    assert _at(expires) - heard_at >= 1.0, f"LeaseLost only {_at(expires) - heard_at:.2f} s before the API expiry"
    await api.clear_faults()
    watch.cancel()


async def test_release_waits_for_the_renewal_in_flight(api: Api, start_sidecar: SidecarFactory) -> None:
    """#11.7. Guarantee: a release sent while a renewal is in flight uses the renewal's answer: no 412, and the
    lease is not extended by a whole TTL for an item nobody holds."""
    running = await start_sidecar(ttl_seconds=4, reattach_grace=0.0, liveness_window=0.0, release_ttl_seconds=1)
    watch, item = await running.take_one(api)
    await api.fault(operation="heartbeat", latency_ms=800, count=None)  # every renewal is slow
    before = len(await api.requests("heartbeat", item.work.id))
    await eventually(lambda: _open(api, "heartbeat", item.work.id, before), message="a renewal in flight", timeout=10)
    watch.cancel()  # the sandbox leaves while the renewal is in flight: released at once (grace 0)
    await eventually(lambda: _requested_ttl(api, item.work.id, "1"), timeout=10, message="the release heartbeat")
    await api.clear_faults()
    await eventually(lambda: _all_answered(api, item.work.id), timeout=10)
    beats = await api.requests("heartbeat", item.work.id)
    release = [b for b in beats if b["query"].get("desired_ttl_seconds") == "1"]
    assert [b["status"] for b in release] == [200], f"the release used the renewal's CAS value: {release}"
    item_now = await api.item(item.work.id)
    assert item_now["state"] == "queued" or _at(item_now["lease_expires_at"]) - time.time() <= 1.5, (
        "the lease ends about 1 s after the release, not a TTL later"
    )


class _FailingRenewal:
    """A lease observer with a bug: it raises when one item's lease is renewed."""

    def __init__(self, work_id: str) -> None:
        self.work_id = work_id

    def claimed(self, lease: object) -> None:
        pass

    def assigned(self, lease: object) -> None:
        pass

    def renewed(self, lease: Any, result: object) -> None:
        if lease.work_id == self.work_id:
            raise RuntimeError("a bug in a renewal")

    def stop_requested(self, lease: object) -> None:
        pass

    def ended(self, lease: object) -> None:
        pass


async def test_a_renewal_that_fails_unexpectedly_fences_only_its_own_lease(
    api: Api, start_sidecar: SidecarFactory
) -> None:
    """Guarantee: a renewal that fails in a way nobody foresaw (a bug) is logged, its sandbox hears LeaseLost
    (INTERNAL) and its item is released; the renewal workers go on renewing every other lease."""
    running = await start_sidecar(ttl_seconds=2, release_ttl_seconds=1)
    watch = running.watch(max_in_flight=2)
    await api.enqueue(2)
    first, second = await watch.assigned(), await watch.assigned()
    running.sidecar.leases.observe(_FailingRenewal(first.work.id))
    lost = await watch.next("lease_lost", timeout=10)
    assert lost.lease_lost.work_id == first.work.id
    assert lost.lease_lost.reason == pb.LEASE_LOST_REASON_INTERNAL
    await eventually(lambda: _requested_ttl(api, first.work.id, "1"), timeout=10, message="the release heartbeat")
    assert running.sidecar.supervisor.crashed >= 1
    renewals = len(await api.requests("heartbeat", second.work.id))

    async def renewed_twice_more() -> bool:
        return len(await api.requests("heartbeat", second.work.id)) >= renewals + 2

    await eventually(renewed_twice_more, timeout=10, message="the other lease is still renewed")
    assert await api.state(second.work.id) == "active"
    watch.cancel()


async def _open(api: Api, operation: str, work_id: str, after: int) -> bool:
    entries = (await api.requests(operation, work_id))[after:]
    return any(entry["status"] is None for entry in entries)


async def _requested_ttl(api: Api, work_id: str, ttl: str) -> bool:
    return any(b["query"].get("desired_ttl_seconds") == ttl for b in await api.requests("heartbeat", work_id))


async def _all_answered(api: Api, work_id: str) -> bool:
    return all(b["status"] is not None for b in await api.requests("heartbeat", work_id))


async def test_an_acked_item_is_claimed_even_when_claims_fail_for_a_while(
    api: Api, start_sidecar: SidecarFactory
) -> None:
    """#11.3. Guarantee: after an ack, the claim goes on (with backoff) past its per-attempt deadline until an
    answer is definitive: the item is never left `starting`."""
    running = await start_sidecar(claim_timeout=0.3, claim_backoff=Backoff(initial=0.05, maximum=0.2))
    watch = running.watch()
    await api.fault(operation="heartbeat", status=503, count=12)  # several claim attempts' worth of failures
    (queued,) = await api.enqueue(1)
    assigned = await watch.assigned(timeout=30)
    assert assigned.work.id == queued["id"]
    assert await api.state(queued["id"]) == "active"
    failed = [b for b in await api.requests("heartbeat", queued["id"]) if b["status"] == 503]
    assert len(failed) == 12, "the claim outlived more than one attempt's deadline"
    await running.stop(assigned)
    watch.cancel()


async def test_an_invented_refusal_of_the_claim_does_not_strand_the_item(
    api: Api, start_sidecar: SidecarFactory
) -> None:
    """#11.3 (found by `make chaos`, fuzzed-answers). Guarantee: after a successful ack, one 409 on the claim that
    the Work API never sent (a proxy, a fault) does not leave the item `starting`: the claim is asked again, lands,
    and the item reaches a sandbox."""
    running = await start_sidecar(claim_backoff=Backoff(initial=0.05, maximum=0.2))
    watch = running.watch()
    await api.fault(operation="heartbeat", status=409, count=1)  # answered by the fault; the claim never arrived
    (queued,) = await api.enqueue(1)
    assigned = await watch.assigned(timeout=15)
    assert assigned.work.id == queued["id"]
    assert await api.state(queued["id"]) == "active"
    claims = [b["status"] for b in await api.requests("heartbeat", queued["id"])]
    assert claims[:2] == [409, 200], claims
    await running.stop(assigned)
    watch.cancel()


async def test_refusals_of_the_claim_are_read_not_believed(api: Api, start_sidecar: SidecarFactory) -> None:
    """A claim refused `confirm_refusals` + 1 times in a row after our ack is read, not believed: the item is still
    `starting` on our ack (no claim landed, nobody else can claim it), so the refusals were invented on the way
    and the claim is sent again until it lands. The item reaches its sandbox instead of being stranded."""
    running = await start_sidecar(claim_backoff=Backoff(initial=0.05, maximum=0.2), confirm_refusals=2)
    watch = running.watch()
    await api.fault(operation="heartbeat", status=412, count=3)
    (queued,) = await api.enqueue(1)
    assigned = await watch.assigned(timeout=15)
    assert assigned.work.id == queued["id"]
    assert [b["status"] for b in await api.requests("heartbeat", queued["id"])] == [412, 412, 412, 200]
    assert [g["status"] for g in await api.requests("get", queued["id"])] == [200, 200, 200], "each one read"
    await running.stop(assigned)
    watch.cancel()


async def test_a_refusal_that_cannot_be_read_is_believed_once_it_repeats(
    api: Api, start_sidecar: SidecarFactory
) -> None:
    """The other side of the rule above: when the item cannot be read, a claim refused `confirm_refusals` + 1
    times in a row is not ours; the sidecar stops asking (no claim loop against an item someone else holds) and
    frees the slot."""
    running = await start_sidecar(claim_backoff=Backoff(initial=0.05, maximum=0.2), confirm_refusals=2)
    watch = running.watch()
    await api.fault(operation="heartbeat", status=412, count=3)
    await api.fault(operation="get", status=403, count=None)
    (queued,) = await api.enqueue(1)
    await eventually(lambda: _claims_answered(api, queued["id"], 3), timeout=15, message="three refused claims")
    await api.clear_faults()
    (second,) = await api.enqueue(1)  # the slot is free again: the next item is assigned
    assigned = await watch.assigned(timeout=15)
    assert assigned.work.id == second["id"]
    assert [b["status"] for b in await api.requests("heartbeat", queued["id"])] == [412, 412, 412]
    await running.stop(assigned)
    watch.cancel()


async def test_an_invented_conflict_on_stop_does_not_leave_the_item_held(
    api: Api, start_sidecar: SidecarFactory
) -> None:
    """#11 (found by `make chaos`, fuzzed-answers). Guarantee: a stop answered 409 ("already stopped") while the
    item is not stopped is asked again, so the sandbox's StopWork succeeds and the item is stopped; it used to
    end in ABORTED, and a sandbox that gave up left the item held until it left."""
    running = await start_sidecar(claim_backoff=Backoff(initial=0.05, maximum=0.2))
    watch, item = await running.take_one(api)
    await api.fault(operation="stop", status=409, count=1)
    answer = await running.stop(item)
    assert answer.work.state == pb.WORK_STATE_STOPPED
    assert await api.state(item.work.id) == "stopped"
    assert [r["status"] for r in await api.requests("stop", item.work.id)] == [409, 200]
    watch.cancel()


async def test_a_stop_whose_retries_run_out_in_a_storm_is_asked_again_within_the_deadline(
    api: Api, start_sidecar: SidecarFactory
) -> None:
    """Found by `make chaos` (storm-5xx: half of all requests answer 503). Guarantee: a StopWork whose Work API
    retries all fail with an error that may pass is asked again while the sandbox's deadline leaves room, so the
    item is stopped; it used to end in UNAVAILABLE, and a sandbox that gave up left the item held until it left."""
    running = await start_sidecar(claim_backoff=Backoff(initial=0.05, maximum=0.2))
    watch, item = await running.take_one(api)
    attempts = RetryPolicy().max_attempts
    await api.fault(operation="stop", status=503, count=attempts + 1, retry_after_ms="20")
    answer = await running.stub.StopWork(
        pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True), timeout=30
    )
    assert answer.work.state == pb.WORK_STATE_STOPPED
    assert await api.state(item.work.id) == "stopped"
    assert [r["status"] for r in await api.requests("stop", item.work.id)] == [503] * (attempts + 1) + [200]
    watch.cancel()


@pytest.mark.parametrize("retry_after_ms", ["20", None], ids=["retry-after-20ms", "the-clients-own-backoff"])
async def test_a_stop_that_keeps_failing_ends_in_unavailable_before_the_deadline(
    api: Api, start_sidecar: SidecarFactory, retry_after_ms: str | None
) -> None:
    """The other side: with every stop answered 503, StopWork answers UNAVAILABLE before the sandbox's deadline
    (so the sandbox hears why, and may try again), and the lease is still held. The deadline bounds the Work API
    client's own retries too: without a short Retry-After they used to run on past it (DEADLINE_EXCEEDED)."""
    running = await start_sidecar(claim_backoff=Backoff(initial=0.05, maximum=0.2))
    watch, item = await running.take_one(api)
    await api.fault(operation="stop", status=503, count=None, retry_after_ms=retry_after_ms)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.StopWork(
            pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True), timeout=3
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(refused.value).reason == "STOP_PENDING"
    assert time.monotonic() - started < 3
    # with Retry-After 20 ms the client's retries run out and the sidecar asks again; its own backoff takes longer
    asked = len(await api.requests("stop", item.work.id))
    assert asked > RetryPolicy().max_attempts if retry_after_ms else asked >= 2
    await api.clear_faults()
    # StopWork again joins the stop that goes on: one stop is answered 200, not two.
    assert (await running.stop(item)).work.state == pb.WORK_STATE_STOPPED
    assert [r["status"] for r in await api.requests("stop", item.work.id)].count(200) == 1
    watch.cancel()


async def test_a_stop_past_the_deadline_goes_on_and_its_item_is_not_requeued_when_the_sandbox_leaves(
    api: Api, start_sidecar: SidecarFactory
) -> None:
    """Guarantee (no duplicate execution): a sandbox that hears STOP_PENDING and leaves has finished its item.
    The sidecar keeps asking for the stop and keeps the lease (renewed, never released) until the Work API stops
    the item; releasing it would hand finished work to another sandbox. It used to be released at once."""
    running = await start_sidecar(
        claim_backoff=Backoff(initial=0.05, maximum=0.2), reattach_grace=0.0, liveness_window=0.0
    )
    watch, item = await running.take_one(api)
    await api.fault(operation="stop", status=503, count=None, retry_after_ms="20")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.StopWork(
            pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True), timeout=2
        )
    assert error_info(refused.value).reason == "STOP_PENDING"
    watch.cancel()  # the sandbox gives up and leaves (no grace)
    asked = len(await api.requests("stop", item.work.id))
    renewed = len(await api.requests("heartbeat", item.work.id))

    async def still_asking_and_renewing() -> bool:
        return (
            len(await api.requests("stop", item.work.id)) >= asked + 3
            and len(await api.requests("heartbeat", item.work.id)) >= renewed + 2
        )

    await eventually(still_asking_and_renewing, timeout=15, message="the stop and the renewals go on")
    assert await api.state(item.work.id) == "active"
    assert not await _requested_ttl(api, item.work.id, "1"), "the item was released while its stop was pending"
    await api.clear_faults()

    async def stopped() -> bool:
        return await api.state(item.work.id) == "stopped" and running.sidecar.leases.get(item.work.id) is None

    await eventually(stopped, timeout=10, message="the stop went through and ended the lease")
    assert not await _requested_ttl(api, item.work.id, "1")


async def test_a_stop_answered_404_loses_the_lease(api: Api, start_sidecar: SidecarFactory) -> None:
    """404 on a stop is not doubted: the item is gone, so the lease is lost; the sandbox hears NOT_FOUND, and a
    later call on the item says the lease is lost (FAILED_PRECONDITION), not that a stop is pending."""
    running = await start_sidecar()
    watch, item = await running.take_one(api)
    await api.fault(operation="stop", status=404, count=None)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stop(item)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert running.sidecar.leases.get(item.work.id) is None
    lease = running.sidecar.leases.table.authorize(item.work.id, item.lease_token)
    assert lease is not None and lease.state == pb.LEASE_STATE_LOST
    assert not running.sidecar.stops.pending(lease)
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await running.stop(item)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await api.clear_faults()
    watch.cancel()


async def test_a_force_stop_replaces_a_pending_graceful_one(api: Api, start_sidecar: SidecarFactory) -> None:
    """A pending graceful stop does not hold back a force stop: StopWork(force) replaces it, and a later
    StopWork joins the force stop (the item ends `stopped`, not `stopping`)."""
    running = await start_sidecar(claim_backoff=Backoff(initial=0.05, maximum=0.2))
    watch, item = await running.take_one(api)
    await api.fault(operation="stop", status=503, count=None, retry_after_ms="20")
    for force in (False, True):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await running.stub.StopWork(
                pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=force), timeout=2
            )
        info = error_info(refused.value)
        assert (info.reason, info.metadata["force"]) == ("STOP_PENDING", str(force).lower())
    await api.clear_faults()
    joined = await running.stub.StopWork(
        pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=False), timeout=10
    )
    assert joined.work.state == pb.WORK_STATE_STOPPED
    assert await api.state(item.work.id) == "stopped"
    watch.cancel()


async def test_a_stop_the_sandbox_cancels_still_happens(api: Api, start_sidecar: SidecarFactory) -> None:
    """Guarantee: a StopWork cancelled by its sandbox (it died, or gave up early) while the Work API was failing
    still stops the item: what the sandbox asked for does not depend on its staying to hear the answer."""
    running = await start_sidecar(claim_backoff=Backoff(initial=0.05, maximum=0.2))
    watch, item = await running.take_one(api)
    await api.fault(operation="stop", status=503, count=None, retry_after_ms="20")
    call = running.stub.StopWork(pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True))

    async def asked() -> bool:
        return len(await api.requests("stop", item.work.id)) >= 2

    await eventually(asked, timeout=10, message="the stop is being asked")
    call.cancel()
    await api.clear_faults()
    await eventually(lambda: _state_is(api, item.work.id, "stopped"), timeout=10, message="the item stopped")
    watch.cancel()


async def _state_is(api: Api, work_id: str, state: str) -> bool:
    return await api.state(work_id) == state


async def test_a_conflict_on_stop_that_repeats_is_aborted(api: Api, start_sidecar: SidecarFactory) -> None:
    """The other side: 409 on every stop while the item is active ends in ABORTED (WORK_CONFLICT) after
    `confirm_refusals` + 1 stops, and the lease is still held (the sandbox may try again)."""
    running = await start_sidecar(claim_backoff=Backoff(initial=0.05, maximum=0.2), confirm_refusals=1)
    watch, item = await running.take_one(api)
    await api.fault(operation="stop", status=409, count=None)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stop(item)
    assert refused.value.code() == grpc.StatusCode.ABORTED
    assert len(await api.requests("stop", item.work.id)) == 2
    await api.clear_faults()
    assert (await running.stop(item)).work.state == pb.WORK_STATE_STOPPED
    watch.cancel()


async def test_a_conflict_on_stop_with_no_time_left_to_ask_again_is_pending(
    api: Api, start_sidecar: SidecarFactory
) -> None:
    """A 409 on a stop is asked again after a backoff; when the sandbox's deadline leaves no room for that,
    StopWork answers UNAVAILABLE (STOP_PENDING) before the deadline (it used to run past it: DEADLINE_EXCEEDED),
    and the stop goes on: once the conflicts end, the item is stopped."""
    running = await start_sidecar(claim_backoff=Backoff(initial=5.0, maximum=5.0), confirm_refusals=5)
    watch, item = await running.take_one(api)
    await api.fault(operation="stop", status=409, count=None)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await running.stub.StopWork(
            pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True), timeout=2
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    assert error_info(refused.value).reason == "STOP_PENDING"
    assert time.monotonic() - started < 2
    await api.clear_faults()
    await eventually(lambda: _state_is(api, item.work.id, "stopped"), timeout=15, message="the stop went on")
    watch.cancel()


async def _claims_answered(api: Api, work_id: str, count: int) -> bool:
    return len([b for b in await api.requests("heartbeat", work_id) if b["status"] is not None]) >= count


@pytest.mark.slow  # pings until the transport's window is full (20+ s); tests/chaos has a shorter twin in make test
async def test_keepalive_client_that_does_not_read_is_cut(api: Api, start_sidecar: SidecarFactory) -> None:
    """#11.4. Guarantee: a KeepAlive client that pings without reading costs bounded memory and is cut with
    RESOURCE_EXHAUSTED."""
    running = await start_sidecar(ttl_seconds=60)  # the flood shares this event loop: keep renewals out of it
    watch, item = await running.take_one(api)
    ping = pb.KeepAliveRequest(work_id=item.work.id, lease_token=item.lease_token)
    rss_before = psutil.Process().memory_info().rss
    call = running.stub.KeepAlive()
    sent, deadline = 0, time.monotonic() + 90
    while sent < 500_000 and time.monotonic() < deadline:  # until the transport's window is full and it is cut
        write = asyncio.ensure_future(call.write(ping))
        done, _ = await asyncio.wait({write}, timeout=3)  # not wait_for: cancelling a write cancels the call
        if not done or write.exception() is not None:
            break
        sent += 1
    answers = await _read_to_the_end(call)  # the status comes after the unread answers (HTTP/2 trailers)
    assert await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"after {sent} pings, {answers} answers"
    grown = psutil.Process().memory_info().rss - rss_before
    assert grown < 50_000_000, f"memory grew by {grown / 1e6:.0f} MB"
    assert await api.state(item.work.id) == "active", "the lease itself lives on"
    await running.stop(item)
    watch.cancel()


async def _read_to_the_end(call: AsyncIterable[object]) -> int:
    answers = 0
    with contextlib.suppress(grpc.aio.AioRpcError):
        async for _ in call:
            answers += 1
    return answers


async def test_keepalive_answers_are_coalesced_per_item(api: Api, start_sidecar: SidecarFactory) -> None:
    """#11.4. A client that reads gets every ping answered with the lease's latest status."""
    running = await start_sidecar()
    watch, item = await running.take_one(api)
    call = running.stub.KeepAlive()
    for _ in range(50):
        await call.write(pb.KeepAliveRequest(work_id=item.work.id, lease_token=item.lease_token))
    first = await asyncio.wait_for(call.read(), 5)
    assert isinstance(first, pb.KeepAliveResponse), f"the stream ended: {first!r}"
    assert first.lease.work_id == item.work.id and first.lease.state == pb.LEASE_STATE_ACTIVE
    await call.done_writing()
    await running.stop(item)
    watch.cancel()


@pytest.mark.parametrize(
    ("call", "field"),
    [
        ("watch", "sandbox_id"),
        ("watch-newline", "sandbox_id"),
        ("get", "work_id"),
        ("list", "page_token"),
        ("update", "metadata keys"),
    ],
)
async def test_client_strings_have_limits(
    api: Api, start_sidecar: SidecarFactory, call: str, field: str, caplog: pytest.LogCaptureFixture
) -> None:
    """#11.10. Guarantee: an over-long or control-character string is INVALID_ARGUMENT naming the field, never
    echoed back, never logged verbatim."""
    running = await start_sidecar()
    huge = "x" * 1_000_000
    stub = running.stub

    async def attempt() -> None:
        if call == "watch":
            await anext(aiter(stub.WatchWork(pb.WatchWorkRequest(sandbox_id=huge))))
        elif call == "watch-newline":
            await anext(aiter(stub.WatchWork(pb.WatchWorkRequest(sandbox_id="sb\nlevel=ERROR forged"))))
        elif call == "get":
            await stub.GetWork(pb.GetWorkRequest(work_id=huge, lease_token="t"))
        elif call == "list":
            await stub.ListWork(pb.ListWorkRequest(page_token=huge[:100_000]))
        else:
            watch, item = await running.take_one(api)
            await stub.UpdateWorkMetadata(
                pb.UpdateWorkMetadataRequest(work_id=item.work.id, lease_token=item.lease_token, set={huge: "v"})
            )
            watch.cancel()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await attempt()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")
    assert len(caught.value.details() or "") < 300, "the value is not echoed"
    assert all("forged" not in r.getMessage() and huge not in str(r.__dict__) for r in caplog.records)


TRUNCATED = b"\x0a\x7fab"  # field 1, length-delimited: 127 bytes announced, 2 sent
BAD_UTF8 = b"\x0a\x03\xff\xfe\xfd"  # field 1 (work_id, a string) holding invalid UTF-8


@pytest.mark.parametrize(
    ("method", "garbage"),
    [
        *[(m, TRUNCATED) for m in ("GetWork", "StopWork", "ListWork", "WatchWork", "KeepAlive", "GetQueueStats")],
        *[(m, BAD_UTF8) for m in ("GetWork", "StopWork", "KeepAlive")],
    ],
)
async def test_bytes_that_are_not_a_message_are_invalid_argument(
    start_sidecar: SidecarFactory, method: str, garbage: bytes
) -> None:
    """#11.10. Guarantee: invalid protobuf or invalid UTF-8 is INVALID_ARGUMENT, never UNKNOWN."""
    running = await start_sidecar()
    path = f"/sidecar.work.v1.WorkService/{method}"
    identity: Any = None
    channel = running.channel

    async def attempt() -> None:
        if method == "WatchWork":
            stream = channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)
            await anext(aiter(stream(garbage)))
        elif method == "KeepAlive":
            bidi = channel.stream_stream(path, request_serializer=identity, response_deserializer=identity)
            duplex = bidi()
            await duplex.write(garbage)
            await duplex.read()
        else:
            unary = channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)
            await unary(garbage)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await attempt()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()


async def test_readiness_follows_the_work_api_and_liveness_does_not(api: Api, start_sidecar: SidecarFactory) -> None:
    """#11.11. Guarantee: readiness turns NOT_SERVING while every poll fails (a revoked key here) and SERVING
    again when polls work; liveness stays SERVING throughout (an API outage must not restart the sidecar)."""
    running = await start_sidecar(unready_after=0.5)
    health = health_pb2_grpc.HealthStub(running.channel)

    async def status(service: str) -> int:
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        return int(answer.status)

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    watch = running.watch()  # a watcher makes the sidecar poll
    await api.fault(operation="poll", status=401, count=None)
    await eventually(lambda: _is(status(""), not_serving), timeout=20, message="readiness turns NOT_SERVING")
    assert await status("sidecar.work.v1.WorkService") == not_serving
    assert await status("liveness") == serving
    await api.clear_faults()
    await eventually(lambda: _is(status(""), serving), timeout=90, message="readiness comes back")
    watch.cancel()


async def _is(value: Awaitable[object], expected: int) -> bool:
    return bool(await value == expected)
