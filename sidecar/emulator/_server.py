"""Serving the emulator: `Emulator.serve()` on the running event loop, or `EmulatorThread` for synchronous code."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, TypeVar

import uvicorn

from ._app import EmulatorApp
from ._backend import Store
from ._core import EmulatorCore
from ._errors import ApiError
from ._flavours import FLAVOURS, Flavour
from ._settings import EmulatorSettings

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's event loop when it is installed, else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional on some platforms
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _http_implementation() -> str:
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover
        return "h11"
    return "httptools"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and without it every
    # response waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Emulator:
    """An in-memory Work API serving every flavour of the flavour table: the in-process face of the emulator.

    `async with emulator.serve() as url:` serves it on the running event loop. The methods below are the same
    controls as the admin API's (both are thin faces over `EmulatorCore`); call them from the loop the emulator
    serves on (from another thread, use `EmulatorThread.call`). Lookups of unknown environments or items raise
    `ApiError` (status 404).
    """

    def __init__(
        self, settings: EmulatorSettings, *, flavours: Sequence[Flavour] = FLAVOURS, store: Store | None = None
    ) -> None:
        self.core = EmulatorCore(settings, store)
        self.app = EmulatorApp(self.core, flavours)
        self.url: str | None = None
        """The base URL while serving."""

    # -- settings -----------------------------------------------------------------------------------------

    @property
    def settings(self) -> EmulatorSettings:
        return self.core.settings

    def update_settings(self, **changes: Any) -> EmulatorSettings:
        """Replace some settings (validated as a whole); takes effect for the next request."""
        return self.core.update_settings(changes)

    # -- state --------------------------------------------------------------------------------------------

    def enqueue(
        self, environment_id: str, count: int = 1, data_type: str = "session", metadata: dict[str, str] | None = None
    ) -> list[dict[str, Any]]:
        """Queue `count` new items (waking waiting polls); their work objects."""
        if count < 1:
            raise ValueError("count must be positive")
        return self.core.enqueue(environment_id, count, data_type, metadata)

    def get_item(self, environment_id: str, work_id: str) -> dict[str, Any]:
        """The emulator's internal view of an item: the work object (without `secret`) plus `last_heartbeat`,
        `ttl_seconds`, `lease_expires_at`, `lease_expires_in_seconds`, `holder`, `polled_by`, `acked_by`, `queue`,
        `deliveries`, `heartbeats`, `requeues`, `has_secret`."""
        return self.core.item_view(environment_id, work_id)

    def items(self, environment_id: str) -> list[dict[str, Any]]:
        """Internal views of every item of an environment, oldest first."""
        return self.core.item_views(environment_id)

    def steal_lease(self, environment_id: str, work_id: str) -> dict[str, Any]:
        """Lease theft: `last_heartbeat` changes as if another worker heartbeated, so the holder's next
        compare-and-swap fails with 412."""
        return self.core.steal(environment_id, work_id)

    def expire_lease(self, environment_id: str, work_id: str) -> dict[str, Any]:
        """Let an item's lease run out now (as if no heartbeat came for its TTL)."""
        return self.core.expire(environment_id, work_id)

    def set_environment(
        self, environment_id: str, *, self_hosted: bool | None = None, permitted: bool | None = None
    ) -> dict[str, Any]:
        """Create or change an environment: `self_hosted=False` makes every Work API call on it a 400,
        `permitted=False` a 403."""
        return self.core.store.set_environment(environment_id, self_hosted=self_hosted, permitted=permitted)

    def queue_stats(self, environment_id: str) -> dict[str, Any]:
        """What the Work API's stats endpoint answers for this environment."""
        return self.core.store.stats(environment_id)

    # -- faults -------------------------------------------------------------------------------------------

    def inject_fault(self, operation: str, **spec: Any) -> dict[str, Any]:
        """Add a fault (same fields as `POST /_emulator/faults`): `count` (default 1; None: until cleared),
        `environment_id`, `status` (+ `retry_after`, `retry_after_ms`, `should_retry`, `error_type`, `message`),
        `drop` (close the connection without a response), `after_apply` (apply, then spoil the answer: `lose`,
        `garbage`, `length_and_chunked`, `two_lengths`, `drip` + `drip_ms`, `twice` + `stray_delay_ms`), `latency_ms`.
        Raises `ApiError` (400) when invalid."""
        return self.core.add_fault({"operation": operation, **spec})

    def clear_faults(self) -> None:
        self.core.faults.clear()

    # -- the request log ----------------------------------------------------------------------------------

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every Work API request still in the log, in arrival order (`status` is None while in flight)."""
        return self.core.log.since(0)

    def requests_since(self, seq: int) -> list[dict[str, Any]]:
        return self.core.log.since(seq)

    def clear_requests(self) -> None:
        """Forget the logged requests (not the counts of `request_counts`)."""
        self.core.log.clear()

    def clear_request_counts(self) -> None:
        self.core.log.clear_counts()

    def request_counts(self) -> dict[str, dict[str, int]]:
        """Requests per operation and status (`{"heartbeat": {"200": 10, "412": 1}}`)."""
        return self.core.log.counts_by_operation()

    def reset(self) -> None:
        """Forget every environment, item, fault and logged request (settings stay)."""
        self.core.reset()

    # -- serving ------------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on the running event loop (no thread) until the block exits; yields the base URL.
        Port 0 picks a free port."""
        if self.url is not None:
            raise RuntimeError("the emulator is already serving")
        sock = _bind(host, port)
        bound_port = sock.getsockname()[1]
        url = f"http://[{host}]:{bound_port}" if ":" in host else f"http://{host}:{bound_port}"
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            access_log=False,
            log_config=None,
            log_level="warning",
            http=_http_implementation(),
            timeout_keep_alive=75,
            server_header=False,
            proxy_headers=False,
            backlog=2048,
        )
        config.load()
        server = uvicorn.Server(config)
        server.lifespan = config.lifespan_class(config)
        store = self.core.store
        store.base_url = url
        store.bind(asyncio.get_running_loop())
        try:
            await server.startup(sockets=[sock])
            ticker = asyncio.ensure_future(server.main_loop())  # uvicorn's once-a-second Date header refresh
            self.url = url
            try:
                yield url
            finally:
                self.url = None
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
                await self._shutdown(server)
        finally:
            store.unbind()
            sock.close()

    async def _shutdown(self, server: uvicorn.Server) -> None:
        for listener in getattr(server, "servers", []):
            listener.close()
        for connection in list(server.server_state.connections):
            connection.shutdown()  # idle keep-alive connections close now, busy ones after their response
        self.core.store.unbind()  # waiting long polls answer null at once
        tasks = set(server.server_state.tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=5)
            for task in late:
                task.cancel()


class EmulatorThread:
    """An emulator on its own event loop in a daemon thread, for synchronous code:

    with EmulatorThread(EmulatorSettings(key="k")) as running:   # or: as (url, emulator)
        httpx.get(f"{running.url}/_emulator/stats")
        running.call(running.emulator.enqueue, "env_1")
    """

    def __init__(self, settings: EmulatorSettings, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = Emulator(settings)
        self.url = ""
        self._host, self._port = host, port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="work-api-emulator", daemon=True)

    def _run(self) -> None:
        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with self.emulator.serve(self._host, self._port) as url:
                self.url = url
                self._ready.set()
                await self._stop.wait()

        try:
            with asyncio.Runner(loop_factory=loop_factory()) as runner:
                runner.run(serve())
        # not swallowed: handed to the thread that waits in __enter__, which raises it (as concurrent.futures does)
        except BaseException as exc:  # noqa: BLE001
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> EmulatorThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None or not self.url:
            raise RuntimeError("the emulator did not start") from self._error
        return self

    def __iter__(self) -> Iterator[Any]:
        """`with EmulatorThread(...) as (url, emulator):`"""
        return iter((self.url, self.emulator))

    def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `function(*args, **kwargs)` on the emulator's loop and return its result."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("the emulator is not running")

        async def run() -> T:
            return function(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(run(), loop).result(timeout=30)

    def __exit__(self, *exc_info: object) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout=30)


__all__ = ["ApiError", "Emulator", "EmulatorThread", "loop_factory"]
