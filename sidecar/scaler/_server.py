"""The scaler's gRPC server: KEDA's ExternalScaler, grpc.health.v1 and server reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import uuid

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from ..core import BearerTokenInterceptor, StartupError, check_tcp_free, parse_listen
from ..keda import externalscaler_pb2 as pb
from ..keda import externalscaler_pb2_grpc as pb_grpc
from ..workapi import RetryPolicies, RetryPolicy, WorkApiClient, get_provider
from ._config import ScalerConfig
from ._readings import Readings
from ._service import ExternalScalerService
from ._telemetry import watch
from ._tls import ReloadingCredentials

log = logging.getLogger("sidecar.scaler")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalScaler"].full_name
NO_RETRY = RetryPolicies(default=RetryPolicy(max_attempts=1), per_operation={})
"""The reader's own loop is the retry (with backoff): a stats call is one attempt."""


class ScalerStartError(Exception):
    """The scaler cannot start as configured; the message is one line naming the cause."""


def _interceptors(config: ScalerConfig) -> list[grpc.aio.ServerInterceptor]:
    """A server span per call when tracing is on (health excluded), then the bearer token check."""
    from ..telemetry import tracing_enabled

    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tracing_enabled():
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        health = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        interceptors.append(aio_server_interceptor(filter_=filters.negate(filters.service_name(health))))  # type: ignore[no-untyped-call]
    if config.auth_token:
        interceptors.append(BearerTokenInterceptor(config.auth_token))
    return interceptors


class Scaler:
    """`start()`, then `close()` (or `run()` until SIGTERM)."""

    def __init__(self, config: ScalerConfig) -> None:
        self.config = config
        self.worker_id = config.worker_id or f"work-sidecar-scaler-{uuid.uuid4().hex[:12]}"
        self.readings = Readings(
            self._client,
            max_environments=config.max_environments,
            interval=config.stats_interval,
            max_backoff=config.max_backoff,
            max_age=config.max_age,
            linger=config.linger,
            max_list_pages=config.max_list_pages,
            page_size=get_provider(config.provider).list_max_limit,  # the fewest requests per count
        )
        watch(self.readings)
        self.addresses: list[str] = []

    def _client(self, environment_id: str) -> WorkApiClient:
        return WorkApiClient(
            provider=self.config.provider,
            api_key=self.config.api_key,
            environment_id=environment_id,
            base_url=self.config.api_url,
            worker_id=self.worker_id,
            retry=NO_RETRY,
            max_connections=4,
            http_backend=self.config.http_backend,
        )

    async def start(self) -> None:
        keepalive_ms = int(self.config.keepalive_time * 1000)
        self.server = grpc.aio.server(
            interceptors=_interceptors(self.config),
            options=[
                ("grpc.keepalive_time_ms", keepalive_ms),  # StreamIsActive streams stay open for hours
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
                ("grpc.http2.max_ping_strikes", 0),
            ],
        )
        self.service = ExternalScalerService(self.config, self.readings)
        pb_grpc.add_ExternalScalerServicer_to_server(self.service, self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection([SERVICE_NAME, health_name, reflection.SERVICE_NAME], self.server)
        credentials = self._credentials()
        for address in self.config.listen:
            kind, target = parse_listen(address)
            if kind == "unix":
                os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(target)
                self.server.add_insecure_port(address)
                self.addresses.append(address)
                continue
            try:
                check_tcp_free(target, address)  # a clear line before gRPC would log its own
            except StartupError as exc:
                raise ScalerStartError(str(exc)) from None
            try:
                if credentials is None:
                    port = self.server.add_insecure_port(target)
                else:
                    port = self.server.add_secure_port(target, credentials)
            except RuntimeError:
                port = 0
            if port == 0:
                raise ScalerStartError(f"cannot listen on {address} (in use, or not an address of this host)")
            self.addresses.append(f"{target.rpartition(':')[0]}:{port}")
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "work-sidecar scaler serving",
            extra={
                "listen": self.addresses,
                "provider": self.config.provider,
                "environment_id": self.config.environment_id,
                "api_url": self.config.api_url,
                "stats_interval": self.config.stats_interval,
                "tls": "mutual" if self.config.tls_client_ca else self.config.tls,
            },
        )

    def _credentials(self) -> grpc.ServerCredentials | None:
        """TLS for every TCP address when a certificate is configured (Unix sockets stay plaintext: their file
        permissions guard them); a client CA makes it mutual TLS. New files are served without a restart."""
        if not self.config.tls:
            return None
        assert self.config.tls_cert is not None
        assert self.config.tls_key is not None
        try:
            self.tls = ReloadingCredentials(self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca)
        except (OSError, ValueError) as exc:
            raise ScalerStartError(str(exc)) from None
        return self.tls.credentials()

    async def close(self) -> None:
        if hasattr(self, "health"):
            await self.health.enter_graceful_shutdown()
        if hasattr(self, "server"):
            await self.server.stop(grace=1.0)
        await self.readings.close()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then stop (streams end; KEDA reconnects to another replica)."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await self.start()
            await stop.wait()
            log.info("signal received: stopping")
        finally:
            await self.close()
        return 0
