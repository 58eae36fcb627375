"""`work-sidecar exec` never reports success for work it did not do, and a Job that found no item ends:

- `--idle-exit S` exits 0 when no item came within S seconds of reaching the sidecar (with `--once`: a ScaledJob's
  surplus Job completes instead of waiting for ever); an item that comes in time runs as usual;
- pointed at a sidecar it cannot reach, it names the address from the first failure and exits 1 (with or without
  `--once`) once `--reconnect-timeout` has passed; `--idle-exit` does not turn that into a success."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from tests.core.conftest import Api, SidecarFactory

BIN = Path(sys.executable).parent


async def _exec(address: str, *options: str, command: tuple[str, ...] = ("true",)) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(BIN / "work-sidecar"), "exec", "--sidecar", address, "--log-format", "json", *options, "--", *command,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def _finish(process: asyncio.subprocess.Process, within: float) -> tuple[int, list[str]]:
    assert process.stderr is not None
    try:
        stderr = await asyncio.wait_for(process.stderr.read(), within)
        code = await asyncio.wait_for(process.wait(), within)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    return code, stderr.decode().splitlines()


async def test_idle_exit_ends_a_job_that_got_no_item(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar()
    started = time.monotonic()
    adapter = await _exec(running.address, "--once", "--idle-exit", "1.5")
    code, lines = await _finish(adapter, 30)
    took = time.monotonic() - started
    assert code == 0, lines
    assert took >= 1.5, "not before the idle time"
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(r["msg"] == "no item came: exiting (--idle-exit)" for r in records), lines
    assert not await api.requests("ack"), "it took nothing"


async def test_an_item_within_the_idle_time_runs(api: Api, start_sidecar: SidecarFactory, tmp_path: Path) -> None:
    running = await start_sidecar()
    [queued] = await api.enqueue(1)
    marker = tmp_path / "ran"
    adapter = await _exec(running.address, "--once", "--idle-exit", "30", command=("touch", str(marker)))
    code, lines = await _finish(adapter, 30)
    assert code == 0, lines
    assert marker.exists()
    assert await api.state(queued["id"]) == "stopped"


async def test_a_busy_child_is_never_idle(api: Api, start_sidecar: SidecarFactory, tmp_path: Path) -> None:
    """The idle time counts only while no child runs: a child that outlasts it finishes and reports its code."""
    running = await start_sidecar()
    [queued] = await api.enqueue(1)
    adapter = await _exec(running.address, "--once", "--idle-exit", "0.5", command=("sh", "-c", "sleep 2; exit 4"))
    code, lines = await _finish(adapter, 30)
    assert code == 4, lines
    assert await api.state(queued["id"]) == "stopped"


async def test_an_unreachable_sidecar_is_named_and_fails(tmp_path: Path) -> None:
    wrong = f"unix://{tmp_path}/nobody-here.sock"
    for once in ((), ("--once",)):
        adapter = await _exec(wrong, *once, "--reconnect-timeout", "2", "--idle-exit", "0.5")
        code, lines = await _finish(adapter, 30)
        assert code == 1, (once, lines)
        records = [json.loads(line) for line in lines if line.startswith("{")]
        first = next(r for r in records if r["level"] == "warning")
        assert wrong in first["msg"] and first["sidecar"] == wrong, first
        plain = [line for line in lines if not line.startswith("{")]
        assert len(plain) == 1 and wrong in plain[0] and plain[0].startswith("work-sidecar exec: "), plain
