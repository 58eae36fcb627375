"""Real processes for the chaos suite: the emulator, `work-sidecar serve`, sandboxes; the emulator's admin API.

Every child writes its stdout and stderr to files in the run's directory (read back for the leak check) and is
killed when the run ends (`Processes.kill_all`, also at exit).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench._procs import free_port as free_port  # one free-port probe for bench/ and chaos/ (re-exported)

KEY = "sk-ant-chaos-key-5b1f0c3e9d"
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def wait_for(probe: Callable[[], Any], *, timeout: float, interval: float = 0.1) -> Any:
    """Poll `probe` until it returns something truthy; None after `timeout` seconds (no exception)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        value = await result if asyncio.iscoroutine(result) else result
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(interval)


@contextlib.contextmanager
def _default_sighup() -> Iterator[None]:
    """Children start with SIGHUP at its default action even when this process ignores it (`nohup` does, and an
    ignored signal is inherited across exec): the signal scenarios test the sidecar, not the shell that started us.
    (Not `preexec_fn`: forking a process that runs gRPC threads and then running Python in the child is unsafe.)"""
    ignored = signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    if ignored and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        try:
            yield
        finally:
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
    else:
        yield


class Child:
    """A child process; stdout and stderr each in a file."""

    def __init__(self, name: str, argv: list[str], directory: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        self._out = self.stdout_path.open("wb")
        self._err = self.stderr_path.open("wb")
        with _default_sighup():
            self.popen = subprocess.Popen(
                argv,
                stdout=self._out,
                stderr=self._err,
                stdin=subprocess.DEVNULL,
                env=env or dict(os.environ),
                cwd=ROOT,
            )
        self.process = psutil.Process(self.popen.pid)
        self.killed_at: float | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def rss(self) -> int:
        try:
            return int(self.process.memory_info().rss)
        except psutil.Error:
            return 0

    def output(self) -> str:
        parts = []
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def stdout_lines(self) -> list[str]:
        try:
            return self.stdout_path.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signum)

    def kill(self) -> None:
        """kill -9 (the time is noted: a killed sandbox stops holding its items then)."""
        if self.alive():
            self.killed_at = time.time()
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(10)
        self.close_files()

    async def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.popen.poll()

    async def terminate(self, timeout: float = 10.0) -> int | None:
        self.signal(signal.SIGTERM)
        code = await self.wait(timeout)
        if code is None:
            self.kill()
        self.close_files()
        return self.popen.poll()

    def close_files(self) -> None:
        self._out.close()
        self._err.close()


class Processes:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or Path(tempfile.mkdtemp(prefix="work-sidecar-chaos-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self._names: dict[str, int] = {}
        atexit.register(self.kill_all)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        n = self._names.get(name, 0)
        self._names[name] = n + 1
        child = Child(f"{name}-{n}" if n else name, argv, self.directory, env)
        self.children.append(child)
        return child

    def kill_all(self) -> None:
        for child in self.children:
            child.kill()


class Emulator:
    """`work-sidecar emulator` in its own process and a client for its admin API."""

    def __init__(self, child: Child, url: str) -> None:
        self.child = child
        self.url = url
        self.http = httpx.AsyncClient(base_url=url, timeout=60)

    @classmethod
    async def start(cls, procs: Processes, *, min_ttl: int = 1) -> Emulator:
        port = free_port()
        argv = [str(BIN / "work-sidecar"), "emulator", "--port", str(port), "--key", KEY, "--min-ttl", str(min_ttl)]
        argv += ["--set", "request_log_limit=1000000", "--log-level", "WARNING"]
        child = procs.start("emulator", argv)
        emulator = cls(child, f"http://127.0.0.1:{port}")
        ok = await wait_for(emulator._up, timeout=60, interval=0.05)
        if not ok:
            raise RuntimeError(f"the emulator did not start:\n{child.output()[-2000:]}")
        return emulator

    async def _up(self) -> bool:
        if not self.child.alive():
            raise RuntimeError(f"the emulator exited:\n{self.child.output()[-2000:]}")
        try:
            return (await self.http.get("/_emulator/stats")).status_code == 200
        except httpx.HTTPError:
            return False

    async def close(self) -> None:
        await self.http.aclose()
        await self.child.terminate()

    async def enqueue(self, env: str, count: int = 1) -> list[str]:
        answer = await self.http.post(f"/_emulator/environments/{env}/work", json={"count": count})
        answer.raise_for_status()
        return [item["id"] for item in answer.json()["data"]]

    async def items(self, env: str) -> list[dict[str, Any]]:
        answer = await self.http.get(f"/_emulator/environments/{env}/work")
        if answer.status_code == 404:
            return []
        answer.raise_for_status()
        data: list[dict[str, Any]] = answer.json()["data"]
        return data

    async def item(self, env: str, work_id: str) -> dict[str, Any]:
        answer = await self.http.get(f"/_emulator/environments/{env}/work/{work_id}")
        answer.raise_for_status()
        data: dict[str, Any] = answer.json()
        return data

    async def steal(self, env: str, work_id: str) -> dict[str, Any] | None:
        answer = await self.http.post(f"/_emulator/environments/{env}/work/{work_id}/steal")
        return answer.json() if answer.status_code == 200 else None

    async def requests(self, since: int = 0) -> list[dict[str, Any]]:
        answer = await self.http.get("/_emulator/requests", params={"since": since})
        answer.raise_for_status()
        data: list[dict[str, Any]] = answer.json()["data"]
        return data

    async def next_seq(self) -> int:
        answer = await self.http.get("/_emulator/requests", params={"since": 1 << 62})
        seq: int = answer.json()["next"]
        return seq

    async def settings(self, **changes: Any) -> dict[str, Any]:
        answer = await self.http.patch("/_emulator/settings", json=changes)
        answer.raise_for_status()
        data: dict[str, Any] = answer.json()
        return data


class Sidecar:
    """`work-sidecar serve` on a Unix socket."""

    def __init__(self, child: Child, target: str) -> None:
        self.child = child
        self.target = target

    @classmethod
    def launch(
        cls,
        procs: Processes,
        api_url: str,
        env: str,
        *,
        ttl: int = 4,
        extra: list[str] | None = None,
        environ: dict[str, str] | None = None,
        listen: str | None = None,
    ) -> Sidecar:
        target = listen or f"unix://{procs.directory}/{env}-{time.monotonic_ns()}.sock"
        argv = [str(BIN / "work-sidecar"), "serve", "--api-url", api_url, "--environment-id", env]
        argv += ["--listen", target, "--ttl", str(ttl), "--log-format", "json", "--log-level", "DEBUG"]
        argv += ["--reattach-grace", "2", "--liveness-window", "2", "--release-ttl", "1", "--drain-timeout", "10"]
        argv += extra or []
        child = procs.start(f"sidecar-{env}", argv, env={**os.environ, "WORK_SIDECAR_API_KEY": KEY, **(environ or {})})
        return cls(child, target)

    @classmethod
    async def start(cls, procs: Processes, api_url: str, env: str, **kwargs: Any) -> Sidecar:
        sidecar = cls.launch(procs, api_url, env, **kwargs)
        await sidecar.wait_serving()
        return sidecar

    async def wait_serving(self, timeout: float = 60) -> None:
        async def probe() -> bool:
            if not self.child.alive():
                raise RuntimeError(f"the sidecar exited:\n{self.child.output()[-3000:]}")
            return bool(await health(self.target) == health_pb2.HealthCheckResponse.SERVING)

        if not await wait_for(probe, timeout=timeout, interval=0.05):
            raise RuntimeError(f"the sidecar did not start:\n{self.child.output()[-3000:]}")

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.child.output().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records


async def health(target: str, service: str = "") -> int | None:
    """The health status at `target`, None when it does not answer."""
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
            return int(answer.status)  # type: ignore[no-any-return, unused-ignore]
    except grpc.aio.AioRpcError:
        return None


class SandboxProc:
    """A `chaos.sandbox` process and the events it printed."""

    def __init__(self, child: Child, sandbox_id: str) -> None:
        self.child = child
        self.sandbox_id = sandbox_id

    @classmethod
    def start(
        cls,
        procs: Processes,
        target: str,
        sandbox_id: str,
        *,
        hold: float = 1.0,
        max_in_flight: int = 1,
        keepalive: bool = False,
        max_items: int = 0,
        reads: bool = True,
        reattach: bool = False,
    ) -> SandboxProc:
        argv = [sys.executable, "-m", "chaos.sandbox", target, "--sandbox-id", sandbox_id, "--hold", str(hold)]
        argv += ["--max-in-flight", str(max_in_flight), "--max-items", str(max_items)]
        argv += ["--token-file", str(procs.directory / f"tokens-{sandbox_id}.txt")]
        if keepalive:
            argv.append("--keepalive")
        if reads:
            argv.append("--reads")
        if reattach:
            argv.append("--reattach")
        return cls(procs.start(f"sandbox-{sandbox_id}", argv), sandbox_id)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.child.stdout_lines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def assigned(self) -> list[str]:
        return [e["work_id"] for e in self.events() if e["ev"] == "assigned"]

    def first(self, ev: str, work_id: str | None = None) -> dict[str, Any] | None:
        for event in self.events():
            if event["ev"] == ev and (work_id is None or event.get("work_id") == work_id):
                return event
        return None
