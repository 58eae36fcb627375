"""The sidecar's settings: one small frozen dataclass per component, validated once at start-up.

    WorkApiSettings   → the Work API client (where, who, how)
    ServerSettings    → the gRPC server (listeners, auth, keepalive, drain)
    LeasePolicy       → the lease keeper and the hand-over       (_policy.py)
    PollPolicy        → the poller                               (_policy.py)
    StateSettings     → the lease journal and the token key (--state-dir)

`SidecarSettings` bundles the five for the composition root. Logging, telemetry exporters and the demo
emulator are the CLI's business and not here. Secrets are kept out of repr.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..workapi import DEPRECATED_BACKENDS, HTTP_BACKENDS, PROVIDERS, get_provider
from .engine._policy import LeasePolicy, PollPolicy


@dataclass(frozen=True, slots=True)
class WorkApiSettings:
    """Which Work API, which environment, with which key."""

    environment_id: str
    api_key: str = field(repr=False)
    api_url: str = ""
    """Base URL of the Work API ('' means the provider's default). The CLI starts its demo emulator and puts
    that emulator's URL here when it is given none: the core itself never starts an emulator."""
    provider: str = "anthropic"
    worker_id: str | None = None
    """Worker id sent to the Work API (default: random per process)."""
    max_connections: int = 100
    """Connections to the Work API for polls, acks, stops and the sandboxes' reads; heartbeats have a lane of
    their own beside them (`LeasePolicy.heartbeat_concurrency` connections), so no other request holds them up."""
    http_backend: str = "httptools"
    """The HTTP transport for Work API requests: httptools (default: the lean exchange, httpx when a proxy applies)
    or httpx (`sidecar.workapi.HTTP_BACKENDS`; `aiohttp` is a deprecated name for httpx)."""
    startup_check: float = 15.0
    """At start, one stats read must answer within this many seconds, or the sidecar exits with a one-line
    error naming the cause (URL, key or environment). 0: skip the check."""

    def __post_init__(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}")
        if not self.environment_id:
            raise ValueError("an environment id is required")
        if not get_provider(self.provider).id_pattern.match(self.environment_id):
            raise ValueError(
                "--environment-id is not a valid id (letters, digits, '_' and '-', at most 128): "
                "copy it from the environment's page"
            )
        if self.http_backend not in HTTP_BACKENDS and self.http_backend not in DEPRECATED_BACKENDS:
            raise ValueError(f"http backend must be one of {', '.join(HTTP_BACKENDS)}")
        if self.max_connections < 2:
            raise ValueError("max connections must be at least 2")
        if self.api_url and urlsplit(self.api_url).scheme not in ("http", "https"):
            raise ValueError(f"--api-url {self.api_url!r}: use an http:// or https:// URL")
        if self.api_url and not urlsplit(self.api_url).hostname:
            raise ValueError(f"--api-url {self.api_url!r} names no host")
        if self.startup_check < 0:
            raise ValueError("the startup check timeout must not be negative")


MIN_AUTH_TOKEN = 16
"""Characters an --auth-token needs at least: a short one can be guessed by anyone who reaches the port."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The local gRPC server the sandboxes talk to."""

    listen: tuple[str, ...] = ("127.0.0.1:50051",)
    socket_mode: int = 0o600
    """Permissions of the Unix sockets: 0o600 (only this user may connect) or 0o660 (its group too)."""
    auth_token: str | None = field(default=None, repr=False)
    keepalive_time: float = 30.0
    """Seconds between the server's HTTP/2 keepalive pings on idle connections."""
    drain_timeout: float = 30.0
    """After SIGTERM, how long leases may run on before the rest are released (s)."""
    unready_after: float = 30.0
    """Readiness turns NOT_SERVING once every poll has failed for this long (s); see `_health.py`."""
    health_listen: str = ""
    """host:port of a listener that serves `grpc.health.v1` only, without a token, on any interface ('' = none):
    what kubelet's native grpc probes connect to. It reveals nothing but the serving status."""

    def __post_init__(self) -> None:
        if not self.listen:
            raise ValueError("at least one --listen address is required")
        if self.health_listen:
            kind, _ = parse_listen(self.health_listen)
            if kind != "tcp":
                raise ValueError(f"--health-listen {self.health_listen!r}: give host:port (kubelet probes use TCP)")
            if self.health_listen in self.listen:
                raise ValueError(f"--health-listen {self.health_listen!r} is a --listen address too: use another port")
        check_exposure(self.listen, auth_token=self.auth_token)
        if self.socket_mode not in (0o600, 0o660):
            raise ValueError(
                f"socket mode {self.socket_mode:#o}: use 0600 or 0660 (any local user who can open the socket "
                "can take work: for more, listen on TCP with --auth-token)"
            )
        if self.drain_timeout < 0:
            raise ValueError("drain-timeout must not be negative")
        if self.keepalive_time <= 0:
            raise ValueError("keepalive-time must be positive")


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Where leases survive a crash or restart of the sidecar (the lease journal and the token key)."""

    state_dir: str = ""
    """Directory for the lease journal and the token key ('' = none: leases die with the process)."""
    fsync_interval: float = 1.0
    """The journal is written at once and fsynced at most this often (s): only a machine crash can lose that."""

    def __post_init__(self) -> None:
        if self.fsync_interval <= 0:
            raise ValueError("fsync interval must be positive")


@dataclass(frozen=True, slots=True)
class SidecarSettings:
    """Everything the core needs, one part per component."""

    work_api: WorkApiSettings
    server: ServerSettings = field(default_factory=ServerSettings)
    leases: LeasePolicy = field(default_factory=LeasePolicy)
    polling: PollPolicy = field(default_factory=PollPolicy)
    state: StateSettings = field(default_factory=StateSettings)

    @classmethod
    def of(cls, **values: Any) -> SidecarSettings:
        """Build from flat field names (`ttl_seconds=2, listen=(…), api_url=…`): each goes to the one part
        that declares it. Unknown names raise TypeError."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in _PARTS}
        for name, value in values.items():
            part = _OWNER.get(name)
            if part is None:
                raise TypeError(f"no setting named {name!r}")
            parts[part][name] = value
        return cls(**{name: kind(**parts[name]) for name, kind in _PARTS.items()})


_PARTS: dict[str, Any] = {
    "work_api": WorkApiSettings,
    "server": ServerSettings,
    "leases": LeasePolicy,
    "polling": PollPolicy,
    "state": StateSettings,
}
_OWNER: dict[str, str] = {f.name: part for part, kind in _PARTS.items() for f in dataclasses.fields(kind)}
assert len(_OWNER) == sum(len(dataclasses.fields(kind)) for kind in _PARTS.values()), "setting names are unique"


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


def check_exposure(
    listen: Sequence[str],
    *,
    auth_token: str | None,
    tls: bool = False,
    remedy: str = "--auth-token",
    risk: str = "take work",
) -> None:
    """Refuse a TCP address other than loopback whose calls nothing protects (no bearer token, no TLS), and a
    token too short to resist guessing. Unix sockets are protected by their file permissions."""
    for address in listen:
        parse_listen(address)
        if not (auth_token or tls) and not address.startswith("unix:") and not is_loopback(address):
            raise ValueError(
                f"listening on {address} (not loopback) needs {remedy}: "
                f"any process that reaches that port could otherwise {risk}"
            )
    if auth_token is not None and len(auth_token) < MIN_AUTH_TOKEN:
        raise ValueError(f"--auth-token must be at least {MIN_AUTH_TOKEN} characters (e.g. `openssl rand -hex 32`)")


def is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
