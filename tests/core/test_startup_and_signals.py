"""Issue #11.8 and #11.9 with real `work-sidecar serve` processes: signals and start-up misuse.

Guarantees: SIGQUIT drains like SIGTERM; SIGHUP does not kill; SIGUSR1 logs a summary without secrets; a start
that cannot work fails at once with one line naming the fix and exit code 2; a live Unix socket is never replaced
or removed by a second sidecar; two sidecars never share a TCP port.
"""

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

from sidecar.work.v1 import work_service_pb2 as pb
from sidecar.work.v1 import work_service_pb2_grpc as pb_grpc
from tests.helpers import eventually, free_port, serving

from .conftest import ENV, KEY, Api, Watch

BIN = Path(sys.executable).parent / "work-sidecar"


def _env() -> dict[str, str]:
    return {**os.environ, "WORK_SIDECAR_API_KEY": KEY, "WORK_SIDECAR_LOG_FORMAT": "json"}


async def _start(api: Api, listen: str, *extra: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(BIN), "serve", "--api-url", api.url, "--environment-id", ENV, "--listen", listen,
        "--ttl", "2", "--drain-timeout", "10", *extra,
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), "serve", *args], env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.kill()
        await proc.wait()


async def test_sighup_and_sigusr1_do_not_kill_and_sigquit_drains(api: Api, short_dir: str) -> None:
    socket = f"unix://{short_dir}/s.sock"
    proc = await _start(api, socket)
    try:
        async with grpc.aio.insecure_channel(socket) as channel:
            await eventually(lambda: serving(channel), timeout=30)
            stub = pb_grpc.WorkServiceStub(channel)
            watch = Watch(stub.WatchWork(pb.WatchWorkRequest())).start()
            await api.enqueue(1)
            item = await watch.assigned()
            proc.send_signal(signal.SIGHUP)
            proc.send_signal(signal.SIGUSR1)
            await eventually(lambda: serving(channel), timeout=10)
            assert proc.returncode is None, "SIGHUP and SIGUSR1 do not kill the sidecar"
            proc.send_signal(signal.SIGQUIT)
            await watch.next("draining", timeout=10)
            await stub.StopWork(pb.StopWorkRequest(work_id=item.work.id, lease_token=item.lease_token, force=True))
            assert await asyncio.wait_for(proc.wait(), 20) == 0, "SIGQUIT drains and exits 0"
        assert proc.stderr is not None
        lines = [json.loads(line) for line in (await proc.stderr.read()).decode().splitlines() if line.startswith("{")]
        summary = [line for line in lines if line.get("msg") == "state"]
        assert summary and summary[0]["leases"] == 1 and summary[0]["watchers"] == 1
        assert item.lease_token not in json.dumps(lines) and KEY not in json.dumps(lines)
        assert any(line.get("msg", "").startswith("SIGHUP") for line in lines)
    finally:
        await _stop(proc)


def _one_line_exit_2(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, f"one line (besides JSON log lines), not a traceback: {result.stderr}"
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


async def test_bad_flags_and_a_refusing_api_fail_in_one_line(api: Api, short_dir: str) -> None:
    sock = f"unix://{short_dir}/x.sock"
    _one_line_exit_2(_run("--api-url", api.url, "--environment-id", "bad id!", "--listen", sock), "--environment-id")
    _one_line_exit_2(_run("--api-url", "ftp://example", "--environment-id", ENV, "--listen", sock), "--api-url")
    # an unreachable Work API does not stop the start: tests/deploy/test_start_under_a_mesh.py
    await api.fault(operation="stats", status=401, count=1)
    refused = await asyncio.to_thread(_run, "--api-url", api.url, "--environment-id", ENV, "--listen", sock)
    _one_line_exit_2(refused, "--api-key")  # (in a thread: the emulator answers on this test's event loop)


async def test_a_port_in_use_is_named_and_never_shared(api: Api) -> None:
    port = free_port()
    first = await _start(api, f"127.0.0.1:{port}")
    try:
        await eventually(lambda: serving(f"127.0.0.1:{port}"), timeout=30)
        result = await asyncio.to_thread(
            _run, "--api-url", api.url, "--environment-id", ENV, "--listen", f"127.0.0.1:{port}"
        )
        _one_line_exit_2(result, f"127.0.0.1:{port}", "--listen")
        assert first.returncode is None and await serving(f"127.0.0.1:{port}")
    finally:
        await _stop(first)


async def test_a_live_unix_socket_is_never_replaced_or_removed(api: Api, short_dir: str) -> None:
    path = f"{short_dir}/live.sock"
    first = await _start(api, f"unix://{path}")
    try:
        await eventually(lambda: serving(f"unix://{path}"), timeout=30)
        inode = os.stat(path).st_ino
        result = await asyncio.to_thread(
            _run, "--api-url", api.url, "--environment-id", ENV, "--listen", f"unix://{path}"
        )
        _one_line_exit_2(result, path, "--listen")
        assert os.stat(path).st_ino == inode, "the live socket is still the first sidecar's"
        assert await serving(f"unix://{path}")
    finally:
        await _stop(first)


@pytest.mark.parametrize("stale", [True, False])
async def test_a_stale_socket_file_is_replaced(api: Api, short_dir: str, stale: bool) -> None:
    import socket as sockets

    path = f"{short_dir}/stale.sock"
    if stale:  # a socket file nobody accepts on (its process died)
        with sockets.socket(sockets.AF_UNIX) as dead:
            dead.bind(path)
    proc = await _start(api, f"unix://{path}")
    try:
        await eventually(lambda: serving(f"unix://{path}"), timeout=30)
    finally:
        await _stop(proc)
