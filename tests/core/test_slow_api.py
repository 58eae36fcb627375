"""A slow Work API costs no lease, and a lease is fenced by the clock whatever its renewal waits for.

The sidecar (real gRPC, the real emulator over HTTP) holds leases at TTL 4: renewals every 1.25 s, fenced 1.5 s
before the TTL runs out. The emulator answers slowly (its latency faults), and other requests hold connections:

- many leases renew at once against a round trip near the renewal window (not one at a time);
- reads a sandbox asks for, holding every connection of the pool, do not hold up a renewal (heartbeats have
  their own lane);
- a renewal stuck on a slow read (the read that settles a doubtful refusal) does not keep the sandbox holding
  past the Work API's lease: LeaseLost comes at the fencing point, by the clock;
- no renewal goes out too late for its answer to come before the fencing point.
"""

from __future__ import annotations

import asyncio
import time

from sidecar.core.engine._lease import Leases
from sidecar.core.engine._leaser import Leaser
from sidecar.core.engine._policy import MIN_SEND_SECONDS, LeasePolicy
from sidecar.core.engine._supervisor import Supervisor
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.workapi import HeartbeatResult, Work, WorkApiClient, WorkData
from tests.helpers import eventually

from .conftest import KEY, Api, SidecarFactory

TTL = 4  # renewals every 1.25 s; fenced 2.5 s after the last successful heartbeat was sent


async def _renewals_ok(api: Api, work_id: str) -> int:
    return sum(1 for e in await api.requests("heartbeat", work_id) if e["status"] == 200)


async def test_many_leases_renew_at_once_against_a_slow_api(api: Api, start_sidecar: SidecarFactory) -> None:
    """Four leases, every heartbeat answered after 0.9 s: renewed side by side, each keeps its lease. One at a time,
    four renewals would need 3.6 s of every 1.25 s and the leases would be fenced."""
    running = await start_sidecar(ttl_seconds=TTL)
    watch = running.watch(max_in_flight=4)
    await api.enqueue(4)
    items = [await watch.assigned() for _ in range(4)]
    ids = [item.work.id for item in items]
    await api.fault("heartbeat", latency_ms=900, count=None)
    before = {work_id: await _renewals_ok(api, work_id) for work_id in ids}

    async def renewed_thrice() -> bool:
        counts = {work_id: await _renewals_ok(api, work_id) for work_id in ids}
        return all(counts[work_id] >= before[work_id] + 3 for work_id in ids)

    await eventually(renewed_thrice, timeout=15, message="every lease renewed three times through the slow API")
    assert watch.events.empty(), "no lease was lost"
    for item in items:
        got = await running.stub.GetWork(pb.GetWorkRequest(work_id=item.work.id, lease_token=item.lease_token))
        assert got.lease.state == pb.LEASE_STATE_ACTIVE
    watch.cancel()


async def test_reads_holding_every_connection_do_not_hold_up_renewals(api: Api, start_sidecar: SidecarFactory) -> None:
    """Two connections for everything but heartbeats, and a sandbox's reads hold both for 3 s at a time, more than
    the fenced window: the lease renews on its own lane all the while."""
    running = await start_sidecar(ttl_seconds=TTL, max_connections=2)
    watch, item = await running.take_one(api)
    work_id = item.work.id
    await api.fault("get", latency_ms=3000, count=None)
    request = pb.GetWorkRequest(work_id=work_id, lease_token=item.lease_token)
    reads = [asyncio.ensure_future(running.stub.GetWork(request)) for _ in range(6)]

    async def both_held() -> bool:
        return len(await api.requests("get", work_id)) >= 2

    await eventually(both_held, timeout=5, message="the reads hold both connections")
    before = await _renewals_ok(api, work_id)
    started = time.monotonic()
    await eventually(
        lambda: _renewals_ok_since(api, work_id, before, 3), timeout=10, message="three renewals while the reads wait"
    )
    assert time.monotonic() - started < 6.0, "the renewals did not wait for the reads"
    assert not all(read.done() for read in reads), "the reads were still holding the connections"
    assert watch.events.empty(), "the lease was not lost"
    await asyncio.gather(*reads)
    watch.cancel()


async def _renewals_ok_since(api: Api, work_id: str, before: int, more: int) -> bool:
    return await _renewals_ok(api, work_id) >= before + more


async def test_a_renewal_stuck_on_a_slow_read_is_fenced_by_the_clock(api: Api, start_sidecar: SidecarFactory) -> None:
    """A renewal is applied and its answer lost; the renewal sent again is refused with no state to read in the
    refusal, so the sidecar reads the item, and that read takes 10 s. The sandbox hears LeaseLost (EXPIRED) at the
    fencing point, while the Work API's lease still runs, not after the read."""
    running = await start_sidecar(ttl_seconds=TTL)
    watch, item = await running.take_one(api)
    work_id = item.work.id
    await api.fault("get", latency_ms=10_000, count=None)
    await api.fault("heartbeat", after_apply="lose")
    await api.fault("heartbeat", status=412)  # an invented refusal: no current_state, so a GET must settle it
    event = await watch.next("lease_lost", timeout=8)
    view = await api.item(work_id)
    assert event.lease_lost.reason == pb.LEASE_LOST_REASON_EXPIRED
    assert view["state"] == "active" and view["lease_expires_in_seconds"] > 0, (
        f"LeaseLost came after the Work API's lease ran out: {view}"
    )
    watch.cancel()


async def test_no_renewal_is_sent_too_late_for_its_answer(api: Api) -> None:
    """A renewal due with less than `MIN_SEND_SECONDS` left before the fencing point is not sent (its answer could
    not come in time, and applied it would only extend the lease for nobody): the lease is fenced at its point."""
    policy = LeasePolicy(ttl_seconds=TTL)
    leases = Leases()
    window = TTL - policy.fence_margin(TTL)
    beat = HeartbeatResult(
        last_heartbeat="2026-01-01T00:00:00.000001Z", lease_extended=True, state="active", ttl_seconds=TTL
    )
    work = Work(
        id="work_late",
        environment_id=api.environment_id,
        data=WorkData(type="session", id="s"),
        state="active",
        metadata={},
    )
    lease = leases.claim(work, beat, sent_at=time.monotonic() - window + MIN_SEND_SECONDS / 2, ttl_seconds=TTL)
    supervisor = Supervisor()
    async with WorkApiClient(
        provider="anthropic", api_key=KEY, environment_id=api.environment_id, base_url=api.url
    ) as client:
        leaser = Leaser(client, policy, leases, concurrency=4, supervisor=supervisor)
        supervisor.keep(leaser.run, name="leaser")
        leaser.track(lease, at_once=True)
        await eventually(lambda: lease.ended, timeout=2, message="the lease fenced")
        await supervisor.close()
    assert lease.lost_reason == pb.LEASE_LOST_REASON_EXPIRED
    assert await api.requests("heartbeat", "work_late") == [], "nothing was sent"
