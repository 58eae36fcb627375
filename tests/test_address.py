"""One name for the sidecar's address: `WORK_SIDECAR_ADDR` (`WORK_SIDECAR_ADDRESS` accepted as an alias), read by
`work-sidecar exec`, `work-sidecar health` and `sidecar.client.SidecarClient` against a real sidecar. (The Node and
Go examples read the same names: tests/examples/test_node.py and test_go.py run them with both.)"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from sidecar._address import sidecar_address
from sidecar.client import SidecarClient
from tests.core.conftest import Api, SidecarFactory

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
BASE = {k: v for k, v in os.environ.items() if not k.startswith("WORK_SIDECAR_")}


def test_the_variable_wins_over_its_alias() -> None:
    assert sidecar_address({"WORK_SIDECAR_ADDR": "unix:///a.sock", "WORK_SIDECAR_ADDRESS": "b:1"}) == "unix:///a.sock"
    assert sidecar_address({"WORK_SIDECAR_ADDRESS": "127.0.0.1:50051"}) == "127.0.0.1:50051"
    assert sidecar_address({"WORK_SIDECAR_ADDR": " ", "WORK_SIDECAR_ADDRESS": ""}) is None
    assert sidecar_address({}) is None


@pytest.mark.parametrize("name", ["WORK_SIDECAR_ADDR", "WORK_SIDECAR_ADDRESS"])
async def test_exec_and_health_read_the_address(
    name: str, api: Api, start_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    running = await start_sidecar()
    env = BASE | {name: running.address}
    health = await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "health", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(health.communicate(), 20)
    assert health.returncode == 0 and out.decode().strip() == "SERVING", err.decode()

    [queued] = await api.enqueue(1)
    seen = tmp_path / "seen"
    adapter = await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "exec", "--once", "--",
        "sh", "-c", f'echo "$ANTHROPIC_WORK_ID $WORK_SIDECAR_ADDR" > {seen}',
        env=env, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(adapter.communicate(), 30)
    assert adapter.returncode == 0, err.decode()[-2000:]
    assert seen.read_text().split() == [queued["id"], running.address], "the child gets WORK_SIDECAR_ADDR"
    assert await api.state(queued["id"]) == "stopped"


@pytest.mark.parametrize("name", ["WORK_SIDECAR_ADDR", "WORK_SIDECAR_ADDRESS"])
async def test_python_client_reads_the_address(
    name: str, api: Api, start_sidecar: SidecarFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    running = await start_sidecar()
    for other in ("WORK_SIDECAR_ADDR", "WORK_SIDECAR_ADDRESS"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, running.address)
    async with SidecarClient(sandbox_id="sb-env") as client:
        assert client.target == running.address
        stats = await client.queue_stats()
        assert stats.sidecar.environment_id == api.environment_id


def test_python_client_without_an_address_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORK_SIDECAR_ADDR", "WORK_SIDECAR_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="WORK_SIDECAR_ADDR"):
        SidecarClient()


def test_examples_and_docs_use_one_name() -> None:
    """Every example reads WORK_SIDECAR_ADDR first; the alias appears only as the alias."""
    for path in ("examples/node/sandbox.js", "examples/go/main.go"):
        source = (ROOT / path).read_text()
        assert "WORK_SIDECAR_ADDR" in source.replace("WORK_SIDECAR_ADDRESS", ""), f"{path} reads WORK_SIDECAR_ADDR"
        first = source.index("WORK_SIDECAR_ADDR")
        assert not source.startswith("WORK_SIDECAR_ADDRESS", first), f"{path}: WORK_SIDECAR_ADDR is read first"
    docs = sorted(str(page.relative_to(ROOT)) for page in (ROOT / "docs").glob("*.md"))
    for path in ("README.md", "examples/node/README.md", "examples/go/README.md", *docs):
        text = " ".join((ROOT / path).read_text().split())  # lines joined: a mention may wrap
        for found in re.finditer("WORK_SIDECAR_ADDRESS", text):
            around = text[found.start() - 60 : found.end() + 60]
            assert "alias" in around, f"{path}: WORK_SIDECAR_ADDRESS outside a mention of the alias: {around}"
