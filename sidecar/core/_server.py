"""Assembles the sidecar: Work API client, leases, dispatcher, poller, the gRPC server; drains on SIGTERM.

Drain (first SIGTERM or SIGINT): health turns NOT_SERVING, polling stops at once (an item a cancelled
poll would have returned is never acked, so the Work API reclaims it), every watcher gets `Draining`,
leases keep being renewed until their sandboxes stop them or `drain_timeout` passes, then the rest are
released and the process exits 0. A second signal exits at once with status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
import time
from collections.abc import Coroutine
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ..telemetry import tracing_enabled
from ..work.v1 import work_service_pb2 as pb
from ..work.v1 import work_service_pb2_grpc as pb_grpc
from ..workapi import WorkApiClient
from . import _telemetry as telemetry
from ._auth import BearerTokenInterceptor
from ._config import SidecarConfig, parse_listen
from ._dispatcher import Dispatcher
from ._lease import LeaseTable
from ._leaser import Leaser
from ._poller import Poller
from ._service import WorkService

log = logging.getLogger("sidecar")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WorkService"].full_name


def server_options(config: SidecarConfig) -> list[tuple[str, int]]:
    """HTTP/2 keepalive that keeps long-lived streams alive through proxies and meshes."""
    keepalive_ms = int(config.keepalive_time * 1000)
    return [
        ("grpc.keepalive_time_ms", keepalive_ms),  # the server pings idle connections
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),  # clients may ping with no call in flight
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),  # ...as often as every 5 s
        ("grpc.http2.max_ping_strikes", 0),  # never GOAWAY a client for pinging
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_age_ms", 2**31 - 1),
    ]


class Sidecar:
    """One sidecar process's worth of state. `start()`, then `drain()` and `close()` (or `run()`)."""

    def __init__(self, config: SidecarConfig, *, client: WorkApiClient | None = None) -> None:
        self.config = config
        self._client = client
        self._exit = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._drained = asyncio.Event()
        self._draining = False
        self.addresses: list[str] = []
        self.api_url: str | None = config.api_url
        self.emulator: Any = None

    # -- start -------------------------------------------------------------------------------------

    async def start(self) -> None:
        config = self.config
        if self._client is None:
            if config.api_url is None:
                await self._start_embedded_emulator()
            self._client = WorkApiClient(
                provider=config.provider,
                api_key=config.api_key,
                environment_id=config.environment_id,
                base_url=self.api_url,
                worker_id=config.worker_id,
                max_connections=config.max_connections,
                http_backend=config.http_backend,
            )
            self._exit.push_async_callback(self._client.aclose)
        client = self._client
        self.table = LeaseTable()
        self.dispatcher = Dispatcher()
        self.leaser = Leaser(client, config, self.table, self.dispatcher)
        self.poller = Poller(client, config, self.dispatcher, self.leaser, self.table)
        self.service = WorkService(
            config=config,
            client=client,
            table=self.table,
            dispatcher=self.dispatcher,
            leaser=self.leaser,
            poller=self.poller,
        )
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if tracing_enabled():
            from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

            health = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
            only_work = filters.negate(filters.service_name(health))
            interceptors.append(aio_server_interceptor(filter_=only_work))  # type: ignore[no-untyped-call]
        if config.auth_token:
            interceptors.append(BearerTokenInterceptor(config.auth_token))
        self.server = grpc.aio.server(interceptors=interceptors, options=server_options(config))
        pb_grpc.add_WorkServiceServicer_to_server(self.service, self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server,
        )
        unix_paths = self._bind()
        old_umask = os.umask(0o177)  # sockets are created 0600 (never, even briefly, open to others) ...
        try:
            await self.server.start()
        finally:
            os.umask(old_umask)
        for path in unix_paths:
            os.chmod(path, config.socket_mode)  # ... then given --socket-mode (0600, or 0660 for the group)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        telemetry.register_gauges(
            lambda: len(self.table), lambda: len(self.dispatcher.watchers), self.dispatcher.free_capacity
        )
        self._spawn(self.leaser.run())
        self.poller.start()
        log.info(
            "work-sidecar serving",
            extra={
                "listen": self.addresses,
                "provider": config.provider,
                "environment_id": config.environment_id,
                "api_url": self.api_url,
                "worker_id": client.worker_id,
            },
        )

    async def _start_embedded_emulator(self) -> None:
        from ..emulator import Emulator, EmulatorSettings

        self.emulator = Emulator(EmulatorSettings(key=self.config.api_key))
        self.api_url = await self._exit.enter_async_context(
            self.emulator.serve(host="127.0.0.1", port=self.config.emulator_port)
        )
        log.warning(
            "no --api-url given: started the embedded Work API emulator (for demos and tests, not production)",
            extra={"api_url": self.api_url, "environment_id": self.config.environment_id},
        )

    def _bind(self) -> list[str]:
        unix_paths = []
        for address in self.config.listen:
            kind, target = parse_listen(address)
            if kind == "unix":
                _remove_stale_socket(target)
                os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
                self.server.add_insecure_port(address)
                unix_paths.append(target)
                self.addresses.append(address)
            else:
                port = self.server.add_insecure_port(target)
                if port == 0:
                    raise OSError(f"cannot listen on {address}")
                host = target.rpartition(":")[0]
                self.addresses.append(f"{host}:{port}")
        return unix_paths

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._tasks.append(asyncio.ensure_future(coro))

    # -- drain and stop ----------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    async def drain(self) -> None:
        """Stop taking work, let in-flight leases finish for up to drain_timeout, release the rest."""
        if self._draining:
            await self._drained.wait()
            return
        self._draining = True
        started = time.monotonic()
        deadline = time.time() + self.config.drain_timeout
        log.info("draining", extra={"leases": len(self.table), "drain_timeout": self.config.drain_timeout})
        await self.health.enter_graceful_shutdown()
        notice = pb.Draining(deadline=Timestamp(seconds=int(deadline), nanos=int((deadline % 1) * 1e9)))
        self.dispatcher.start_drain(notice)
        await self.poller.stop()
        remaining = self.config.drain_timeout - (time.monotonic() - started)
        try:
            async with asyncio.timeout(max(remaining, 0)):
                await self.leaser.wait_all_ended()
        except TimeoutError:
            leases = list(self.table)
            log.warning("drain timeout passed; releasing the remaining leases", extra={"leases": len(leases)})
            await asyncio.gather(
                *(self.leaser.release(lease, pb.LEASE_LOST_REASON_DRAINED, "the sidecar drained") for lease in leases)
            )
        self.dispatcher.end_all()
        log.info("drained", extra={"seconds": round(time.monotonic() - started, 3)})
        self._drained.set()

    async def close(self) -> None:
        if hasattr(self, "server"):
            await self.server.stop(grace=1.0)
        if hasattr(self, "poller"):
            await self.poller.stop()
        if hasattr(self, "leaser"):
            await self.leaser.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._exit.aclose()
        for address in self.config.listen:
            kind, target = parse_listen(address)
            if kind == "unix":
                with contextlib.suppress(OSError):
                    os.unlink(target)

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT, drain, exit 0. A second signal exits at once."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.error("second signal: exiting at once", extra={"signal": signal.Signals(signum).name})
                logging.shutdown()
                os._exit(1)
            log.info("signal received: draining", extra={"signal": signal.Signals(signum).name})
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            await self.start()
            await stop.wait()
            await self.drain()
        finally:
            await self.close()
        return 0


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    os.unlink(path)
