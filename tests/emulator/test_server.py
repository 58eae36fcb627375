"""Serving: on the running loop (port 0 or a given port), in a thread for synchronous code, and from the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys

import httpx
import pytest

from sidecar.emulator import Emulator, EmulatorSettings, EmulatorThread
from tests.helpers import free_port

from .conftest import ENV, KEY, QODER


async def test_serve_on_a_given_port_and_twice_in_a_row() -> None:
    emulator = Emulator(EmulatorSettings(key=KEY))
    port = free_port()
    async with emulator.serve(port=port) as url:
        assert url == f"http://127.0.0.1:{port}" and emulator.url == url
        with pytest.raises(RuntimeError, match="already serving"):
            async with emulator.serve():
                pass  # pragma: no cover
        async with httpx.AsyncClient(base_url=url) as http:
            await http.post(f"/_emulator/environments/{ENV}/work", json={"count": 1})
    assert emulator.url is None
    async with emulator.serve() as url, httpx.AsyncClient(base_url=url) as http:
        stats = await http.get(QODER.prefix() + "/stats", headers=QODER.headers)
        assert stats.json()["depth"] == 1, "state survives a restart of the server"


def test_emulator_thread_for_synchronous_code() -> None:
    with EmulatorThread(EmulatorSettings(key=KEY, min_ttl_seconds=1)) as running:
        url, emulator = running
        assert url == running.url and emulator is running.emulator
        [item] = running.call(emulator.enqueue, ENV)
        work = httpx.get(f"{url}{QODER.prefix()}/poll", headers=QODER.headers).json()
        assert work["id"] == item["id"]
        assert running.call(emulator.get_item, ENV, item["id"])["deliveries"] == 1
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/_emulator/stats", timeout=2)


async def _cli(*args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar.emulator",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def test_cli_serves_until_sigterm() -> None:
    process = await _cli(
        "--port",
        "0",
        "--min-ttl",
        "1",
        "--set",
        "stopping_expiry=stopped",
        env={"WORK_SIDECAR_EMULATOR_KEY": "cli-key"},
    )
    assert process.stderr is not None
    try:
        line = (await asyncio.wait_for(process.stderr.readline(), timeout=20)).decode()
        record = json.loads(line)  # a JSON log line: stderr is not a TTY
        assert record["msg"] == "Work API emulator listening", line
        match = re.fullmatch(r"http://127\.0\.0\.1:\d+", record["url"])
        assert match, line
        assert "cli-key" not in line
        async with httpx.AsyncClient(base_url=match.group(0)) as http:
            ok = await http.get(
                "/api/v1/cloud/environments/env_cli/work/stats", headers={"authorization": "Bearer cli-key"}
            )
            assert ok.status_code == 200
            settings = (await http.get("/_emulator/settings")).json()
            assert settings["min_ttl_seconds"] == 1 and settings["stopping_expiry"] == "stopped"
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0


@pytest.mark.parametrize("args", [[], ["--key", "k", "--set", "nope=1"], ["--key", "k", "--min-ttl", "0"]])
async def test_cli_refuses_bad_arguments(args: list[str]) -> None:
    process = await _cli(*args, env={"WORK_SIDECAR_EMULATOR_KEY": ""})
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=20)
    assert process.returncode == 2 and b"error" in stderr
