"""The sidecar as a real process: SIGTERM drains without losing or duplicating work; a second SIGTERM
exits at once; a sandbox killed mid-work does not strand its item."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from tests.helpers import eventually, serving

from .conftest import ENV, KEY, Api, Watch

BIN = Path(sys.executable).parent


async def _spawn_sidecar(api: Api, socket: str, *extra: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_LOG_FORMAT": "json"}
    return await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "serve",
        "--api-url", api.url, "--environment-id", ENV, "--listen", f"unix://{socket}",
        "--ttl", "2", "--release-ttl", "1", "--reattach-grace", "1", "--liveness-window", "1", *extra,
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.fixture
async def process(api: Api, short_dir: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, grpc.aio.Channel]]:
    socket = f"{short_dir}/p.sock"
    proc = await _spawn_sidecar(api, socket, "--drain-timeout", "10")
    channel = grpc.aio.insecure_channel(f"unix://{socket}")
    await eventually(lambda: serving(channel), timeout=20, message="sidecar process healthy")
    yield proc, channel
    await channel.close()
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_sigterm_drains_without_losing_or_duplicating(
    api: Api, process: tuple[asyncio.subprocess.Process, grpc.aio.Channel]
) -> None:
    proc, channel = process
    stub = pb_grpc.WorkServiceStub(channel)
    watch = Watch(stub.WatchWork(pb.WatchWorkRequest(max_in_flight=2))).start()
    await api.enqueue(2)
    items = [await watch.assigned(), await watch.assigned()]
    await api.enqueue(1)  # must stay queued: the drain stops polling at once
    proc.send_signal(signal.SIGTERM)
    draining = await watch.next("draining", timeout=5)
    assert draining.draining.deadline.seconds > 0
    assert not await serving(channel), "health turns NOT_SERVING while draining"
    for item in items:  # in-flight work finishes normally during the drain
        stopped = await stub.StopWork(
            pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True)
        )
        assert stopped.work.state == pb.WORK_STATE_STOPPED
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    for item in items:
        assert len(await api.requests("ack", item.work.id)) == 1, "acked exactly once"
        assert await api.state(item.work.id) == "stopped"
    stats = (await api.http.get(f"/v1/environments/{ENV}/work/stats", headers=_auth())).json()
    assert stats["depth"] >= 1, "the item queued during the drain was not taken"


@contextlib.asynccontextmanager
async def _holding_one_item(
    api: Api, socket: str, *flags: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, Watch, pb.WorkAssigned]]:
    """A sidecar process whose only watcher holds one item."""
    proc = await _spawn_sidecar(api, socket, *flags)
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        await eventually(lambda: serving(channel), timeout=20)
        watch = Watch(pb_grpc.WorkServiceStub(channel).WatchWork(pb.WatchWorkRequest())).start()
        await api.enqueue(1)
        yield proc, watch, await watch.assigned()


async def test_drain_timeout_releases_unfinished_work(api: Api, short_dir: str) -> None:
    async with _holding_one_item(api, f"{short_dir}/t.sock", "--drain-timeout", "1") as (proc, watch, item):
        proc.send_signal(signal.SIGTERM)
        lost = await watch.next("lease_lost", timeout=10)
        assert lost.lease_lost.reason == pb.LEASE_LOST_REASON_DRAINED
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    await eventually(lambda: _state_is(api, item.work.id, "queued"), timeout=10, message="released item requeued")


async def test_a_drain_does_not_wait_for_a_sandbox_that_left(api: Api, short_dir: str) -> None:
    """Guarantee: a drain is not held up by a lease whose sandbox has gone (it would have waited out the
    re-attach grace, here as long as the drain timeout), and that item returns to the queue at once, released
    with a short TTL before the process exits, not at its lease's TTL."""
    flags = ("--drain-timeout", "30", "--reattach-grace", "30", "--ttl", "60")
    async with _holding_one_item(api, f"{short_dir}/g.sock", *flags) as (proc, watch, item):
        proc.send_signal(signal.SIGTERM)
        await watch.next("draining", timeout=5)
        watch.cancel()  # the sandbox leaves with the item in hand (its pod is going away too)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert asyncio.get_running_loop().time() - started < 10, "not the 30 s grace or drain timeout"
    releases = [
        r for r in await api.requests("heartbeat", item.work.id) if r["query"].get("desired_ttl_seconds") == "1"
    ]
    assert len(releases) == 1, "released with the short TTL before the exit"
    await eventually(lambda: _state_is(api, item.work.id, "queued"), timeout=10, message="released item requeued")


async def test_second_sigterm_exits_at_once(api: Api, short_dir: str) -> None:
    async with _holding_one_item(api, f"{short_dir}/s.sock", "--drain-timeout", "60") as (proc, watch, _):
        proc.send_signal(signal.SIGTERM)
        await watch.next("draining", timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 1


async def test_killed_sandbox_item_returns_after_ttl(
    api: Api, process: tuple[asyncio.subprocess.Process, grpc.aio.Channel], short_dir: str
) -> None:
    _, _channel = process
    sandbox = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve().parents[2] / "examples/python/sandbox.py"),
        "--sidecar", f"unix://{short_dir}/p.sock", "--work-seconds", "600", "--items", "1",
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    [queued] = await api.enqueue(1)
    assert sandbox.stdout is not None
    while b"assigned" not in (await asyncio.wait_for(sandbox.stdout.readline(), 20)):
        pass
    sandbox.kill()  # SIGKILL: no goodbye
    await sandbox.wait()
    seen: list[str] = []

    async def requeued() -> bool:
        seen.append(await api.state(queued["id"]))
        return seen[-1] == "queued"

    await eventually(requeued, timeout=15, message="the killed sandbox's item returns to the queue")
    assert "starting" not in seen


def _auth() -> dict[str, str]:
    return {
        "authorization": f"Bearer {KEY}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "managed-agents-2026-04-01",
    }


async def _state_is(api: Api, work_id: str, state: str) -> bool:
    return await api.state(work_id) == state
