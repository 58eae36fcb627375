"""The self-hosted Work API's wire facts, written once: what the client sends and the emulator checks.

Both sides import this module: the client (`sidecar.workapi`) to speak the protocol, the emulator
(`sidecar.emulator`) to check and answer it. The emulator's *behaviour* (leases, queues, which documented
ambiguity it resolves how) stays its own; what a request and an answer look like lives here.

Why a top-level module and not one inside `sidecar.workapi`: importing anything under `sidecar.workapi` runs that
package's `__init__` (the client, httpx, tenacity, OpenTelemetry), and the emulator must not depend on the
client it is there to check. So this is a leaf: it imports the standard library only, and nothing in `sidecar`
imports less. The provider profiles live here for the same reason: they are the per-provider wire facts the
emulator answers by as much as the client speaks by. `sidecar.workapi` re-exports them.

Adding a provider: add one `Provider` value to `PROVIDERS` here and one `Flavour` to the emulator's flavour table
(`sidecar/emulator/_flavours.py`); nothing else names a provider.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType
from typing import Any, Literal

# -- values -------------------------------------------------------------------------------------------------

NO_HEARTBEAT = "NO_HEARTBEAT"
"""The `expected_last_heartbeat` value that claims a lease nobody has heartbeated yet."""

MIN_BLOCK_MS = 1
MAX_BLOCK_MS = 999
"""A long poll's `block_ms` range (omit it for a poll that returns at once)."""

WORK_STATES = ("queued", "starting", "active", "stopping", "stopped")
LEASED_STATES = frozenset({"starting", "active", "stopping"})
"""States in which a worker holds the item's lease."""

# -- objects ------------------------------------------------------------------------------------------------

WORK_TYPE = "work"
HEARTBEAT_TYPE = "work_heartbeat"
QUEUE_STATS_TYPE = "work_queue_stats"
ERROR_TYPE = "error"

WorkTimestamp = Literal[
    "created_at", "acknowledged_at", "started_at", "latest_heartbeat_at", "stop_requested_at", "stopped_at"
]
WORK_TIMESTAMPS: tuple[WorkTimestamp, ...] = (
    "created_at", "acknowledged_at", "started_at", "latest_heartbeat_at", "stop_requested_at", "stopped_at",
)  # fmt: skip
"""The work object's timestamp fields, in wire order (RFC 3339 strings or null)."""
WORK_FIELDS = ("type", "id", "environment_id", "data", "state", "metadata", *WORK_TIMESTAMPS, "secret")
"""Every field of a work object, in wire order."""
WORK_DATA_FIELDS = ("type", "id")
HEARTBEAT_FIELDS = ("type", "last_heartbeat", "lease_extended", "state", "ttl_seconds")
LEASE_SNAPSHOT_FIELDS = ("state", "last_heartbeat", "lease_extended", "ttl_seconds", "lease_updated_at")
"""A 412's `error.details.current_state`."""
QUEUE_STATS_FIELDS = ("type", "depth", "pending", "oldest_queued_at", "workers_polling")
HEARTBEAT_PRECONDITION_FAILED = "heartbeat_precondition_failed"
"""`error.details.error_code` of a heartbeat's 412."""


def work_object(
    *,
    id: str,
    environment_id: str,
    data: Mapping[str, Any],
    state: str,
    metadata: Mapping[str, str],
    timestamps: Mapping[str, str | None],
    secret: str | None,
) -> dict[str, Any]:
    """A work object as the Work API sends it (fields in wire order; a timestamp not given is null)."""
    return {
        "type": WORK_TYPE,
        "id": id,
        "environment_id": environment_id,
        "data": dict(data),
        "state": state,
        "metadata": dict(metadata),
        **{name: timestamps.get(name) for name in WORK_TIMESTAMPS},
        "secret": secret,
    }


# -- list pages ---------------------------------------------------------------------------------------------

LIST_PAGE_KEYS = ("data", "next_page")
"""Every provider's list page: the items and the opaque `page` cursor of the next page (null on the last)."""
LIST_ID_KEYS = ("first_id", "last_id", "has_more")
"""What an `after_id`-paginating provider adds to a list page."""


class Pagination(Enum):
    """How a provider's list pages."""

    PAGE = "page"
    """`?page=CURSOR` with the `next_page` of the page before."""
    PAGE_OR_AFTER_ID = "page_or_after_id"
    """Also `?after_id=ID` / `?before_id=ID`; pages carry `first_id`, `last_id` and `has_more`."""


# -- operations ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Operation:
    """One Work API operation: its HTTP method and its route below a provider's work path."""

    name: str
    method: str
    route: str
    """Below the provider's `path_prefix`; `{work_id}` names the item."""


OPERATIONS: Mapping[str, Operation] = MappingProxyType(
    {
        op.name: op
        for op in (
            Operation("poll", "GET", "/poll"),
            Operation("ack", "POST", "/{work_id}/ack"),
            Operation("heartbeat", "POST", "/{work_id}/heartbeat"),
            Operation("stop", "POST", "/{work_id}/stop"),
            Operation("get", "GET", "/{work_id}"),
            Operation("update", "POST", "/{work_id}"),
            Operation("list", "GET", ""),
            Operation("stats", "GET", "/stats"),
        )
    }
)
"""The eight operations, by name."""

# -- errors and headers -------------------------------------------------------------------------------------

ERROR_TYPES: Mapping[int, str] = MappingProxyType(
    {
        400: "invalid_request_error",
        401: "authentication_error",
        402: "billing_error",
        403: "permission_error",
        404: "not_found_error",
        408: "timeout_error",
        409: "invalid_request_error",  # the work endpoints use invalid_request_error on 409 (not conflict_error)
        412: "precondition_failed_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        504: "timeout_error",
        529: "overloaded_error",
    }
)
"""`error.type` of the error envelope by HTTP status."""


def error_type_for(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


REQUEST_ID_HEADER = "request-id"
"""Every answer's request id (also `request_id` in the error envelope)."""
SHOULD_RETRY_HEADER = "x-should-retry"
RETRY_AFTER_HEADER = "retry-after"
RETRY_AFTER_MS_HEADER = "retry-after-ms"

# -- providers ----------------------------------------------------------------------------------------------


class CredentialStyle(Enum):
    """How the API key travels."""

    BEARER = "bearer"  # Authorization: Bearer KEY
    X_API_KEY = "x-api-key"  # X-Api-Key: KEY


@dataclass(frozen=True, slots=True)
class Provider:
    """One Work API flavour: every way a provider's wire differs from another's."""

    name: str
    default_base_url: str
    path_prefix: str
    """Prefix of every work path, with `{environment_id}` to fill in."""
    credential_styles: tuple[CredentialStyle, ...]
    """The ways the provider accepts the key; the client sends the first."""
    worker_id_header: str
    extra_headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    """Headers every request carries (and the provider requires)."""
    beta_header: str | None = None
    """The one of `extra_headers` that is a comma-separated list of betas (the value sent must be among them)."""
    list_default_limit: int = 20
    list_max_limit: int = 1000
    pagination: Pagination = Pagination.PAGE
    precondition_error_type: str = "invalid_request_error"
    """`error.type` of a heartbeat's 412."""
    request_id_header: str | None = None
    """A header the client may send to choose the request id, echoed in the answer (Qoder: x-request-id)."""
    id_pattern: re.Pattern[str] = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
    """What a well-formed environment or work id looks like (checked before any request)."""
    secret_on_poll: bool = True
    """A polled item carries its `secret` (whose sessions token then works on that item's heartbeat and stop)."""
    confirm_stop_with_force: bool = True
    """How a requested (graceful) stop is confirmed once the work is done: Anthropic's official workers
    send `force: true`; Qoder documents a second stop with the caller's own `force`."""

    def work_path(self, environment_id: str, suffix: str = "") -> str:
        return self.path_prefix.format(environment_id=environment_id) + suffix


ANTHROPIC = Provider(
    name="anthropic",
    default_base_url="https://api.anthropic.com",
    path_prefix="/v1/environments/{environment_id}/work",
    credential_styles=(CredentialStyle.BEARER, CredentialStyle.X_API_KEY),
    worker_id_header="Anthropic-Worker-ID",
    extra_headers=MappingProxyType({"anthropic-version": "2023-06-01", "anthropic-beta": "managed-agents-2026-04-01"}),
    beta_header="anthropic-beta",
    list_default_limit=20,
    list_max_limit=1000,
    pagination=Pagination.PAGE,
    precondition_error_type="invalid_request_error",
)

QODER = Provider(
    name="qoder",
    default_base_url="https://api.qoder.com",
    path_prefix="/api/v1/cloud/environments/{environment_id}/work",
    credential_styles=(CredentialStyle.BEARER,),
    worker_id_header="Worker-ID",
    list_default_limit=20,
    list_max_limit=100,
    pagination=Pagination.PAGE_OR_AFTER_ID,
    precondition_error_type="precondition_failed_error",
    request_id_header="x-request-id",
    secret_on_poll=False,
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
