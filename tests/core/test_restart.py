"""Leases survive a sidecar crash (issue #12): real `work-sidecar serve` processes, a real `kill -9`, a restart
with the same `--state-dir`, sandboxes that re-attach with their old tokens, and the emulator's admin API as the
witness (deliveries, heartbeats, 412s)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.client import Assignment, SidecarClient
from sidecar.core.persistence import JOURNAL_FILE
from sidecar.wire import get_provider
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from tests.helpers import eventually, serving, stays

from .conftest import ENV, KEY, Api, Watch

BIN = Path(sys.executable).parent
TTL = 8
"""A restart must come within the lease's TTL (a documented limit): the kill may fall just before a renewal, so the
new process has TTL/2 after the last renewal minus the time it takes to adopt. At TTL 3 (1.5 s) the restart tests
failed whenever other processes loaded both cores (CI's other test worker; two busy loops reproduce it, at 0dac5de
as at 7c4399f); at TTL 8 (4 s) they pass under that load."""


@dataclass
class Sidecar:
    """One `work-sidecar serve --state-dir` process at a time, on the same socket and state dir."""

    api: Api
    dir: str
    grace: float = 5.0
    extra: Sequence[str] = ()
    proc: asyncio.subprocess.Process | None = None
    channel: grpc.aio.Channel | None = None
    runs: int = 0
    logs: list[Path] = field(default_factory=list)
    state: str = ""
    ttl: int = TTL
    """The lease TTL the sidecar asks the Work API for (`--ttl`)."""

    @property
    def socket(self) -> str:
        return f"{self.dir}/s.sock"

    @property
    def state_dir(self) -> str:
        return self.state or f"{self.dir}/state"

    @property
    def stub(self) -> pb_grpc.WorkServiceAsyncStub:
        assert self.channel is not None
        stub: pb_grpc.WorkServiceAsyncStub = pb_grpc.WorkServiceStub(self.channel)  # grpc.aio: the async stub
        return stub

    async def start(self, *extra: str, wait: bool = True, key: str = KEY, environment_id: str = ENV) -> None:
        self.runs += 1
        log = Path(self.dir) / f"sidecar-{self.runs}.log"
        self.logs.append(log)
        env = {**os.environ, "WORK_SIDECAR_API_KEY": key, "WORK_SIDECAR_LOG_FORMAT": "json"}
        with log.open("wb") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                str(BIN / "work-sidecar"), "serve",
                "--api-url", self.api.url, "--environment-id", environment_id, "--listen", f"unix://{self.socket}",
                "--ttl", str(self.ttl), "--release-ttl", "1", "--reattach-grace", str(self.grace),
                "--liveness-window", "1", "--state-dir", self.state_dir, *self.extra, *extra,
                env=env, stdout=subprocess.DEVNULL, stderr=stderr,
            )  # fmt: skip
        if self.channel is not None:
            await self.channel.close()
        self.channel = channel = grpc.aio.insecure_channel(f"unix://{self.socket}")
        if wait:
            await eventually(lambda: serving(channel), timeout=20, message="sidecar process serving")

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL

    def log_lines(self, run: int = -1) -> list[dict[str, Any]]:
        lines = []
        for raw in self.logs[run].read_text().splitlines():
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))
        return lines

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def sidecar(api: Api, short_dir: str) -> AsyncIterator[Sidecar]:
    process = Sidecar(api, short_dir)
    yield process
    await process.close()


async def _hold(sidecar: Sidecar, count: int) -> tuple[Watch, list[pb.WorkAssigned]]:
    watch = Watch(sidecar.stub.WatchWork(pb.WatchWorkRequest(max_in_flight=count, sandbox_id="sb-1"))).start()
    await sidecar.api.enqueue(count)
    return watch, [await watch.assigned() for _ in range(count)]


async def _keepalive(stub: pb_grpc.WorkServiceAsyncStub, items: Sequence[pb.WorkAssigned]) -> dict[str, pb.Lease]:
    """Ping every item once with its old token on a fresh KeepAlive stream: the first status of each."""
    done = asyncio.Event()

    async def pings() -> AsyncIterator[pb.KeepAliveRequest]:
        for item in items:
            yield pb.KeepAliveRequest(work_id=item.work.id, lease_token=item.lease_token)
        await done.wait()

    call = stub.KeepAlive(pings())
    seen: dict[str, pb.Lease] = {}
    try:
        async with asyncio.timeout(10):
            async for response in call:
                seen[response.lease.work_id] = response.lease
                if len(seen) == len(items):
                    break
    finally:
        done.set()
        call.cancel()
    return seen


async def _heartbeats_412(api: Api) -> list[dict[str, Any]]:
    return [entry for entry in await api.requests("heartbeat") if entry["status"] == 412]


async def test_kill9_and_restart_keeps_every_lease(api: Api, sidecar: Sidecar) -> None:
    await sidecar.start()
    watch, items = await _hold(sidecar, 5)
    await sidecar.kill9()
    watch.cancel()
    await sidecar.start()
    statuses = await _keepalive(sidecar.stub, items)  # re-attach with the old tokens
    assert {work_id: lease.state for work_id, lease in statuses.items()} == {
        item.work.id: pb.LEASE_STATE_ACTIVE for item in items
    }
    before = {item.work.id: (await api.item(item.work.id))["heartbeats"] for item in items}

    async def renewed_twice() -> bool:
        for item in items:
            view = await api.item(item.work.id)
            if view["state"] != "active" or view["heartbeats"] < before[item.work.id] + 2:
                return False
        return True

    # A new watch keeps the leases present while the new process renews them by CAS, past two TTLs.
    resumed = Watch(
        sidecar.stub.WatchWork(
            pb.WatchWorkRequest(
                max_in_flight=5,
                resume=[pb.HeldLease(work_id=i.work.id, lease_token=i.lease_token) for i in items],
            )
        )
    ).start()
    await eventually(renewed_twice, timeout=3 * TTL, message="renewals continue after the restart")
    assert await _heartbeats_412(api) == [], "every renewal after the restart passed the compare-and-swap"
    for item in items:
        view = await api.item(item.work.id)
        assert view["deliveries"] == 1 and view["requeues"] == 0, "nothing was re-delivered"
        stopped = await sidecar.stub.StopWork(
            pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True)
        )
        assert stopped.work.state == pb.WORK_STATE_STOPPED
    resumed.cancel()
    adopted = [line for line in sidecar.log_lines() if line.get("msg", "").startswith("adopted the leases")]
    assert adopted and adopted[0]["leases"] == 5


async def test_watchwork_resume_carries_a_pending_stop_again(api: Api, sidecar: Sidecar) -> None:
    await sidecar.start()
    watch, [item] = await _hold(sidecar, 1)
    await sidecar.kill9()
    watch.cancel()
    await api.platform_stop(item.work.id)  # requested while no sidecar runs
    await sidecar.start()
    held = pb.HeldLease(work_id=item.work.id, lease_token=item.lease_token)
    forged = pb.HeldLease(work_id=item.work.id, lease_token=item.lease_token[:-2] + "xx")
    resumed = Watch(sidecar.stub.WatchWork(pb.WatchWorkRequest(resume=[forged, held]))).start()
    unknown = await resumed.next("lease_lost")
    assert unknown.lease_lost.reason == pb.LEASE_LOST_REASON_UNKNOWN, "a forged token is refused"
    stop = await resumed.next("stop_requested", timeout=3 * TTL)
    assert stop.stop_requested.work_id == item.work.id
    stopped = await sidecar.stub.StopWork(pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token))
    assert stopped.work.state == pb.WORK_STATE_STOPPED
    assert (await api.item(item.work.id))["deliveries"] == 1


async def test_abandoned_leases_are_released_after_the_grace(api: Api, short_dir: str) -> None:
    sidecar = Sidecar(api, short_dir, grace=1.0)
    try:
        await sidecar.start()
        watch, items = await _hold(sidecar, 2)
        await sidecar.kill9()
        watch.cancel()
        await sidecar.start()
        for item in items:
            await eventually(
                lambda item=item: _state_is(api, item.work.id, "queued"),  # type: ignore[misc]
                timeout=TTL + 5,
                message="an adopted lease nobody re-attached to is released",
            )
        late = await _keepalive(sidecar.stub, items)
        assert {lease.lost_reason for lease in late.values()} == {pb.LEASE_LOST_REASON_SANDBOX_GONE}
    finally:
        await sidecar.close()


async def test_a_lease_whose_item_went_back_to_the_queue_while_the_sidecar_was_down_is_lost(
    api: Api, sidecar: Sidecar
) -> None:
    """The Work API let the lease run out while the sidecar was down (the item is queued again, for anyone): the
    successor's renewal is refused, the read shows `queued`, and the sandbox that re-attaches hears LeaseLost. (Its
    watch has no free slot, so the sidecar does not poll the item back meanwhile.)"""
    await sidecar.start()
    watch, [kept, taken] = await _hold(sidecar, 2)
    await sidecar.kill9()
    watch.cancel()
    await api.admin.expire_lease(api.environment_id, taken.work.id)
    await sidecar.start()
    resumed = Watch(
        sidecar.stub.WatchWork(
            pb.WatchWorkRequest(
                max_in_flight=1, resume=[pb.HeldLease(work_id=kept.work.id, lease_token=kept.lease_token)]
            )
        )
    ).start()

    async def taken_is_lost() -> pb.Lease | None:
        lease = (await _keepalive(sidecar.stub, [taken]))[taken.work.id]
        return lease if lease.state == pb.LEASE_STATE_LOST else None

    lost = await eventually(taken_is_lost, timeout=3 * TTL, message="the requeued item's lease is lost")
    assert lost is not None and lost.lost_reason == pb.LEASE_LOST_REASON_PRECONDITION_FAILED
    ended = [
        line
        for line in sidecar.log_lines()
        if line.get("msg") == "lease ended" and line.get("work_id") == taken.work.id
    ]
    assert ended and "reads queued" in ended[0]["detail"], ended
    assert (await _keepalive(sidecar.stub, [kept]))[kept.work.id].state == pb.LEASE_STATE_ACTIVE
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await sidecar.stub.StopWork(pb.StopWorkRequest(work_id=taken.work.id, lease_token=taken.lease_token))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION, "LEASE_LOST, not a bare refusal"
    assert resumed.events.empty(), "the resumed watch heard nothing: the lost lease was not on it"
    resumed.cancel()


async def test_a_renewal_that_landed_as_the_sidecar_died_costs_no_lease(api: Api, sidecar: Sidecar) -> None:
    """The predecessor was killed with a renewal in flight that the Work API applied: the CAS value moved, and the
    journal never heard. The successor's first renewal echoes the journaled value and is refused; inside the
    journaled lease nobody else can have renewed the item, so the refusal is read, the moved value adopted, and the
    sandbox that re-attaches keeps its item: never lost, never delivered again."""
    await sidecar.start()
    watch, [landed, quiet] = await _hold(sidecar, 2)
    await sidecar.kill9()
    watch.cancel()
    view = await api.item(landed.work.id)
    profile = get_provider("anthropic")
    answer = await api.http.post(  # the renewal the killed process had sent, applied by the Work API
        profile.work_path(api.environment_id, f"/{landed.work.id}/heartbeat"),
        params={"expected_last_heartbeat": view["last_heartbeat"], "desired_ttl_seconds": str(TTL)},
        headers={"authorization": f"Bearer {KEY}", **profile.extra_headers},
    )
    assert answer.status_code == 200, answer.text
    await sidecar.start()
    resumed = Watch(
        sidecar.stub.WatchWork(
            pb.WatchWorkRequest(
                max_in_flight=2,
                resume=[pb.HeldLease(work_id=i.work.id, lease_token=i.lease_token) for i in (landed, quiet)],
            )
        )
    ).start()

    async def settled_and_renewed() -> bool:
        statuses = [e["status"] for e in await api.requests("heartbeat", landed.work.id)]
        return 412 in statuses and statuses[statuses.index(412) :].count(200) >= 2

    await eventually(settled_and_renewed, timeout=3 * TTL, message="the refusal settled, then renewals go on")
    assert resumed.events.empty(), "the sandbox heard nothing: its lease was never lost"
    statuses = await _keepalive(sidecar.stub, [landed, quiet])
    assert {work_id: lease.state for work_id, lease in statuses.items()} == {
        landed.work.id: pb.LEASE_STATE_ACTIVE,
        quiet.work.id: pb.LEASE_STATE_ACTIVE,
    }
    for item in (landed, quiet):
        view = await api.item(item.work.id)
        assert view["state"] == "active" and view["deliveries"] == 1 and view["requeues"] == 0
    resumed.cancel()


async def test_crash_mid_claim_leaves_nothing_starting(api: Api, sidecar: Sidecar) -> None:
    await sidecar.start()
    await api.fault(operation="heartbeat", latency_ms=6_000, drop=True)  # the claim hangs, never lands
    watch = Watch(sidecar.stub.WatchWork(pb.WatchWorkRequest())).start()
    [queued] = await api.enqueue(1)
    await eventually(lambda: api.requests("ack", queued["id"]), timeout=10, message="acked")
    await sidecar.kill9()
    watch.cancel()
    await api.clear_faults()
    assert await api.state(queued["id"]) == "starting"
    await sidecar.start()

    async def claimed_again() -> bool:
        beats = await api.requests("heartbeat", queued["id"])
        return any(e["status"] == 200 and "NO_HEARTBEAT" in str(e["query"]) for e in beats)

    await eventually(claimed_again, timeout=10, message="the successor claims the acked item (with a short TTL)")
    await eventually(lambda: _state_is(api, queued["id"], "queued"), timeout=10, message="released, not starting")


async def test_crash_mid_release_finishes_the_release(api: Api, short_dir: str) -> None:
    sidecar = Sidecar(api, short_dir, grace=0.2)
    try:
        await sidecar.start()
        watch, [item] = await _hold(sidecar, 1)
        await api.fault(operation="heartbeat", latency_ms=6_000, drop=True, count=None)
        watch.cancel()  # the sandbox leaves: after the grace the lease is released (its heartbeat hangs)
        await eventually(
            lambda: _journal_says(sidecar, item.work.id, "E"), timeout=10, message="release begun and journaled"
        )
        await sidecar.kill9()
        await api.clear_faults()
        await sidecar.start()
        late = await _keepalive(sidecar.stub, [item])
        assert late[item.work.id].lost_reason == pb.LEASE_LOST_REASON_SANDBOX_GONE, "the tombstone survived"
        await eventually(lambda: _state_is(api, item.work.id, "queued"), timeout=TTL + 5, message="requeued")
    finally:
        await sidecar.close()


async def test_torn_and_corrupt_journal_adopts_what_parses(api: Api, sidecar: Sidecar) -> None:
    await sidecar.start()
    watch, items = await _hold(sidecar, 3)
    await sidecar.kill9()
    watch.cancel()
    path = Path(sidecar.state_dir) / JOURNAL_FILE
    lines = []
    for line in path.read_bytes().split(b"\n"):
        if items[0].work.id.encode() in line:  # every record of item 0 damaged: a byte flipped, the checksum fails
            line = line[:12] + (b"X" if line[12:13] != b"X" else b"Y") + line[13:]
        lines.append(line)
    path.write_bytes(b"\n".join(lines) + b'0badc0de {"op":"L","work":"work_')  # and a torn last line
    await sidecar.start()
    statuses = await _keepalive(sidecar.stub, items[1:])
    assert all(lease.state == pb.LEASE_STATE_ACTIVE for lease in statuses.values())
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await _keepalive(sidecar.stub, items[:1])
    assert unknown.value.code() == grpc.StatusCode.PERMISSION_DENIED
    damage = [line for line in sidecar.log_lines() if "journal was damaged" in line.get("msg", "")]
    assert damage and damage[0]["torn"] == 1 and damage[0]["corrupt"] >= 1


async def test_a_journal_of_another_environment_is_refused(api: Api, sidecar: Sidecar) -> None:
    await sidecar.start()
    watch, [item] = await _hold(sidecar, 1)
    await sidecar.kill9()
    watch.cancel()
    await sidecar.start(environment_id="env_other")
    refused = [line for line in sidecar.log_lines() if "was not adopted" in line.get("msg", "")]
    assert len(refused) == 1 and "another environment" in refused[0]["reason"]
    assert Path(refused[0]["moved_to"]).exists()
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await _keepalive(sidecar.stub, [item])
    assert unknown.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not _journal_says(sidecar, item.work.id, "L"), "the new journal starts empty"
    beats = len(await api.requests("heartbeat", item.work.id))

    async def untouched() -> bool:
        return len(await api.requests("heartbeat", item.work.id)) == beats

    await stays(untouched, seconds=1.0)


async def test_two_sidecars_cannot_share_a_state_dir(api: Api, sidecar: Sidecar, short_dir: str) -> None:
    await sidecar.start()
    os.mkdir(f"{short_dir}/other")
    other = Sidecar(api, f"{short_dir}/other", state=sidecar.state_dir)
    try:
        await other.start(wait=False)
        assert other.proc is not None
        assert await asyncio.wait_for(other.proc.wait(), 20) == 2
        assert "another work-sidecar process" in other.logs[-1].read_text(), "one line that names the cause"
    finally:
        await other.close()


async def _state_is(api: Api, work_id: str, state: str) -> bool:
    return await api.state(work_id) == state


def _journal_says(sidecar: Sidecar, work_id: str, op: str) -> bool:
    path = Path(sidecar.state_dir) / JOURNAL_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    return any(f'"op":"{op}","work":"{work_id}"'.encode() in line for line in data.split(b"\n"))


@contextlib.asynccontextmanager
async def _client_holding_one(api: Api, sidecar: Sidecar, *, reconnect_timeout: float) -> AsyncIterator[Assignment]:
    """Inside the block the Python client holds one item (KeepAlive running) while its watch keeps reading, so it
    reconnects and resumes the item across a restart. After it: the item was stopped through the sidecar (on
    leaving the item's `async with`) and delivered once."""
    await sidecar.start()
    target = f"unix://{sidecar.socket}"
    async with SidecarClient(target, keepalive_interval=0.2, reconnect_timeout=reconnect_timeout) as client:
        assignments = client.assignments()
        item = await asyncio.wait_for(_first_of(assignments, api), 10)
        watching = asyncio.ensure_future(anext(assignments))  # reconnects and resumes the item after a restart
        async with item:
            yield item
            assert not item.lost.is_set()
        assert item.stopped.is_set(), "the item was stopped through the restarted sidecar"
        watching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watching
        await assignments.aclose()
    view = await api.item(item.work_id)
    assert (view["state"], view["deliveries"]) == ("stopped", 1)


async def _first_of(assignments: AsyncIterator[Assignment], api: Api) -> Assignment:
    first = asyncio.ensure_future(anext(assignments))
    await api.enqueue(1)
    return await first


async def test_the_python_client_carries_its_item_across_a_restart(api: Api, sidecar: Sidecar) -> None:
    # TTL 20, as for the examples: while the sidecar is down the client keeps the item until a fencing margin (1.5 s)
    # before the lease's last known expiry. At TTL 3 that was 0 to 1.5 s after the kill, less than a restart may take
    # on a busy machine: the client would rightly give the item up, and the test would fail on timing.
    sidecar.ttl = 20
    async with _client_holding_one(api, sidecar, reconnect_timeout=30):
        await sidecar.kill9()
        await sidecar.start()
        await eventually(lambda: _resumed(sidecar), timeout=10, message="the new watch resumed the lease")


@pytest.mark.slow
async def test_a_client_finds_the_restarted_sidecar_within_seconds_of_a_long_outage(api: Api, sidecar: Sidecar) -> None:
    """Guarantee: leases survive a restart. With gRPC's default reconnect backoff (1 s growing to 120 s) this client
    had not found the sidecar 24 s after it served again, when the item's fence came. The client's channel now
    looks at least every second (`sidecar._address.CHANNEL_OPTIONS`) and its own backoff retries every 2 s."""
    sidecar.ttl = 60  # fenced 54 s after the last renewal: the 30 s outage is well inside
    async with _client_holding_one(api, sidecar, reconnect_timeout=50) as item:
        await sidecar.kill9()
        await eventually(item.disconnected.is_set, timeout=5, message="the client saw the sidecar go")
        await asyncio.sleep(30)  # the outage itself, not a wait for a condition
        await sidecar.start()
        serving_again = time.monotonic()
        await eventually(lambda: not item.disconnected.is_set(), timeout=30, message="the client re-attached")
        assert time.monotonic() - serving_again < 4.0, "found within a reconnect interval, not grpc's backoff"


async def test_exec_children_keep_running_across_a_restart(api: Api, sidecar: Sidecar, short_dir: str) -> None:
    done = Path(short_dir) / "done"
    started = Path(short_dir) / "started"
    script = (
        "import os, pathlib, sys, time\n"
        f"pathlib.Path({str(started)!r}).open('a').write(f'{{os.getpid()}}\\n')\n"
        f"while not os.path.exists({str(done)!r}): time.sleep(0.05)\n"
    )
    # TTL 20: the adapter keeps a child running through a disconnection for half a TTL less the fencing margin and
    # its kill grace (the lease may expire after that, as nobody renews it meanwhile): 7 s here.
    await sidecar.start("--ttl", "20")
    adapter = await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "exec", "--sidecar", f"unix://{sidecar.socket}", "--once", "--kill-grace", "1",
        "--", sys.executable, "-c", script,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        [queued] = await api.enqueue(1)
        await eventually(started.exists, timeout=15, message="the child started")
        await sidecar.kill9()
        await sidecar.start("--ttl", "20")
        await eventually(lambda: _resumed(sidecar), timeout=15, message="the adapter resumed its item")
        done.touch()  # the child finishes its work after the restart
        assert await asyncio.wait_for(adapter.wait(), 20) == 0
    finally:
        if adapter.returncode is None:
            adapter.kill()
            await adapter.wait()
    assert len(started.read_text().split()) == 1, "one child, never restarted"
    view = await api.item(queued["id"])
    assert (view["state"], view["deliveries"]) == ("stopped", 1)


async def _resumed(sidecar: Sidecar) -> bool:
    """One watcher, and its only slot taken by the lease it resumed (seen through the public stats)."""
    try:
        stats = await sidecar.stub.GetQueueStats(pb.GetQueueStatsRequest())
    except grpc.aio.AioRpcError:
        return False
    return stats.sidecar.watchers == 1 and stats.sidecar.free_capacity == 0 and stats.sidecar.active_leases == 1
