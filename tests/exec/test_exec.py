"""`work-sidecar exec` against a real sidecar: the child's exit ends the item, stop requests and lease
losses reach the child as signals, and an adapter killed by SIGTERM stops its child without losing the
item (it returns to the queue instead of being stopped)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import grpc

from sidecar.exec import child_environment, random_traceparent
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from tests.core.conftest import Api, SidecarFactory
from tests.helpers import eventually

BIN = Path(sys.executable).parent
TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-0[01]")  # W3C trace-context, version 00

CHILD = r"""
import json, os, signal, sys, time
work = json.load(sys.stdin)
keep = ("ANTHROPIC_", "WORK_SIDECAR_", "TRACEPARENT")
out = {"work": work, "env": {k: v for k, v in os.environ.items() if k.startswith(keep)}}
open(sys.argv[1], "w").write(json.dumps(out))
mode = sys.argv[2]
if mode == "exit":
    sys.exit(int(sys.argv[3]))
def on_term(*_):
    open(sys.argv[1] + ".term", "w").write("term")
    sys.exit(0 if mode == "wait" else 0)
if mode == "ignore-term":
    signal.signal(signal.SIGTERM, lambda *_: open(sys.argv[1] + ".term", "w").write("ignored"))
else:
    signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(0.05)
"""


async def _adapter(address: str, tmp: Path, mode: str, *extra: str) -> tuple[asyncio.subprocess.Process, Path]:
    script = tmp / "child.py"
    script.write_text(CHILD)
    report = tmp / "report.json"
    process = await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "exec", "--sidecar", address, "--kill-grace", "1", *extra,
        "--", sys.executable, str(script), str(report), mode, *(["3"] if mode == "exit" else []),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return process, report


def _report(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


async def test_child_exit_ends_the_item(api: Api, start_sidecar: SidecarFactory, tmp_path: Path) -> None:
    running = await start_sidecar()
    [queued] = await api.enqueue(1)
    adapter, report = await _adapter(running.address, tmp_path, "exit", "--once")
    assert await asyncio.wait_for(adapter.wait(), 20) == 3, "--once exits with the child's exit code"
    seen = _report(report)
    assert seen["work"]["id"] == queued["id"] and seen["work"]["secret"] is None
    env = seen["env"]
    assert env["ANTHROPIC_WORK_ID"] == queued["id"]
    assert env["ANTHROPIC_ENVIRONMENT_ID"] == api.environment_id
    assert env["ANTHROPIC_SESSION_ID"] == queued["data"]["id"]
    assert env["ANTHROPIC_SESSION_TOKEN"].startswith("sk-ant-req-")
    assert "WORK_SIDECAR_API_KEY" not in env
    # what the child needs to call the sidecar about its item, and a trace context that is always valid
    assert env["WORK_SIDECAR_ADDR"] == running.address
    assert env["WORK_SIDECAR_LEASE_TOKEN"], "the lease token (test_stop_requested_sends_sigterm calls GetWork with it)"
    assert TRACEPARENT.fullmatch(env["TRACEPARENT"]), env["TRACEPARENT"]
    # the work JSON says what the claim did: active, started and heartbeated (not null)
    work = seen["work"]
    assert work["state"] == "active"
    assert work["started_at"] and work["latest_heartbeat_at"], work
    assert work["started_at"] <= work["latest_heartbeat_at"]
    assert work["started_at"] == (await api.item(queued["id"]))["started_at"], "the Work API's own started_at"
    assert await api.state(queued["id"]) == "stopped"
    assert adapter.stderr is not None
    lines = (await adapter.stderr.read()).decode().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]  # JSON log lines: stderr is not a TTY
    exited = [r for r in records if r["msg"] == "child exited"]
    assert [(r["work_id"], r["exit_code"]) for r in exited] == [(queued["id"], 3)], lines


async def test_normal_exit_zero(api: Api, start_sidecar: SidecarFactory, tmp_path: Path) -> None:
    running = await start_sidecar()
    script = tmp_path / "ok.sh"
    script.write_text('#!/bin/sh\ncat > "$0.stdin"\necho "$ANTHROPIC_WORK_ID" > "$0.id"\n')
    script.chmod(0o755)
    queued, waiting = await api.enqueue(2)
    adapter = await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "exec", "--sidecar", running.address, "--once", "--", str(script),
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert await asyncio.wait_for(adapter.wait(), 20) == 0
    assert (tmp_path / "ok.sh.id").read_text().strip() == queued["id"]
    assert json.loads((tmp_path / "ok.sh.stdin").read_text())["id"] == queued["id"]
    assert await api.state(queued["id"]) == "stopped"
    # --once asks for one item in all: the next one is not handed over (and stranded) as the adapter leaves
    assert await api.state(waiting["id"]) == "queued"
    assert len(await api.requests("ack")) == 1


async def test_stop_requested_sends_sigterm(api: Api, start_sidecar: SidecarFactory, tmp_path: Path) -> None:
    running = await start_sidecar()
    [queued] = await api.enqueue(1)
    adapter, report = await _adapter(running.address, tmp_path, "wait", "--once")
    await eventually(report.exists, timeout=20, message="child started")
    env = _report(report)["env"]
    # the child's WORK_SIDECAR_ADDR and WORK_SIDECAR_LEASE_TOKEN let it call the sidecar about its own item
    async with grpc.aio.insecure_channel(env["WORK_SIDECAR_ADDR"]) as channel:
        got = await pb_grpc.WorkServiceStub(channel).GetWork(
            pb.GetWorkRequest(work_id=queued["id"], lease_token=env["WORK_SIDECAR_LEASE_TOKEN"])
        )
    assert got.work.id == queued["id"] and got.work.state == pb.WORK_STATE_ACTIVE
    await api.platform_stop(queued["id"], force=False)
    assert await asyncio.wait_for(adapter.wait(), 20) == 0
    assert Path(str(report) + ".term").read_text() == "term"
    assert await api.state(queued["id"]) == "stopped", "the child's exit confirmed the stop"


async def test_lease_lost_terms_then_kills(api: Api, start_sidecar: SidecarFactory, tmp_path: Path) -> None:
    running = await start_sidecar()
    [queued] = await api.enqueue(1)
    adapter, report = await _adapter(running.address, tmp_path, "ignore-term", "--once")
    await eventually(report.exists, timeout=20, message="child started")
    await api.steal(queued["id"])
    code = await asyncio.wait_for(adapter.wait(), 20)
    assert code == 128 + signal.SIGKILL, "SIGKILL after the grace period (reported as 128 + 9)"
    assert Path(str(report) + ".term").read_text() == "ignored", "SIGTERM came first"
    assert not await api.requests("stop", queued["id"]), "a lost lease is not stopped"


async def test_adapter_sigterm_stops_child_and_keeps_the_item(
    api: Api, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    running = await start_sidecar()
    [queued] = await api.enqueue(1)
    adapter, report = await _adapter(running.address, tmp_path, "wait")
    await eventually(report.exists, timeout=20, message="child started")
    adapter.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(adapter.wait(), 20) == 128 + signal.SIGTERM
    assert Path(str(report) + ".term").read_text() == "term", "the signal was forwarded to the child"
    assert not await api.requests("stop", queued["id"]), "an interrupted item is not stopped"
    await eventually(lambda: _is(api, queued["id"], "queued"), timeout=15, message="the item returns to the queue")
    assert os.path.exists(report)


async def _is(api: Api, work_id: str, state: str) -> bool:
    return await api.state(work_id) == state


def test_traceparent_is_always_valid() -> None:
    """The item's traceparent when the sidecar traces; a fresh valid one (not a constant) when it does not."""
    traced = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    item = pb.WorkAssigned(work=pb.Work(id="work_1"), lease_token="tok", traceparent=traced)
    assert child_environment(item, "unix:///s.sock", {})["TRACEPARENT"] == traced
    untraced = pb.WorkAssigned(work=pb.Work(id="work_1"), lease_token="tok")
    fresh = {child_environment(untraced, "unix:///s.sock", {})["TRACEPARENT"] for _ in range(20)}
    assert len(fresh) == 20 and all(TRACEPARENT.fullmatch(value) for value in fresh), fresh
    assert TRACEPARENT.fullmatch(random_traceparent())


def test_child_environment_uses_one_address_name() -> None:
    item = pb.WorkAssigned(work=pb.Work(id="work_1"), lease_token="tok")
    base = {"WORK_SIDECAR_ADDRESS": "127.0.0.1:1", "WORK_SIDECAR_API_KEY": "sk-secret", "PATH": "/bin"}
    env = child_environment(item, "unix:///s.sock", base, auth_token="bearer-1")
    assert env["WORK_SIDECAR_ADDR"] == "unix:///s.sock" and "WORK_SIDECAR_ADDRESS" not in env
    assert env["WORK_SIDECAR_AUTH_TOKEN"] == "bearer-1" and env["WORK_SIDECAR_LEASE_TOKEN"] == "tok"
    assert "WORK_SIDECAR_API_KEY" not in env and env["PATH"] == "/bin"


async def test_a_sidecar_that_never_comes_back_stops_the_child_before_its_lease_expires(
    api: Api, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    """#11.11 with #12. Guarantee: the child survives a sidecar restart, but if the sidecar is not back within half
    a TTL less the fencing margin and the kill grace, the child is stopped as lost — before the Work API may hand
    its item to anyone else (nobody renews the lease while the sidecar is gone)."""
    running = await start_sidecar(ttl_seconds=6)
    [queued] = await api.enqueue(1)
    adapter, report = await _adapter(running.address, tmp_path, "wait", "--once")
    await eventually(report.exists, timeout=20, message="child started")
    await running.sidecar.close()  # gone for good
    gone = asyncio.get_running_loop().time()
    await eventually(lambda: Path(str(report) + ".term").exists(), timeout=20, message="the child got SIGTERM")
    assert asyncio.get_running_loop().time() - gone <= 6 / 2 + 1, "within half a TTL of the disconnection"
    item = await api.item(queued["id"])
    assert item["state"] == "active" and item["lease_expires_at"] is not None, "before the lease ran out"
    await asyncio.wait_for(adapter.wait(), 90)
