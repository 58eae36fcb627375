"""Serving the emulator: in the running event loop, in a thread, or as `work-sidecar emulator`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import uvicorn

from ._app import EmulatorApp
from ._settings import EmulatorSettings
from ._store import Item

log = logging.getLogger("sidecar.emulator")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the host process owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Emulator:
    """An in-memory Work API. `async with emulator.serve() as url:` runs it on the current loop."""

    def __init__(self, settings: EmulatorSettings) -> None:
        self.app = EmulatorApp(settings)

    @property
    def settings(self) -> EmulatorSettings:
        return self.app.settings

    @property
    def requests(self) -> list[dict[str, Any]]:
        return list(self.app.requests)

    def update_settings(self, **changes: Any) -> None:
        self.app.update_settings(dataclasses.replace(self.app.settings, **changes))

    def enqueue(
        self, environment_id: str, count: int = 1, data_type: str = "session", metadata: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        return [item.to_json() for item in self.app.store.enqueue(environment_id, count, data_type, metadata)]

    def get_item(self, environment_id: str, work_id: str) -> dict[str, Any]:
        return self.app.store.item(environment_id, work_id).internal()

    def items(self, environment_id: str) -> list[Item]:
        return self.app.store.listing(environment_id)

    def steal_lease(self, environment_id: str, work_id: str) -> None:
        self.app.store.steal(environment_id, work_id)

    def reset(self) -> None:
        self.app.store.reset()
        self.app.faults.clear()
        self.app.requests.clear()

    @contextlib.asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
        bound = sock.getsockname()[1]
        url = f"http://{host}:{bound}"
        self.app.store.base_url = url
        config = uvicorn.Config(
            self.app, lifespan="off", access_log=False, log_level="warning", timeout_keep_alive=75, backlog=2048
        )
        server = _Server(config)
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        try:
            while not server.started:
                if task.done():
                    task.result()
                    raise RuntimeError("the emulator stopped while starting")
                await asyncio.sleep(0.005)
            yield url
        finally:
            server.should_exit = True
            self.app.store.reset()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            sock.close()


class EmulatorThread:
    """Runs an emulator on its own event loop in a daemon thread (for synchronous tests)."""

    def __init__(self, settings: EmulatorSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = Emulator(settings)
        self._host, self._port = host, port
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.url = ""
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="work-api-emulator", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with self.emulator.serve(self._host, self._port) as url:
                self.url = url
                self._ready.set()
                await self._stop.wait()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError("the emulator failed to start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="work-sidecar emulator", description="A local Work API emulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument(
        "--key", default=os.environ.get("WORK_SIDECAR_EMULATOR_KEY"), help="[env WORK_SIDECAR_EMULATOR_KEY]"
    )
    parser.add_argument("--management-key", default=os.environ.get("WORK_SIDECAR_EMULATOR_MANAGEMENT_KEY"))
    parser.add_argument("--min-ttl", type=int, default=10)
    parser.add_argument("--max-ttl", type=int, default=600)
    parser.add_argument("--id-style", choices=("anthropic", "qoder"), default="anthropic")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not args.key:
        parser.error("--key (or WORK_SIDECAR_EMULATOR_KEY) is required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = EmulatorSettings(
        key=args.key,
        management_key=args.management_key,
        min_ttl_seconds=args.min_ttl,
        max_ttl_seconds=args.max_ttl,
        id_style=args.id_style,
    )

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        async with Emulator(settings).serve(args.host, args.port) as url:
            log.info("Work API emulator listening on %s (both flavours; admin API under /_emulator/)", url)
            await stop.wait()

    asyncio.run(run())
    return 0
