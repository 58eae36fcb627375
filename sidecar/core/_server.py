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
import socket
import stat
import time
from collections import Counter

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from .. import __version__
from ..telemetry import tracing_enabled
from ..work.v1 import work_service_pb2 as pb
from ..workapi import (
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    TLSError,
    TransportError,
    WorkApiClient,
    WorkApiError,
)
from . import _telemetry as telemetry
from ._config import ServerSettings, SidecarSettings, parse_listen
from .edge._auth import BearerTokenInterceptor
from .edge._health import HealthReporter
from .edge._limits import add_to_server
from .edge._service import WorkService
from .engine._dispatcher import Dispatcher
from .engine._handover import HandOver
from .engine._lease import Leases
from .engine._leaser import Leaser
from .engine._liveness import Liveness
from .engine._poller import Poller
from .engine._stops import Stops
from .engine._supervisor import Supervisor
from .persistence import Binding, Journal
from .persistence._adoption import Adoption
from .persistence._tokens import TokenIssuer

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
        ("grpc.so_reuseport", 0),  # a second sidecar on the same port fails to start instead of sharing it
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
                heartbeat_connections=policy.heartbeat_concurrency,
                http_backend=api.http_backend,
            )
            self._exit.push_async_callback(client.aclose)
        self.client = client
        self.supervisor = Supervisor()
        self.dispatcher = Dispatcher()
        self.journal: Journal | None = None
        tokens: TokenIssuer | None = None
        if settings.state.state_dir:  # leases survive a crash: journal them, issue tokens a successor can verify
            binding = Binding.of(
                environment_id=api.environment_id, api_url=client.base_url, provider=api.provider, api_key=api.api_key
            )
            self.journal = Journal(settings.state.state_dir, binding, fsync_interval=settings.state.fsync_interval)
            self.journal.lock()  # first: a sidecar that finds the state dir taken writes nothing in it
            try:
                tokens = TokenIssuer.in_dir(settings.state.state_dir)
            except BaseException:
                self.journal.close()
                raise
        self.leases = Leases([telemetry.TelemetryObserver(), self.dispatcher], tokens=tokens)
        if self.journal is not None:
            self.leases.observe(self.journal.observer)
        self.leaser = Leaser(
            client, policy, self.leases, concurrency=policy.heartbeat_concurrency, supervisor=self.supervisor
        )
        self.stops = Stops(client, policy, self.leases, supervisor=self.supervisor)
        self.liveness = Liveness(policy, self.leases, self.leaser, self.stops)
        self.leases.observe(self.liveness)
        intents = None if self.journal is None else self.journal.intents
        self.handover = HandOver(
            client, policy, self.leases, self.leaser, self.dispatcher, supervisor=self.supervisor, intents=intents
        )
        self.adoption = (
            Adoption(client, policy, self.leases, self.leaser, self.liveness, self.journal, supervisor=self.supervisor)
            if self.journal
            else None
        )
        self.poller = Poller(
            client, polling, self.dispatcher, self.handover, supervisor=self.supervisor, intake=self.journal
        )
        self.service = WorkService(
            client=client,
            leases=self.leases,
            dispatcher=self.dispatcher,
            handover=self.handover,
            liveness=self.liveness,
            stops=self.stops,
            policy=policy,
        )
        self.server = grpc.aio.server(interceptors=_interceptors(settings.server), options=server_options(settings))
        add_to_server(self.service, self.server)  # as the generated add_…_to_server, with lenient deserializers
        self.health = HealthServicer()
        journal = self.journal
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME], self.server)
        # --health-listen: the same health answers on a port of their own, with no other service and no token,
        # so that kubelet's grpc probes reach them on the pod IP while the sandboxes' listeners stay private.
        self.health_server: grpc.aio.Server | None = None
        if settings.server.health_listen:
            self.health_server = grpc.aio.server(options=server_options(settings))
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_reporter = HealthReporter(
            self.health,
            ("", SERVICE_NAME),
            failing_since=lambda: self.poller.failing_since,
            alive=lambda: self.supervisor.alive,
            unready_after=settings.server.unready_after,
            journal_writable=lambda: journal is None or journal.accepting,
        )
        self._drained = asyncio.Event()
        self._stop = asyncio.Event()
        self._bound_paths: list[str] = []
        self.addresses: list[str] = []
        self.fatal: StartupError | None = None
        """Set when the Work API, unreachable at start, answers later by refusing the key or the environment."""
        self._api_wait: asyncio.Task[None] | None = None

    @property
    def api_url(self) -> str:
        return self.client.base_url

    # -- start -------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Check the Work API, bind, serve. Raises StartupError (one line that names the fix) when it cannot.

        A Work API that cannot be reached yet (a mesh proxy not up, DNS not ready) does not stop the start: the
        sidecar serves with readiness NOT_SERVING and asks again with backoff; polling starts once it answers.
        One that answers by refusing the key or the environment, or whose TLS certificate is not trusted, fails the
        start, whenever it answers."""
        if self.state is not Lifecycle.NEW:
            raise RuntimeError(f"start() on a sidecar that is {self.state.value}")
        try:
            await self._check_work_api()
            reached = True
        except WorkApiUnreachable as exc:
            reached = False
            log.warning(
                "the Work API cannot be reached: serving with readiness NOT_SERVING, asking again with backoff",
                extra={"api_url": self.api_url, "error": str(exc)},
            )
            self.health_reporter.work_api_unreached = True
        self.supervisor.keep(self.leaser.run, name="renewal scheduler")
        if self.journal is not None and self.adoption is not None:
            # Before binding and polling: sandboxes re-attach to adopted leases (until then they get UNAVAILABLE
            # and retry), and no new item is taken before the old ones are back in hand.
            recovered = await asyncio.to_thread(self.journal.open)
            self.supervisor.keep(self.journal.run, name="journal")
            await self.adoption.adopt(recovered)
        unix_paths = self._bind()
        health_address = self._bind_health()
        old_umask = os.umask(0o177)  # sockets are created 0600 (never, even briefly, open to others) ...
        try:
            await self.server.start()
        finally:
            os.umask(old_umask)
        self._bound_paths = unix_paths
        for path in unix_paths:
            os.chmod(path, self.settings.server.socket_mode)  # ... then given --socket-mode (0600, or 0660)
        await self.health_reporter.update()
        if self.health_server is not None:
            await self.health_server.start()
        telemetry.register_gauges(
            lambda: len(self.leases),
            lambda: len(self.dispatcher.watchers),
            self.dispatcher.free_capacity,
            lambda: self.health_reporter.ready,
        )
        if self.journal is not None:
            journal = self.journal
            telemetry.register_journal(lambda: journal.accepting, lambda: journal.records_written)
        self.supervisor.keep(self.health_reporter.run, name="health")
        if reached:
            self.poller.start()
        else:
            self._api_wait = asyncio.create_task(self._wait_for_work_api(), name="work api at start")
        self.state = Lifecycle.SERVING
        api = self.settings.work_api
        log.info(
            "work-sidecar serving",
            extra={
                "version": __version__,
                "listen": self.addresses,
                "health_listen": health_address,
                "work_api_reached": reached,
                "provider": api.provider,
                "environment_id": api.environment_id,
                "api_url": self.api_url,
                "worker_id": self.client.worker_id,
            },
        )

    async def _check_work_api(self) -> None:
        """One stats read before serving: a wrong key or environment is reported at once, in one line. Raises
        WorkApiUnreachable when no answer came (no connection, or none within the start-up check's timeout)."""
        timeout = self.settings.work_api.startup_check
        if not timeout:
            return
        url = self.client.base_url
        try:
            async with asyncio.timeout(timeout):
                await self.client.stats()
        except TimeoutError:
            raise WorkApiUnreachable(f"no answer from {url} within {timeout:g} s") from None
        except AuthenticationError as exc:
            raise StartupError(
                f"the Work API at {url} refused the API key ({exc.status_code}): check --api-key"
            ) from None
        except (PermissionDeniedError, NotFoundError, BadRequestError) as exc:
            raise StartupError(
                f"the Work API at {url} refused environment {self.client.environment_id!r} "
                f"({exc.status_code} {exc.error_type}): check --environment-id and the key's permissions"
            ) from None
        except TLSError as exc:  # a certificate problem does not pass by itself: a refusal, not an outage
            raise StartupError(f"the Work API at {url} failed TLS: {exc}: check SSL_CERT_FILE / SSL_CERT_DIR") from None
        except TransportError as exc:
            raise WorkApiUnreachable(f"cannot connect to {url}: {exc}") from None
        except WorkApiError as exc:
            log.warning("the Work API's first answer was an error; serving anyway", extra={"error": str(exc)})

    async def _wait_for_work_api(self) -> None:
        """The start-up check again, with backoff, until the Work API answers; then polling starts. A refusal ends
        the sidecar as it would have at start (`fatal`, exit 2)."""
        delay = START_RETRY_FIRST
        attempt = 1
        while True:
            log.warning(
                "the Work API is still unreachable: readiness NOT_SERVING; asking again",
                extra={"api_url": self.api_url, "attempt": attempt, "retry_in": delay},
            )
            await asyncio.sleep(delay)
            attempt += 1
            delay = min(delay * 2, START_RETRY_MAX)
            try:
                await self._check_work_api()
            except WorkApiUnreachable as exc:
                log.debug("the Work API is unreachable", extra={"error": str(exc)})
                continue
            except StartupError as exc:
                log.error("the Work API refused the sidecar: stopping", extra={"error": str(exc)})
                self.fatal = exc
                self._stop.set()
                return
            break
        if self.state is not Lifecycle.SERVING:  # draining or closed meanwhile: take no work
            return
        log.info("the Work API answered: polling starts", extra={"api_url": self.api_url, "attempts": attempt})
        self.health_reporter.work_api_unreached = False
        self.poller.start()
        await self.health_reporter.update()

    def _bind_health(self) -> str | None:
        if self.health_server is None:
            return None
        address = self.settings.server.health_listen
        port = self._add_port(address, address, self.health_server)
        return f"{address.rpartition(':')[0]}:{port}"

    def _bind(self) -> list[str]:
        unix_paths = []
        for address in self.settings.server.listen:
            kind, target = parse_listen(address)
            if kind == "unix":
                _remove_stale_socket(target)
                os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
                self._add_port(address, address)
                unix_paths.append(target)
                self.addresses.append(address)
            else:
                port = self._add_port(target, address)
                host = target.rpartition(":")[0]
                self.addresses.append(f"{host}:{port}")
        return unix_paths

    def _add_port(self, target: str, address: str, server: grpc.aio.Server | None = None) -> int:
        if not target.startswith("unix:"):
            check_tcp_free(target, address)  # before gRPC tries, so that its own error lines stay out of stderr
        try:
            port = (server or self.server).add_insecure_port(target)
        except RuntimeError:
            port = 0
        if port == 0:
            raise StartupError(
                f"cannot listen on {address}: the address is in use (another work-sidecar?) or not this host's; "
                "choose another --listen"
            )
        return port

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
        self.health_reporter.draining = True
        await self.health_reporter.update()  # readiness NOT_SERVING at once; liveness stays SERVING while draining
        notice = pb.Draining(deadline=Timestamp(seconds=int(deadline), nanos=int((deadline % 1) * 1e9)))
        self.dispatcher.start_drain(notice)
        self.liveness.start_drain()
        await self.poller.stop()
        remaining = drain_timeout - (time.monotonic() - started)
        try:
            async with asyncio.timeout(max(remaining, 0)):
                await self.handover.settled()  # an item acked but not yet assigned is about to be a lease
                await self.leases.wait_all_ended()
        except TimeoutError:
            leases = list(self.leases)
            log.warning("drain timeout passed; releasing the remaining leases", extra={"leases": len(leases)})
            await asyncio.gather(
                *(self.leaser.release(lease, pb.LEASE_LOST_REASON_DRAINED, "the sidecar drained") for lease in leases)
            )
        await self.leaser.releases_sent()  # of leases whose sandbox left (liveness): their items requeue at once
        self.dispatcher.end_all()
        log.info("drained", extra={"seconds": round(time.monotonic() - started, 3)})
        self.state = Lifecycle.DRAINED
        self._drained.set()

    async def close(self) -> None:
        if self.state is Lifecycle.CLOSED:
            return
        drained = self.state is Lifecycle.DRAINED
        self.state = Lifecycle.CLOSED
        if self._api_wait is not None:
            self._api_wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._api_wait
        await self.server.stop(grace=1.0)
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
        await self.poller.stop()
        self.liveness.close()
        await self.supervisor.close()  # the adoption's release heartbeats too
        if self.journal is not None:
            self.journal.close(clean=drained)
        await self._exit.aclose()
        for path in self._bound_paths:  # only what this process bound
            with contextlib.suppress(OSError):
                os.unlink(path)

    async def run(self) -> int:
        """Serve until SIGTERM, SIGINT or SIGQUIT, drain, exit 0. A second such signal exits at once (status 1).
        SIGHUP is logged and ignored (logs go to stdout/stderr: nothing to reopen); SIGUSR1 logs a summary of
        the state (leases, watchers, pollers; no secrets)."""
        loop = asyncio.get_running_loop()
        stop = self._stop
        signals = 0

        def on_stop_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.error("second signal: exiting at once", extra={"signal": signal.Signals(signum).name})
                logging.shutdown()
                os._exit(1)
            log.info("signal received: draining", extra={"signal": signal.Signals(signum).name})
            stop.set()

        for signum in DRAIN_SIGNALS:
            loop.add_signal_handler(signum, on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP ignored (logs need no reopening)"))
        loop.add_signal_handler(signal.SIGUSR1, lambda: log.info("state", extra=self.summary()))
        try:
            await self.start()
            await stop.wait()
            await self.drain()
        finally:
            await self.close()
        if self.fatal is not None:
            raise self.fatal
        return 0

    def summary(self) -> dict[str, object]:
        """What the sidecar is doing, for SIGUSR1 and debugging: counts and ids, never tokens or secrets."""
        return {
            "lifecycle": self.state.value,
            "leases": len(self.leases),
            "lease_states": dict(Counter(telemetry.state_name(lease.state) for lease in self.leases)),
            "watchers": len(self.dispatcher.watchers),
            "free_capacity": self.dispatcher.free_capacity(),
            "polls_in_flight": self.poller.polls_in_flight,
            "poll_failing_for": None
            if self.poller.failing_since is None
            else round(time.monotonic() - self.poller.failing_since, 1),
            "crashes": self.supervisor.crashed,
        }


class StartupError(Exception):
    """The sidecar cannot start; the message is one line that names the cause and the fix."""


class WorkApiUnreachable(Exception):
    """The Work API gave no answer at start (no connection, or none in time): the sidecar serves and asks again."""


START_RETRY_FIRST = 1.0
START_RETRY_MAX = 30.0
"""Seconds between the start-up checks of an unreachable Work API: doubling from the first to the most."""


DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def _interceptors(server: ServerSettings) -> list[grpc.aio.ServerInterceptor]:
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tracing_enabled():
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        only_work = filters.negate(filters.service_name(HEALTH_SERVICE))
        interceptors.append(aio_server_interceptor(filter_=only_work))  # type: ignore[no-untyped-call]
    if server.auth_token:
        interceptors.append(BearerTokenInterceptor(server.auth_token))
    return interceptors


def check_tcp_free(target: str, address: str) -> None:
    """Refuse, in one line, a TCP address another process already listens on: before gRPC binds it and logs
    its own error lines."""
    host, _, port = target.rpartition(":")
    if int(port) == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise StartupError(f"cannot listen on {address}: {exc.strerror}; check --listen") from None
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise StartupError(
                    f"cannot listen on {address}: {exc.strerror} (another work-sidecar?); choose another --listen"
                ) from None


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a process that is gone; refuse one a live process still serves on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket: choose another --listen path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody accepts on it
            return
        except OSError:
            pass
    raise StartupError(f"{path} is in use by a running process (another work-sidecar?): choose another --listen path")
