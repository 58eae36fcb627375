"""Every behaviour of the emulator that the Work API documents leave open is a setting."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EmulatorSettings:
    key: str
    """The environment key (Anthropic) / personal access token (Qoder) every request must carry."""
    management_key: str | None = None
    """When set, get and update need this key and reject `key` with 403 (as the SDK docstrings say)."""
    min_ttl_seconds: int = 10
    max_ttl_seconds: int = 600
    default_ttl_seconds: int = 60
    """TTL of a heartbeat that asks for none."""
    reclaim_default_ms: int = 5000
    """A polled item not acked within this long may be polled again (when the poll gives no value)."""
    id_style: str = "anthropic"
    """`anthropic` (work_011CZ…) or `qoder` (work_ + 32 lowercase hex) for new ids."""
    workers_polling_window_seconds: float = 30.0
    request_log_limit: int = 200_000
    require_anthropic_headers: bool = True
    """Anthropic flavour: 400 without `anthropic-version` and the managed-agents beta."""
    ack_requires_polling_worker: bool = False
    """Anthropic flavour: 409 when the ack's Anthropic-Worker-ID differs from the poll's (Qoder always)."""
    reclaim_starting_after_seconds: float | None = None
    """None: an item acked but never heartbeated stays `starting` for ever (the real-world strand)."""
    strip_secret_padding_every: int = 2
    """Every n-th Anthropic item's secret has its base64 padding stripped (0: never)."""
    stop_of_stopped_conflicts: bool = True
    """Stopping an item that is already stopped answers 409 (else 200, unchanged)."""

    def __post_init__(self) -> None:
        if not self.key:
            raise ValueError("the emulator needs a key")
        if not 1 <= self.min_ttl_seconds <= self.max_ttl_seconds:
            raise ValueError("need 1 <= min_ttl_seconds <= max_ttl_seconds")
        if self.id_style not in ("anthropic", "qoder"):
            raise ValueError("id_style is anthropic or qoder")

    def __repr__(self) -> str:
        return (
            f"EmulatorSettings(min_ttl_seconds={self.min_ttl_seconds}, max_ttl_seconds={self.max_ttl_seconds}, "
            f"id_style={self.id_style!r}, management_key={'set' if self.management_key else None})"
        )
