"""The sidecar's configuration: one frozen dataclass, validated once at start-up."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..wire import MAX_BLOCK_MS, MIN_BLOCK_MS
from ..workapi import HTTP_BACKENDS, PROVIDERS

LOG_FORMATS = ("auto", "json", "text")


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """Everything `work-sidecar serve` can be told. Secrets are kept out of repr."""

    environment_id: str
    api_key: str = field(repr=False)
    provider: str = "anthropic"
    api_url: str | None = None
    """None: start the embedded Work API emulator and use it."""
    listen: tuple[str, ...] = ("127.0.0.1:50051",)
    socket_mode: int = 0o600
    """Permissions of the Unix sockets: 0o600 (only this user may connect) or 0o660 (its group too)."""
    drain_timeout: float = 30.0
    ttl_seconds: int = 60
    """The lease TTL asked for with every heartbeat (the Work API clamps it)."""
    liveness_window: float = 30.0
    """A lease whose WatchWork stream is gone stays alive while KeepAlive pings it at least this often."""
    reattach_grace: float = 30.0
    """After a sandbox disappears, how long its leases wait for it to re-attach before they are released."""
    release_ttl_seconds: int | None = 10
    """On release, one last heartbeat asks for this TTL so the item returns to the queue sooner (None: skip)."""
    poll_block_ms: int = MAX_BLOCK_MS
    max_pollers: int = 4
    """Upper bound of parallel long polls while items keep coming (one when the queue is empty)."""
    reclaim_older_than_ms: int | None = None
    unclaimed_wait: float = 2.0
    """An item polled while no sandbox had a free slot (one left as the poll returned) waits this long for a
    slot before it is left unacked for the Work API to reclaim (0: leave it at once)."""
    first_heartbeat_timeout: float = 30.0
    """How long the claiming heartbeat (NO_HEARTBEAT, right after ack) may keep retrying."""
    heartbeat_concurrency: int = 256
    auth_token: str | None = field(default=None, repr=False)
    worker_id: str | None = None
    keepalive_time: float = 30.0
    """Seconds between the server's HTTP/2 keepalive pings on idle connections."""
    log_format: str = "auto"
    log_level: str = "INFO"
    emulator_port: int = 8787
    metrics_listen: str | None = None
    max_connections: int = 100
    http_backend: str = "aiohttp"
    """The HTTP transport under httpx for Work API requests: aiohttp (default, cheaper) or httpx's own."""

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}")
        if not self.environment_id:
            raise ValueError("an environment id is required")
        if not self.listen:
            raise ValueError("at least one --listen address is required")
        for address in self.listen:
            parse_listen(address)
            if not address.startswith("unix:") and not is_loopback(address) and not self.auth_token:
                raise ValueError(
                    f"listening on {address} (not loopback) needs --auth-token: "
                    "any process that reaches that port could otherwise take work"
                )
        if self.socket_mode not in (0o600, 0o660):
            raise ValueError(
                f"socket mode {self.socket_mode:#o}: use 0600 or 0660 (any local user who can open the socket "
                "can take work: for more, listen on TCP with --auth-token)"
            )
        if not MIN_BLOCK_MS <= self.poll_block_ms <= MAX_BLOCK_MS:
            raise ValueError(f"poll block must be {MIN_BLOCK_MS}..{MAX_BLOCK_MS} ms")
        if self.ttl_seconds <= 0:
            raise ValueError("--ttl must be positive")
        for name in ("drain_timeout", "liveness_window", "reattach_grace", "first_heartbeat_timeout", "unclaimed_wait"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must not be negative")
        if self.max_pollers < 1 or self.heartbeat_concurrency < 1:
            raise ValueError("max pollers and heartbeat concurrency must be at least 1")
        if self.http_backend not in HTTP_BACKENDS:
            raise ValueError(f"http backend must be one of {', '.join(HTTP_BACKENDS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")


def parse_listen(address: str) -> tuple[str, str]:
    """('unix', path) or ('tcp', 'host:port'); raises ValueError on anything else."""
    if address.startswith("unix://"):
        path = address[len("unix://") :]
        if not path.startswith("/"):
            raise ValueError(f"{address}: a unix address needs an absolute path (unix:///path)")
        return "unix", path
    if address.startswith("unix:"):
        raise ValueError(f"{address}: write unix:///absolute/path")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address}: expected unix:///path or host:port")
    return "tcp", address


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
