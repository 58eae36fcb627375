"""The composition root of the core: builds the components from their settings, serves, drains on SIGTERM.

    poller ──▶ handover ──▶ leases (state machine) ◀── leaser (renewal), liveness, service (RPCs)
                               └──▶ observers: telemetry, dispatcher (watcher streams), liveness, journal
    (--state-dir) journal ──▶ adoption at start: the predecessor's leases, before binding and polling

Drain (first SIGTERM or SIGINT): health turns NOT_SERVING, polling stops at once (an item a cancelled
poll would have returned is never acked, so the Work API reclaims it), every watcher gets `Draining`,
leases keep being renewed until their sandboxes stop them or `drain_timeout` passes, then the rest are
released and the process exits 0. A second signal exits at once with status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import stat
import time

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
from ._adoption import Adoption
from ._auth import BearerTokenInterceptor
from ._config import ServerSettings, SidecarSettings, parse_listen
from ._dispatcher import Dispatcher
from ._handover import HandOver
from ._journal import Binding, Journal, prepare_state_dir
from ._lease import Leases
from ._leaser import Leaser
from ._liveness import Liveness
from ._poller import Poller
from ._service import WorkService
from ._tokens import TokenIssuer

log = logging.getLogger("sidecar")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WorkService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def server_options(settings: SidecarSettings) -> list[tuple[str, int]]:
    """HTTP/2 keepalive that keeps long-lived streams alive through proxies and meshes."""
    keepalive_ms = int(settings.server.keepalive_time * 1000)
    return [
        ("grpc.keepalive_time_ms", keepalive_ms),  # the server pings idle connections
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),  # clients may ping with no call in flight
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),  # ...as often as every 5 s
        ("grpc.http2.max_ping_strikes", 0),  # never GOAWAY a client for pinging
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_age_ms", 2**31 - 1),
    ]


class Lifecycle(enum.Enum):
    NEW = "new"
    SERVING = "serving"
    DRAINING = "draining"
    DRAINED = "drained"
    CLOSED = "closed"


class Sidecar:
    """One sidecar process's worth of state: `start()`, then `drain()` and `close()` (or `run()` for all three).

    The components are built here, each from its own part of the settings; `start()` only binds and starts.
    Pass `client` to use a Work API client of your own (it is then yours to close)."""

    def __init__(self, settings: SidecarSettings, *, client: WorkApiClient | None = None) -> None:
        self.settings = settings
        self.state = Lifecycle.NEW
        self._exit = contextlib.AsyncExitStack()
        api, polling, policy = settings.work_api, settings.polling, settings.leases
        if client is None:
            client = WorkApiClient(
                provider=api.provider,
                api_key=api.api_key,
                environment_id=api.environment_id,
                base_url=api.api_url or None,
                worker_id=api.worker_id,
                max_connections=api.max_connections,
                http_backend=api.http_backend,
            )
            self._exit.push_async_callback(client.aclose)
        self.client = client
        self.dispatcher = Dispatcher()
        self.journal: Journal | None = None
        tokens: TokenIssuer | None = None
        if settings.state.state_dir:  # leases survive a crash: journal them, issue tokens a successor can verify
            tokens = TokenIssuer.in_dir(prepare_state_dir(settings.state.state_dir))
            binding = Binding.of(
                environment_id=api.environment_id, api_url=client.base_url, provider=api.provider, api_key=api.api_key
            )
            self.journal = Journal(settings.state.state_dir, binding, fsync_interval=settings.state.fsync_interval)
        self.leases = Leases([telemetry.TelemetryObserver(), self.dispatcher], tokens=tokens)
        if self.journal is not None:
            self.leases.observe(self.journal)
        heartbeats = min(policy.heartbeat_concurrency, api.max_connections - polling.max_pollers)
        self.leaser = Leaser(client, policy, self.leases, concurrency=heartbeats)
        self.liveness = Liveness(policy, self.leases, self.leaser)
        self.leases.observe(self.liveness)
        self.handover = HandOver(client, policy, self.leases, self.leaser, self.dispatcher, intents=self.journal)
        self.adoption = (
            Adoption(client, policy, self.leases, self.leaser, self.liveness, self.journal) if self.journal else None
        )
        self.poller = Poller(client, polling, self.dispatcher, self.handover)
        self.service = WorkService(
            client=client,
            leases=self.leases,
            dispatcher=self.dispatcher,
            handover=self.handover,
            liveness=self.liveness,
        )
        self.server = grpc.aio.server(interceptors=_interceptors(settings.server), options=server_options(settings))
        pb_grpc.add_WorkServiceServicer_to_server(self.service, self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME], self.server)
        self._tasks: list[asyncio.Task[None]] = []
        self._drained = asyncio.Event()
        self._bound_paths: list[str] = []
        self.addresses: list[str] = []

    @property
    def api_url(self) -> str:
        return self.client.base_url

    # -- start -------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self.state is not Lifecycle.NEW:
            raise RuntimeError(f"start() on a sidecar that is {self.state.value}")
        self._tasks.append(asyncio.ensure_future(self.leaser.run()))
        if self.journal is not None and self.adoption is not None:
            # Before binding and polling: sandboxes re-attach to adopted leases (until then they get UNAVAILABLE
            # and retry), and no new item is taken before the old ones are back in hand.
            recovered = await asyncio.to_thread(self.journal.open)
            self._tasks.append(asyncio.ensure_future(self.journal.run()))
            await self.adoption.adopt(recovered)
        unix_paths = self._bind()
        old_umask = os.umask(0o177)  # sockets are created 0600 (never, even briefly, open to others) ...
        try:
            await self.server.start()
        finally:
            os.umask(old_umask)
        self._bound_paths = unix_paths
        for path in unix_paths:
            os.chmod(path, self.settings.server.socket_mode)  # ... then given --socket-mode (0600, or 0660)
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        telemetry.register_gauges(
            lambda: len(self.leases), lambda: len(self.dispatcher.watchers), self.dispatcher.free_capacity
        )
        self.poller.start()
        self.state = Lifecycle.SERVING
        api = self.settings.work_api
        log.info(
            "work-sidecar serving",
            extra={
                "listen": self.addresses,
                "provider": api.provider,
                "environment_id": api.environment_id,
                "api_url": self.api_url,
                "worker_id": self.client.worker_id,
            },
        )

    def _bind(self) -> list[str]:
        unix_paths = []
        for address in self.settings.server.listen:
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

    # -- drain and stop ----------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.state in (Lifecycle.DRAINING, Lifecycle.DRAINED)

    async def drain(self) -> None:
        """Stop taking work, let in-flight leases finish for up to drain_timeout, release the rest."""
        if self.state is not Lifecycle.SERVING:
            if self.state is Lifecycle.DRAINING:
                await self._drained.wait()
            return
        self.state = Lifecycle.DRAINING
        drain_timeout = self.settings.server.drain_timeout
        started = time.monotonic()
        deadline = time.time() + drain_timeout
        log.info("draining", extra={"leases": len(self.leases), "drain_timeout": drain_timeout})
        await self.health.enter_graceful_shutdown()
        notice = pb.Draining(deadline=Timestamp(seconds=int(deadline), nanos=int((deadline % 1) * 1e9)))
        self.dispatcher.start_drain(notice)
        await self.poller.stop()
        remaining = drain_timeout - (time.monotonic() - started)
        try:
            async with asyncio.timeout(max(remaining, 0)):
                await self.leases.wait_all_ended()
        except TimeoutError:
            leases = list(self.leases)
            log.warning("drain timeout passed; releasing the remaining leases", extra={"leases": len(leases)})
            await asyncio.gather(
                *(self.leaser.release(lease, pb.LEASE_LOST_REASON_DRAINED, "the sidecar drained") for lease in leases)
            )
        self.dispatcher.end_all()
        log.info("drained", extra={"seconds": round(time.monotonic() - started, 3)})
        self.state = Lifecycle.DRAINED
        self._drained.set()

    async def close(self) -> None:
        if self.state is Lifecycle.CLOSED:
            return
        drained = self.state is Lifecycle.DRAINED
        self.state = Lifecycle.CLOSED
        await self.server.stop(grace=1.0)
        await self.poller.stop()
        await self.handover.close()
        await self.leaser.close()
        if self.adoption is not None:
            await self.adoption.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.journal is not None:
            self.journal.close(clean=drained)
        await self._exit.aclose()
        for path in self._bound_paths:  # only what this process bound
            with contextlib.suppress(OSError):
                os.unlink(path)

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


def _interceptors(server: ServerSettings) -> list[grpc.aio.ServerInterceptor]:
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tracing_enabled():
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        only_work = filters.negate(filters.service_name(HEALTH_SERVICE))
        interceptors.append(aio_server_interceptor(filter_=only_work))  # type: ignore[no-untyped-call]
    if server.auth_token:
        interceptors.append(BearerTokenInterceptor(server.auth_token))
    return interceptors


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    os.unlink(path)
