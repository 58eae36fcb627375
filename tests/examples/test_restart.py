"""The Node and Go example sandboxes carry on across a sidecar crash (issue #12): `kill -9` of the sidecar process
mid-work, a restart with the same `--state-dir`; the sandbox reconnects (KeepAlive with its old token), finishes and
stops its item through the new process. The item is delivered once and ends `stopped`."""

from __future__ import annotations

import asyncio
import subprocess
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


@pytest.mark.parametrize("language", ["node", "go"])
async def test_the_example_sandbox_carries_on_across_a_sidecar_restart(
    language: str, api: Api, short_dir: str, request: pytest.FixtureRequest
) -> None:
    if language == "node":
        command = [*_node_command(), "--once", "--work-seconds", "8", "--ping-seconds", "0.3"]
    else:
        command = [str(request.getfixturevalue("go_sandbox")), "-once", "-work-seconds", "8", "-ping-seconds", "0.3"]
    sidecar = Sidecar(api, short_dir, grace=3.0)  # shorter than the work: only a re-attach keeps the lease
    await sidecar.start()
    out = Path(short_dir) / "sandbox.out"
    with out.open("wb") as stdout:
        sandbox = await asyncio.create_subprocess_exec(
            *command[:1], *command[1:2], f"unix://{sidecar.socket}", *command[2:],
            stdout=stdout, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        [queued] = await api.enqueue(1)
        await eventually(lambda: b"UpdateWorkMetadata" in out.read_bytes(), timeout=20, message="working")
        await sidecar.kill9()
        await sidecar.start()
        assert await asyncio.wait_for(sandbox.wait(), 40) == 0, out.read_text()
    finally:
        if sandbox.returncode is None:
            sandbox.kill()
            await sandbox.wait()
        await sidecar.close()
    text = out.read_text()
    assert f"stopped {queued['id']}: state WORK_STATE_STOPPED" in text, text
    assert "abandoned" not in text, text
    view = await api.item(queued["id"])
    assert (view["state"], view["deliveries"]) == ("stopped", 1)
