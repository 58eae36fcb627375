"""The scaler's configuration: one frozen dataclass, validated once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core import check_exposure, parse_listen
from ..workapi import DEPRECATED_BACKENDS, HTTP_BACKENDS, PROVIDERS
from ._metadata import check_activation, check_target
from ._tls import check as check_tls

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
    auth_token: str | None = field(default=None, repr=False)
    """Bearer token every ExternalScaler call must carry (health and reflection stay open)."""
    tls_cert: str | None = None
    """PEM certificate (chain) served on every TCP address; with `tls_key`."""
    tls_key: str | None = None
    tls_client_ca: str | None = None
    """PEM CA bundle: when set, every TCP client must present a certificate it signed (mutual TLS)."""
    stats_interval: float = 5.0
    """Seconds between two stats reads of one environment (while KEDA asks about it)."""
    max_backoff: float = 60.0
    """Upper bound of the wait after failed reads (doubling from stats_interval)."""
    max_age: float = 60.0
    """A reading older than this is not served: KEDA gets UNAVAILABLE (and its `fallback` applies)."""
    target_items: float = 1.0
    """Default `targetItemsPerReplica`."""
    activation_threshold: float = 0.0
    """Default `activationThreshold`: active when the metric exceeds it."""
    max_list_pages: int = 20
    """Pages of the Work API's list one count of items in progress may read (`includeInProgress`)."""
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
        self._check_tls()
        self._check_readings()
        if self.http_backend not in HTTP_BACKENDS and self.http_backend not in DEPRECATED_BACKENDS:
            raise ValueError(f"http backend must be one of {', '.join(HTTP_BACKENDS)}")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

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
        check_exposure(
            self.listen,
            auth_token=self.auth_token,
            tls=self.tls,
            remedy="TLS (--tls-cert and --tls-key) or --auth-token",
            risk="read every environment's queue through this scaler",
        )

    def _check_tls(self) -> None:
        """Load the certificate, key and client CA once, so a bad file is one clear line at start-up."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)")
        if self.tls_cert is not None and self.tls_key is not None:
            check_tls(self.tls_cert, self.tls_key, self.tls_client_ca)

    def _check_readings(self) -> None:
        if self.stats_interval <= 0:
            raise ValueError("--stats-interval must be positive")
        if self.max_backoff < self.stats_interval:
            raise ValueError("--max-backoff must be at least --stats-interval")
        if self.max_age < self.stats_interval:
            raise ValueError("--max-age must be at least --stats-interval")
        try:
            check_target(self.target_items)
        except ValueError as exc:
            raise ValueError(f"--target-items {exc}") from None
        try:
            check_activation(self.activation_threshold)
        except ValueError as exc:
            raise ValueError(f"--activation-threshold {exc}") from None
        if self.max_list_pages < 1:
            raise ValueError("--max-list-pages must be at least 1")
        if self.linger <= 0 or self.first_reading_timeout <= 0 or self.max_environments < 1:
            raise ValueError("linger, first reading timeout and max environments must be positive")
