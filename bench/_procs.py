"""Child processes (emulator, sidecar), the emulator's admin API, and process metrics.

Every child is registered in `CHILDREN`; `CHILDREN.kill_all()` runs on normal exit, on exceptions, on Ctrl-C and on
SIGTERM (see `bench.__main__`), so no emulator or sidecar is ever left behind.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sidecar.emulator import AdminClient, ApiError

KEY = "sk-ant-bench-key"
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Child:
    """A child process with its output in a log file, and psutil's view of it."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ROOT
        )
        self.process = psutil.Process(self.popen.pid)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()

    def kill(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)
        self._log.close()


class Children:
    """Every child process started by this run."""

    def __init__(self) -> None:
        self._children: list[Child] = []
        self._log_dir: Path | None = None

    @property
    def log_dir(self) -> Path:
        """The children's logs and sockets: a fresh directory in TMPDIR, made on first use and removed by
        `kill_all()` (which also runs at exit), so a run leaves nothing behind, failed or not."""
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="work-sidecar-bench-"))
        return self._log_dir

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, self.log_dir, env)
        self._children.append(child)
        return child

    def discard(self, child: Child) -> None:
        if child in self._children:
            self._children.remove(child)

    def kill_all(self) -> None:
        for child in self._children:
            child.kill()
        self._children.clear()
        if self._log_dir is not None:
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = None


CHILDREN = Children()
atexit.register(CHILDREN.kill_all)


# -- the emulator ---------------------------------------------------------------------------------------


@dataclass
class LogEntry:
    seq: int
    at: float
    operation: str
    environment_id: str | None
    work_id: str | None
    status: int | None
    duration_ms: float | None = None

    @property
    def end(self) -> float:
        """When the emulator answered (epoch seconds; the arrival when it has not answered yet)."""
        return self.at + (self.duration_ms or 0.0) / 1000


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass
class EmulatorProcess:
    """The Work API emulator (`python -m sidecar.emulator`, uvloop) and a client for its admin API."""

    child: Child
    url: str
    http: httpx.AsyncClient = field(repr=False)

    @property
    def admin(self) -> AdminClient:
        return AdminClient(self.url, http=self.http)

    @classmethod
    async def start(cls, default_ttl: int = 60, log_limit: int = 300_000) -> EmulatorProcess:
        port = free_port()
        argv = [sys.executable, "-m", "sidecar.emulator", "--port", str(port), "--key", KEY, "--min-ttl", "1"]
        argv += ["--default-ttl", str(default_ttl)]
        argv += ["--set", f"request_log_limit={log_limit}", "--log-level", "WARNING"]
        child = CHILDREN.start("emulator", argv, env={**os.environ, "PYTHONOPTIMIZE": "1"})
        url = f"http://127.0.0.1:{port}"
        http = httpx.AsyncClient(base_url=url, timeout=60)
        emulator = cls(child, url, http)
        deadline = time.monotonic() + 30
        while True:
            try:
                await emulator.admin.stats()
                return emulator
            except (httpx.HTTPError, ApiError):
                if not child.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the emulator did not start:\n{child.tail()}") from None
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        await self.http.aclose()
        self.child.stop()

    async def enqueue(self, environment_id: str, count: int = 1) -> list[str]:
        return [item["id"] for item in await self.admin.enqueue(environment_id, count)]

    async def next_seq(self) -> int:
        return await self.admin.next_seq()

    async def requests(self, since: int) -> tuple[list[LogEntry], int]:
        """Logged Work API requests from `since` on, and the next index to ask for."""
        page = await self.admin.request_log(since)
        entries = [
            LogEntry(
                e["seq"],
                _epoch(e["at"]),
                e["operation"],
                e["environment_id"],
                e["work_id"],
                e["status"],
                e.get("duration_ms"),
            )
            for e in page.data
        ]
        return entries, page.next

    async def items(self, environment_id: str) -> list[dict[str, Any]]:
        return await self.admin.items(environment_id)


def count_operations(entries: Iterable[LogEntry], environment_id: str) -> dict[str, int]:
    """Work API requests of one environment per operation (the harness's own `stats` calls left out)."""
    counts: dict[str, int] = {}
    for entry in entries:
        if entry.environment_id == environment_id and entry.operation != "stats":
            counts[entry.operation] = counts.get(entry.operation, 0) + 1
    return counts


# -- the sidecar ----------------------------------------------------------------------------------------


@dataclass
class SidecarProcess:
    """`work-sidecar serve` on a Unix socket, against the emulator."""

    child: Child
    target: str

    @classmethod
    async def start(
        cls, emulator: EmulatorProcess, environment_id: str, *, ttl: int = 60, extra: list[str] | None = None
    ) -> SidecarProcess:
        socket_path = CHILDREN.log_dir / f"{environment_id}.sock"
        target = f"unix://{socket_path}"
        argv = [str(BIN / "work-sidecar"), "serve", "--api-url", emulator.url, "--api-key", KEY]
        argv += ["--environment-id", environment_id, "--listen", target, "--ttl", str(ttl), "--log-format", "json"]
        argv += extra or []
        child = CHILDREN.start(f"sidecar-{environment_id}", argv)
        sidecar = cls(child, target)
        await sidecar._wait_serving()
        return sidecar

    async def _wait_serving(self) -> None:
        deadline = time.monotonic() + 30
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                if not self.child.alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"the sidecar did not start:\n{self.child.tail()}")
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.child.kill()  # its leases are of no further interest: the emulator forgets them
        CHILDREN.discard(self.child)


@contextlib.asynccontextmanager
async def sidecar(
    emulator: EmulatorProcess, environment_id: str, *, ttl: int = 60, extra: list[str] | None = None
) -> AsyncIterator[SidecarProcess]:
    process = await SidecarProcess.start(emulator, environment_id, ttl=ttl, extra=extra)
    try:
        yield process
    finally:
        process.stop()


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100), nearest rank; None when there are no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))]
