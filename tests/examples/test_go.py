"""examples/go: built offline with Debian's Go packages (build.sh: protoc stubs into a temporary GOPATH, go vet,
go test, go build), then run end to end against a real `work-sidecar serve` process and the emulator.

Guarantee checked: a sandbox written with nothing but protoc-generated Go stubs takes an item to `stopped`
(argv and environment addresses, Unix socket and TCP), ends work early on a platform stop request, and abandons an
item whose lease was stolen without stopping it (it is not ours any more)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.core.conftest import KEY, Api
from tests.helpers import eventually, serving

from .conftest import ROOT, require_path, require_tool

pytestmark = [pytest.mark.polyglot, pytest.mark.timeout(300)]  # the first test also builds (a cold build: ~20 s)

GO_DIR = ROOT / "examples" / "go"
GOCODE = Path(os.environ.get("WORK_SIDECAR_GOCODE", "/usr/share/gocode")) / "src"
SIDECAR_BIN = Path(sys.executable).parent / "work-sidecar"


def _require_go_toolchain() -> None:
    require_tool("go", "the Go example sandbox is built with Debian's golang-go")
    require_tool("protoc", "the Go stubs are generated at build time (protobuf-compiler)")
    require_tool("protoc-gen-go", "the Go stubs are generated at build time (protoc-gen-go)")
    require_tool("protoc-gen-go-grpc", "the Go stubs are generated at build time (protoc-gen-go-grpc)")
    require_path(GOCODE / "google.golang.org/grpc/server.go", "Debian's Go gRPC sources (golang-google-grpc-dev)")
    require_path(
        GOCODE / "google.golang.org/protobuf/proto/proto.go",
        "Debian's Go protobuf sources (golang-google-protobuf-dev)",
    )
    require_path(
        GOCODE / "github.com/golang/protobuf/proto/registry.go",
        "github.com/golang/protobuf 1.5 (golang-github-golang-protobuf-1-5-dev): with the 1.3 line grpc-go cannot "
        "decode messages of protoc-gen-go 1.28",
    )


@pytest.fixture(scope="module")
def go_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sandbox binary, built by examples/go/build.sh (which also runs go vet and the Go unit tests)."""
    _require_go_toolchain()
    out = tmp_path_factory.mktemp("go-sandbox")
    result = subprocess.run(
        ["bash", str(GO_DIR / "build.sh"), str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"build.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert re.search(r"^ok\s", result.stdout, re.MULTILINE), f"go test did not pass:\n{result.stdout}"
    assert result.stdout.strip().splitlines()[-1] == str(out / "sandbox")
    return out / "sandbox"


def test_go_example_is_gofmt_clean() -> None:
    gofmt = require_tool("gofmt", "gofmt comes with golang-go")
    result = subprocess.run([gofmt, "-l", str(GO_DIR)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", f"not gofmt-formatted: {result.stdout}"


@dataclass
class SidecarProcess:
    process: asyncio.subprocess.Process
    unix: str = ""
    tcp: str = ""
    log: list[str] = field(default_factory=list)


@pytest.fixture
async def sidecar(api: Api, short_dir: str) -> AsyncIterator[SidecarProcess]:
    """`work-sidecar serve` as a process against the emulator, on a Unix socket and a free TCP port (both read from
    its "work-sidecar serving" log line); ready once gRPC health answers SERVING."""
    assert SIDECAR_BIN.exists(), SIDECAR_BIN
    process = await asyncio.create_subprocess_exec(
        str(SIDECAR_BIN), "serve", "--api-url", api.url, "--environment-id", api.environment_id,
        "--listen", f"unix://{short_dir}/sidecar.sock", "--listen", "127.0.0.1:0",
        "--ttl", "2", "--release-ttl", "1", "--drain-timeout", "5", "--log-format", "json",
        env=os.environ | {"WORK_SIDECAR_API_KEY": KEY}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    running = SidecarProcess(process)

    async def read_log() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode(errors="replace")
            running.log.append(line)
            if '"work-sidecar serving"' in line:
                listen = json.loads(line)["listen"]
                running.unix = next(a for a in listen if a.startswith("unix://"))
                running.tcp = next(a for a in listen if not a.startswith("unix://"))

    reader = asyncio.ensure_future(read_log())
    try:
        await eventually(
            lambda: running.unix or process.returncode is not None, timeout=20, message="sidecar logs its addresses"
        )
        assert process.returncode is None, "".join(running.log)[-3000:]
        await eventually(lambda: serving(running.unix), timeout=20, message="sidecar health SERVING")
        yield running
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader


@dataclass
class Sandbox:
    """The Go sandbox as a child process; its stdout lines are collected as they come."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Future[None] | None = None

    @property
    def out(self) -> str:
        return "".join(self.lines)

    async def finished(self, timeout: float = 30) -> str:
        """Waits for the sandbox to exit by itself, which it must do with status 0."""
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        assert self.reader is not None
        await self.reader
        assert self.process.returncode == 0, self.out
        return self.out


RunSandbox = Callable[..., Awaitable[Sandbox]]


@pytest.fixture
async def run_sandbox(go_sandbox: Path) -> AsyncIterator[RunSandbox]:
    started: list[Sandbox] = []

    async def run(*args: str, env: dict[str, str] | None = None) -> Sandbox:
        process = await asyncio.create_subprocess_exec(
            str(go_sandbox), *args, env=os.environ | (env or {}), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        sandbox = Sandbox(process)

        async def read() -> None:
            assert process.stdout is not None
            async for raw in process.stdout:
                sandbox.lines.append(raw.decode(errors="replace"))

        sandbox.reader = asyncio.ensure_future(read())
        started.append(sandbox)
        return sandbox

    yield run
    for sandbox in started:
        if sandbox.process.returncode is None:
            sandbox.process.kill()
            await sandbox.process.wait()
        if sandbox.reader is not None:
            sandbox.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sandbox.reader


async def test_go_sandbox_takes_an_item_to_stopped(api: Api, sidecar: SidecarProcess, run_sandbox: RunSandbox) -> None:
    work_ids = [work["id"] for work in await api.enqueue(2)]
    seen: list[str] = []
    # Two runs for two items: a -once sandbox must not take a second item on its way out (it would sit leased to a
    # gone sandbox for the whole re-attach grace, and the second run would wait for it in vain).
    for _ in range(2):
        sandbox = await run_sandbox(
            sidecar.unix, "-once", "-sandbox-id", "go-test", "-work-seconds", "1", "-ping-seconds", "0.2"
        )
        out = await sandbox.finished()
        assigned = re.findall(r"\] assigned (work_\w+) \(session \S+\), lease token of (\d+) chars", out)
        assert len(assigned) == 1, f"a -once sandbox takes exactly one item:\n{out}"
        work_id, token_length = assigned[0]
        assert work_id in work_ids and work_id not in seen
        seen.append(work_id)
        assert int(token_length) > 0, "WorkAssigned carries a non-empty lease token"
        assert f"keepalive {work_id}: LEASE_STATE_ACTIVE" in out, "KeepAlive answers the ping"
        assert f"GetWork {work_id}: WORK_STATE_ACTIVE" in out
        assert f"stopped {work_id}: state WORK_STATE_STOPPED" in out
        assert "done: 1 item(s)" in out
        acked = {e["path"].split("/")[-2] for e in await api.requests("ack")}
        assert acked == set(seen), "a -once sandbox leaves without having been handed (acked) a second item"
    for work_id in work_ids:
        item = await api.item(work_id)
        assert item["state"] == "stopped"
        assert item["metadata"] == {"handled_by": "go-test", "language": "go"}, "UpdateWorkMetadata reached the API"


async def test_go_sandbox_ends_work_early_on_a_stop_request(
    api: Api, sidecar: SidecarProcess, run_sandbox: RunSandbox
) -> None:
    [work] = await api.enqueue(1)
    sandbox = await run_sandbox("-once", "-work-seconds", "120", env={"WORK_SIDECAR_ADDR": sidecar.tcp})
    await eventually(
        lambda: f"UpdateWorkMetadata {work['id']}" in sandbox.out or sandbox.process.returncode is not None,
        timeout=20,
        message="the sandbox is working on the item",
    )
    assert f"watching {sidecar.tcp} " in sandbox.out
    await api.platform_stop(work["id"], force=False)
    out = await sandbox.finished(timeout=30)  # far less than the 120 s of work
    assert f"stop requested for {work['id']}" in out or f"keepalive {work['id']}: LEASE_STATE_STOP_REQUESTED" in out
    assert f"stopped {work['id']}: state WORK_STATE_STOPPED" in out
    assert await api.state(work["id"]) == "stopped"


async def test_go_sandbox_abandons_an_item_whose_lease_is_lost(
    api: Api, sidecar: SidecarProcess, run_sandbox: RunSandbox
) -> None:
    [work] = await api.enqueue(1)
    sandbox = await run_sandbox(sidecar.unix, "-once", "-work-seconds", "120")
    await eventually(
        lambda: f"UpdateWorkMetadata {work['id']}" in sandbox.out or sandbox.process.returncode is not None,
        timeout=20,
        message="the sandbox is working on the item",
    )
    await api.steal(work["id"])  # another holder heartbeats: the sidecar's next compare-and-swap fails
    out = await sandbox.finished(timeout=30)
    assert f"lease lost for {work['id']}: LEASE_LOST_REASON_PRECONDITION_FAILED" in out or (
        f"keepalive {work['id']}: LEASE_STATE_LOST" in out
    ), out
    assert f"abandoned {work['id']}" in out
    assert f"stopped {work['id']}" not in out
    assert await api.requests("stop", work["id"]) == [], "no stop is sent for an item that is no longer ours"
    assert await api.state(work["id"]) == "active", "the thief holds it"
