"""Provider profiles: everything that differs between the Anthropic and Qoder Work APIs.

A profile is data, not code: adding a provider means adding one `Provider` value to `PROVIDERS`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType


class CredentialStyle(Enum):
    """How the API key travels."""

    BEARER = "bearer"  # Authorization: Bearer KEY
    X_API_KEY = "x-api-key"  # X-Api-Key: KEY


@dataclass(frozen=True, slots=True)
class Provider:
    """One Work API flavour (paths, headers, limits and error names)."""

    name: str
    default_base_url: str
    path_prefix: str
    """Prefix of every work path, with `{environment_id}` to fill in."""
    credential_style: CredentialStyle
    worker_id_header: str
    extra_headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    list_default_limit: int = 20
    list_max_limit: int = 1000
    precondition_error_type: str = "invalid_request_error"
    request_id_header: str | None = None
    """A header the client may send to choose the request id (Qoder: x-request-id)."""
    id_pattern: re.Pattern[str] = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
    """What a well-formed environment or work id looks like (checked before any request)."""
    sends_secret: bool = True
    confirm_stop_with_force: bool = True
    """How a requested (graceful) stop is confirmed once the work is done: Anthropic's official workers
    send `force: true`; Qoder documents a second stop with the caller's own `force`."""

    def work_path(self, environment_id: str, suffix: str = "") -> str:
        return self.path_prefix.format(environment_id=environment_id) + suffix


ANTHROPIC = Provider(
    name="anthropic",
    default_base_url="https://api.anthropic.com",
    path_prefix="/v1/environments/{environment_id}/work",
    credential_style=CredentialStyle.BEARER,
    worker_id_header="Anthropic-Worker-ID",
    extra_headers=MappingProxyType({"anthropic-version": "2023-06-01", "anthropic-beta": "managed-agents-2026-04-01"}),
    list_default_limit=20,
    list_max_limit=1000,
    precondition_error_type="invalid_request_error",
)

QODER = Provider(
    name="qoder",
    default_base_url="https://api.qoder.com",
    path_prefix="/api/v1/cloud/environments/{environment_id}/work",
    credential_style=CredentialStyle.BEARER,
    worker_id_header="Worker-ID",
    list_default_limit=20,
    list_max_limit=100,
    precondition_error_type="precondition_failed_error",
    request_id_header="x-request-id",
    sends_secret=False,
    confirm_stop_with_force=False,
)

PROVIDERS: Mapping[str, Provider] = MappingProxyType({p.name: p for p in (ANTHROPIC, QODER)})


def get_provider(name: str | Provider) -> Provider:
    if isinstance(name, Provider):
        return name
    try:
        return PROVIDERS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; choose one of {', '.join(PROVIDERS)}") from None
