"""The Node and Go example sandboxes carry on across a sidecar crash (issue #12): `kill -9` of the sidecar process
mid-work, a restart with the same `--state-dir`; the sandbox reconnects (KeepAlive with its old token), finishes and
stops its item through the new process. The item is delivered once and ends `stopped`.

And when the sidecar does not come back, they fence (#11.11, the rule of `sidecar/_fencing.py`): the item is given up
a margin before its lease's last known expiry, and abandoned (no StopWork) before the Work API may hand it on."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.core.conftest import Api
from tests.core.test_restart import Sidecar
from tests.helpers import eventually

from .conftest import ROOT, require_path, require_tool
from .test_go import go_sandbox  # noqa: F401  (the fixture: the Go sandbox, built once per module)

pytestmark = [pytest.mark.polyglot, pytest.mark.timeout(300)]


def _node_command() -> list[str]:
    node = require_tool("node", "the Node example sandbox runs on Node.js")
    require_path(ROOT / "examples/node/node_modules/@grpc/grpc-js/package.json", "@grpc/grpc-js (npm ci)")
    return [node, str(ROOT / "examples/node/sandbox.js")]


async def _start_sandbox(
    language: str, request: pytest.FixtureRequest, sidecar: Sidecar, out: Path, work_seconds: int
) -> asyncio.subprocess.Process:
    """The example sandbox on the sidecar's socket with --once, working `work_seconds` on its item and pinging
    KeepAlive every 0.3 s; its output goes to `out`."""
    address = f"unix://{sidecar.socket}"
    if language == "node":
        argv = [*_node_command(), address, "--once", "--work-seconds", str(work_seconds), "--ping-seconds", "0.3"]
    else:
        go = str(request.getfixturevalue("go_sandbox"))
        argv = [go, address, "-once", "-work-seconds", str(work_seconds), "-ping-seconds", "0.3"]
    with out.open("wb") as stdout:
        return await asyncio.create_subprocess_exec(*argv, stdout=stdout, stderr=subprocess.STDOUT)


@contextlib.asynccontextmanager
async def _working(
    language: str, request: pytest.FixtureRequest, api: Api, sidecar: Sidecar, out: Path, work_seconds: int
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """The sidecar started, the example sandbox on it, one item queued and being worked on: (sandbox, work id).
    On exit a sandbox still running is killed and the sidecar closed."""
    await sidecar.start()
    sandbox: asyncio.subprocess.Process | None = None
    try:  # a missing toolchain skips in _start_sandbox: the sidecar is closed then too
        sandbox = await _start_sandbox(language, request, sidecar, out, work_seconds)
        [queued] = await api.enqueue(1)
        await eventually(lambda: b"UpdateWorkMetadata" in out.read_bytes(), timeout=20, message="working")
        yield sandbox, queued["id"]
    finally:
        if sandbox is not None and sandbox.returncode is None:
            sandbox.kill()
            await sandbox.wait()
        await sidecar.close()


@pytest.mark.parametrize("language", ["node", "go"])
async def test_the_example_sandbox_carries_on_across_a_sidecar_restart(
    language: str, api: Api, short_dir: str, request: pytest.FixtureRequest
) -> None:
    # Grace 3 s, shorter than the work: only a re-attach keeps the lease. TTL 20: the sandbox fences its item a margin
    # (2 s) before the last expiry it heard, as nobody renews the lease while no sidecar runs; the restart must fit.
    sidecar = Sidecar(api, short_dir, grace=3.0, ttl=20)
    out = Path(short_dir) / "sandbox.out"
    async with _working(language, request, api, sidecar, out, work_seconds=8) as (sandbox, work_id):
        await sidecar.kill9()
        await sidecar.start()
        assert await asyncio.wait_for(sandbox.wait(), 40) == 0, out.read_text()
    text = out.read_text()
    assert f"stopped {work_id}: state WORK_STATE_STOPPED" in text, text
    assert "abandoned" not in text, text
    view = await api.item(work_id)
    assert (view["state"], view["deliveries"]) == ("stopped", 1)


def _at(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


@pytest.mark.parametrize("language", ["node", "go"])
async def test_the_example_sandbox_fences_its_item_when_the_sidecar_does_not_come_back(
    language: str, api: Api, short_dir: str, request: pytest.FixtureRequest
) -> None:
    """Guarantee: with the sidecar gone for good nobody renews the lease, so the sandbox gives the item up (`fenced`)
    before the lease expires in the Work API, and abandons it rather than stopping it (it may be someone else's)."""
    sidecar = Sidecar(api, short_dir, ttl=5)  # fencing margin 1.5 s: fenced ~3.5 s after the last renewal
    out = Path(short_dir) / "sandbox.out"
    async with _working(language, request, api, sidecar, out, work_seconds=30) as (sandbox, work_id):
        await sidecar.kill9()  # and it does not come back
        await eventually(lambda: f"fenced {work_id}".encode() in out.read_bytes(), timeout=15, message="fenced")
        fenced_at = time.time()  # within one poll (50 ms) of the line
        # With --once the watch was closed when the item came, so the abandoned item is the sandbox's last: it
        # leaves cleanly ("done: 1 item(s)", exit 0) without calling the unreachable sidecar again.
        assert await asyncio.wait_for(sandbox.wait(), 20) == 0, out.read_text()
    text = out.read_text()
    assert f"fenced {work_id}: the sidecar could not be reached before the lease would expire" in text, text
    assert f"abandoned {work_id}: the lease is lost" in text, text
    assert f"stopped {work_id}" not in text, text
    view = await api.item(work_id)
    assert view["state"] == "active" and view["lease_expires_at"], f"nobody stopped or released it: {view}"
    assert fenced_at < _at(view["lease_expires_at"]), f"fenced at {fenced_at}, after the lease expired: {view}"
