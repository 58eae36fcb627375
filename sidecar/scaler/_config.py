"""The scaler's configuration: one frozen dataclass, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core import parse_listen
from ..workapi import DEPRECATED_BACKENDS, HTTP_BACKENDS, PROVIDERS

DEFAULT_LISTEN = "127.0.0.1:6000"


@dataclass(frozen=True, slots=True)
class ScalerConfig:
    """Everything `work-sidecar scaler` can be told. Secrets are kept out of repr."""

    api_url: str
    """The Work API (required: a scaler watching an embedded, private emulator would always scale to zero)."""
    api_key: str = field(repr=False)
    environment_id: str | None = None
    """The environment of triggers that do not name one in `environmentId` (None: every trigger must)."""
    provider: str = "anthropic"
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    stats_interval: float = 5.0
    """Seconds between two stats reads of one environment (while KEDA asks about it)."""
    max_backoff: float = 60.0
    """Upper bound of the wait after failed reads (doubling from stats_interval)."""
    max_age: float = 60.0
    """A reading older than this is not served: KEDA gets UNAVAILABLE (and its `fallback` applies)."""
    target_items: float = 1.0
    """Default `targetItemsPerReplica`."""
    activation_threshold: float = 0.0
    """Default `activationThreshold`: active when items needing a replica exceed it."""
    linger: float = 120.0
    """An environment nobody asked about (no call, no open stream) for this long stops being read."""
    first_reading_timeout: float = 10.0
    """How long a call waits for an environment's first reading."""
    max_environments: int = 64
    worker_id: str | None = None
    http_backend: str = "httptools"
    keepalive_time: float = 30.0
    log_format: str = "auto"
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        self._check_work_api_and_listen()
        self._check_readings()
        if self.http_backend not in HTTP_BACKENDS and self.http_backend not in DEPRECATED_BACKENDS:
            raise ValueError(f"http backend must be one of {', '.join(HTTP_BACKENDS)}")

    def _check_work_api_and_listen(self) -> None:
        if self.provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}")
        if not self.api_url:
            raise ValueError("--api-url is required: the scaler reads the queue the sidecars serve")
        if not self.api_key:
            raise ValueError("--api-key (or WORK_SIDECAR_API_KEY) is required")
        if not self.listen:
            raise ValueError("at least one --listen address is required")
        for address in self.listen:
            parse_listen(address)

    def _check_readings(self) -> None:
        if self.stats_interval <= 0:
            raise ValueError("--stats-interval must be positive")
        if self.max_backoff < self.stats_interval:
            raise ValueError("--max-backoff must be at least --stats-interval")
        if self.max_age < self.stats_interval:
            raise ValueError("--max-age must be at least --stats-interval")
        if not self.target_items > 0:
            raise ValueError("--target-items must be positive")
        if not self.activation_threshold >= 0:
            raise ValueError("--activation-threshold must not be negative")
        if self.linger <= 0 or self.first_reading_timeout <= 0 or self.max_environments < 1:
            raise ValueError("linger, first reading timeout and max environments must be positive")
