"""Every behaviour of the emulator that the Work API documents leave open is a setting.

`EmulatorSettings` is frozen: change it with `Emulator.update_settings(**changes)` or `PATCH /_emulator/settings`,
which validate the new value as a whole (`__post_init__`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

IdStyle = Literal["anthropic", "qoder"]
StoppingExpiry = Literal["queued", "stopped"]
GracefulStopOfStarting = Literal["stopped", "stopping"]
ListOrder = Literal["newest_first", "oldest_first"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "id_style": ("anthropic", "qoder"),
    "stopping_expiry": ("queued", "stopped"),
    "graceful_stop_of_starting": ("stopped", "stopping"),
    "list_order": ("newest_first", "oldest_first"),
}


@dataclass(frozen=True, slots=True)
class EmulatorSettings:
    """How the emulator behaves. Defaults follow the documents; every inferred behaviour can be changed."""

    key: str
    """The one credential given at start: the environment key (Anthropic) / personal access token (Qoder).
    Missing or wrong credential: 401 authentication_error."""

    management_key: str | None = None
    """When set, get and update need this key (a "Claude API key") and reject `key` with 403 permission_error,
    while poll, ack, heartbeat, stop and list reject this key with 403 (as the SDK docstrings say); stats takes
    either. When None, `key` works on every endpoint (as the public docs suggest)."""

    accept_item_token: bool = True
    """Anthropic: the `sessions_token` inside a polled item's `secret` is accepted as a Bearer credential for that
    item's heartbeat and stop (official workers prefer it there), and refused with 403 everywhere else."""

    require_anthropic_headers: bool = True
    """Anthropic flavour: 400 invalid_request_error without `anthropic-version`, or without
    `managed-agents-2026-04-01` in `anthropic-beta`."""

    auto_create_environments: bool = True
    """Any environment id is accepted and created on first use. False: unknown environments answer 404
    (create them with `PUT /_emulator/environments/{id}` or by enqueueing)."""

    min_ttl_seconds: int = 10
    """Lower clamp of a heartbeat's `desired_ttl_seconds` (Qoder documents 10)."""

    max_ttl_seconds: int = 600
    """Upper clamp of a heartbeat's `desired_ttl_seconds` (Qoder documents 600)."""

    default_ttl_seconds: int = 60
    """TTL of a heartbeat that asks for none (undocumented; examples show 60), clamped like any other."""

    reclaim_default_ms: int = 5000
    """A polled item not acked within this long may be polled again, when the poll gives no
    `reclaim_older_than_ms` (documented default 5000)."""

    id_style: IdStyle = "anthropic"
    """Style of new ids (both flavours see the same items): `anthropic` (`work_011CZkZ9X2dpNyB7HsEFoRfW`, sessions
    `sesn_…`) or `qoder` (prefix + 32 lowercase hex, sessions `sess_…`)."""

    ack_requires_polling_worker: bool = False
    """Anthropic flavour: 409 when the ack's `Anthropic-Worker-ID` differs from the poll's. Off by default because
    the official SDK sends the worker id on poll only. (Qoder always compares `Worker-ID`.)"""

    anthropic_compare_while_stopping: bool = False
    """Anthropic flavour: compare `expected_last_heartbeat` even while `stopping` (the SDK docstring says the server
    does not compare it while `stopping` or `stopped`; `stopped` is never compared)."""

    stopping_expiry: StoppingExpiry = "queued"
    """What lease expiry does to a `stopping` item: back to `queued` (like an `active` one; strict: a worker that
    never confirms its stop sees the item redelivered) or `stopped`."""

    reclaim_starting_after_seconds: float | None = None
    """None: an item acked but never heartbeated stays `starting` for ever (the real-world strand the sidecar must
    avoid). A number: such an item goes back to `queued` after that many seconds."""

    graceful_stop_of_starting: GracefulStopOfStarting = "stopped"
    """A graceful stop of a `starting` item (no lease holder to tell yet): `stopped` at once, or `stopping`."""

    stop_of_stopped_conflicts: bool = True
    """Stopping an item that is already `stopped` answers 409 (the SDK treats that 409 as "already stopped");
    False: 200 with the item unchanged."""

    strip_secret_padding_every: int = 2
    """Every n-th item's `secret` has its base64 padding stripped (0: never); the others keep it."""

    list_order: ListOrder = "newest_first"
    """Order of list results (both flavours)."""

    workers_polling_window_seconds: float = 30.0
    """`workers_polling` in stats counts distinct worker ids that polled within this window (documented: 30 s)."""

    request_log_limit: int = 20_000
    """How many Work API requests `GET /_emulator/requests` keeps (oldest dropped first; 0: no log)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _field_types()[f.name])
        self._check_keys()
        self._check_numbers()
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}")

    def _check_keys(self) -> None:
        if not self.key:
            raise ValueError("key must not be empty")
        if self.management_key is not None and (not self.management_key or self.management_key == self.key):
            raise ValueError("management_key must be non-empty and differ from key")

    def _check_numbers(self) -> None:
        if not 1 <= self.min_ttl_seconds <= self.max_ttl_seconds:
            raise ValueError("need 1 <= min_ttl_seconds <= max_ttl_seconds")
        if self.default_ttl_seconds < 1:
            raise ValueError("default_ttl_seconds must be positive")
        if self.reclaim_default_ms < 0:
            raise ValueError("reclaim_default_ms must not be negative")
        if self.reclaim_starting_after_seconds is not None and self.reclaim_starting_after_seconds <= 0:
            raise ValueError("reclaim_starting_after_seconds must be positive (or None)")
        if self.strip_secret_padding_every < 0:
            raise ValueError("strip_secret_padding_every must not be negative")
        if self.workers_polling_window_seconds <= 0:
            raise ValueError("workers_polling_window_seconds must be positive")
        if self.request_log_limit < 0:
            raise ValueError("request_log_limit must not be negative")

    def __repr__(self) -> str:  # never show the keys
        shown = ", ".join(
            f"{f.name}={'<redacted>' if f.name in SECRET_FIELDS and getattr(self, f.name) else getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
        )
        return f"EmulatorSettings({shown})"

    def public_view(self) -> dict[str, Any]:
        """All settings as JSON, keys redacted."""
        view = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in SECRET_FIELDS:
            if view[name] is not None:
                view[name] = "<redacted>"
        return view


SECRET_FIELDS = ("key", "management_key")


def _field_types() -> dict[str, Any]:
    global _TYPES
    if _TYPES is None:
        _TYPES = typing.get_type_hints(EmulatorSettings)
    return _TYPES


_TYPES: dict[str, Any] | None = None


def _check_type(name: str, value: Any, hint: Any) -> None:
    """A small runtime check of JSON-ish values against the field's annotation."""
    allowed: list[Any] = []
    for part in typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,):
        if typing.get_origin(part) is Literal:
            allowed.append(str)
        else:
            allowed.append(part)
    ok = False
    for kind in allowed:
        if kind is type(None):
            ok = ok or value is None
        elif kind is float:
            ok = ok or (isinstance(value, int | float) and not isinstance(value, bool))
        elif kind is int:
            ok = ok or (isinstance(value, int) and not isinstance(value, bool))
        else:
            ok = ok or isinstance(value, kind)
    if not ok:
        raise TypeError(f"{name}: {type(value).__name__} is not a valid value")


def parse_setting(name: str, text: str) -> Any:
    """A setting's value from command-line text (`--set name=value`)."""
    hints = _field_types()
    if name not in hints:
        raise ValueError(f"unknown setting {name!r}")
    hint = hints[name]
    parts = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in parts and text.lower() in ("none", "null", ""):
        return None
    if bool in parts:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name} is a boolean")
    if int in parts:
        return int(text)
    if float in parts:
        return float(text)
    return text
