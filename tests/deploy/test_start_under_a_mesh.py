"""A pod starts under a service mesh: a Work API that cannot be reached at start (the mesh proxy, which carries
that traffic, starts after the native sidecar under classic injection) never makes `work-sidecar serve` exit. It
serves, its health listener answers liveness SERVING (the startup and liveness probes pass, the pod goes on) and
readiness NOT_SERVING, it asks again with backoff and says so; once the Work API answers, readiness turns SERVING
and items flow. A Work API that then refuses the key still ends the sidecar as at start: one line, exit 2."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from sidecar.emulator import Emulator, EmulatorSettings
from sidecar.emulator.admin_client import AdminClient
from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from tests.core.conftest import ENV, KEY, Watch
from tests.helpers import eventually, free_port, serving, stays

from ._harness import base_environment

BIN = Path(sys.executable).parent / "work-sidecar"


async def _serve(api_url: str, short_dir: str, health: str) -> asyncio.subprocess.Process:
    env = base_environment() | {
        "WORK_SIDECAR_API_URL": api_url, "WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_ENVIRONMENT_ID": ENV,
        "WORK_SIDECAR_LISTEN": f"unix://{short_dir}/sidecar.sock", "WORK_SIDECAR_HEALTH_LISTEN": health,
        "WORK_SIDECAR_STATE_DIR": f"{short_dir}/state", "WORK_SIDECAR_LOG_FORMAT": "json",
    }  # fmt: skip
    return await asyncio.create_subprocess_exec(
        str(BIN), "serve", env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


class Lines:
    """The process's stderr, collected as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.lines: list[str] = []
        self._reader = asyncio.ensure_future(self._read(process))

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        async for line in process.stderr:
            self.lines.append(line.decode(errors="replace").rstrip())

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines if line.startswith("{")]

    def said(self, text: str) -> bool:
        return any(text in str(record.get("msg", "")) for record in self.records())

    async def close(self) -> None:
        await asyncio.wait_for(self._reader, 10)


@pytest.fixture
def unreachable() -> int:
    """A port where no Work API answers yet (connection refused), as before a mesh proxy is up."""
    return free_port()


async def test_an_unreachable_work_api_at_start_serves_unready_then_ready(unreachable: int, short_dir: str) -> None:
    url = f"http://127.0.0.1:{unreachable}"
    health = f"127.0.0.1:{free_port()}"
    process = await _serve(url, short_dir, health)
    lines = Lines(process)
    try:
        assert await eventually(lambda: serving(health, "liveness"), timeout=30), (
            f"the startup/liveness probe passes while the Work API is unreachable: {lines.lines[-5:]}"
        )
        assert not await serving(health), "readiness is NOT_SERVING until the Work API answers"
        assert not await serving(health, "sidecar.work.v1.WorkService")
        await eventually(lambda: lines.said("still unreachable"), timeout=10, message="it says it asks again")
        [first] = [r for r in lines.records() if "cannot be reached" in str(r.get("msg"))]
        assert first["api_url"] == url and first["level"] == "warning", first
        assert process.returncode is None, "it never exits for an unreachable Work API"
        await stays(lambda: process.returncode is None and not lines.said("Work API answered"), seconds=1.0)

        emulator = Emulator(EmulatorSettings(key=KEY, min_ttl_seconds=1))
        async with emulator.serve(host="127.0.0.1", port=unreachable):  # the proxy is up: the Work API answers
            assert await eventually(lambda: serving(health), timeout=40, message="readiness turns SERVING")
            assert lines.said("the Work API answered: polling starts")
            async with grpc.aio.insecure_channel(f"unix://{short_dir}/sidecar.sock") as channel:
                watch = Watch(pb_grpc.WorkServiceStub(channel).WatchWork(pb.WatchWorkRequest(max_in_flight=1)))
                watch.start()
                item = await _enqueue_and_take(emulator, watch)
                assert item.work.environment_id == ENV, "polling started once the Work API answered"
                await pb_grpc.WorkServiceStub(channel).StopWork(
                    pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True)
                )
                watch.cancel()
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await lines.close()


async def _enqueue_and_take(emulator: Emulator, watch: Watch) -> pb.WorkAssigned:
    assert emulator.url is not None
    async with AdminClient(emulator.url) as admin:
        await admin.enqueue(ENV, 1, "session")
    return await watch.assigned(timeout=20)


async def test_a_key_refused_once_the_work_api_answers_fails_in_one_line(unreachable: int, short_dir: str) -> None:
    health = f"127.0.0.1:{free_port()}"
    process = await _serve(f"http://127.0.0.1:{unreachable}", short_dir, health)
    lines = Lines(process)
    try:
        assert await eventually(lambda: serving(health, "liveness"), timeout=30)
        emulator = Emulator(EmulatorSettings(key="sk-another-key-that-is-not-the-sidecars"))
        async with emulator.serve(host="127.0.0.1", port=unreachable):
            code = await asyncio.wait_for(process.wait(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await lines.close()
    assert code == 2, lines.lines[-5:]
    plain = [line for line in lines.lines if not line.startswith("{")]
    assert len(plain) == 1 and plain[0].startswith("work-sidecar: ") and "--api-key" in plain[0], plain
    assert KEY not in "\n".join(lines.lines), "the key never shows"


def test_a_refused_key_at_start_still_fails_at_once(short_dir: str) -> None:
    """With the Work API reachable and refusing, nothing is served: one line, exit 2 (as before)."""

    async def main() -> subprocess.CompletedProcess[str]:
        emulator = Emulator(EmulatorSettings(key="sk-another-key-that-is-not-the-sidecars"))
        async with emulator.serve() as url:
            env = base_environment() | {"WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_LOG_FORMAT": "json"}
            argv = [str(BIN), "serve", "--api-url", url, "--environment-id", ENV, "--listen",
                    f"unix://{short_dir}/s.sock", "--health-listen", f"127.0.0.1:{free_port()}"]  # fmt: skip
            return await asyncio.to_thread(
                subprocess.run, argv, env=env, capture_output=True, text=True, timeout=60, check=False
            )

    result = asyncio.run(main())
    assert result.returncode == 2
    plain = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(plain) == 1 and "refused the API key" in plain[0], result.stderr
    assert not os.path.exists(f"{short_dir}/s.sock"), "nothing was served"
