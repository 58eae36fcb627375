"""Typed views of the Work API's JSON objects.

Each model keeps the fields the sidecar uses as typed attributes and everything else in `extra`, so a
field the API adds later is carried along rather than dropped or fatal. Timestamps keep the exact
string the API sent (`last_heartbeat` is echoed byte for byte) and offer a parsed `datetime`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..wire import (
    HEARTBEAT_FIELDS,
    LEASE_SNAPSHOT_FIELDS,
    LIST_PAGE_KEYS,
    QUEUE_STATS_FIELDS,
    WORK_DATA_FIELDS,
    WORK_FIELDS,
    WORK_TIMESTAMPS,
    Pagination,
    work_object,
)
from ._secret import WorkSecret

# A JSON object: json.loads gives dicts, checked first (an exact-type check is cheaper than the ABC's).
_OBJECT = (dict, Mapping)

AFTER_ID_CURSOR = "after_id:"
"""`WorkPage.next_cursor` of a page that continues after an id (not a `page` token)."""


class ModelError(ValueError):
    """The Work API sent JSON that does not have the shape of the expected object."""


def parse_time(value: str | None) -> datetime | None:
    """Parse an RFC 3339 timestamp (with `Z` or an offset); None stays None."""
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None


def _str(obj: Mapping[str, Any], key: str, *, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise ModelError(f"missing field {key!r}")
        return None
    if not isinstance(value, str):
        raise ModelError(f"field {key!r} is not a string")
    return value


MAX_TTL_SECONDS = 366 * 86_400
"""The largest `ttl_seconds` accepted in an answer (a year): anything beyond is a malformed answer."""
MAX_COUNT = 2**53
"""The largest count (queue depth, …) accepted in an answer."""


def _whole(value: Any) -> int | None:
    """`value` as an int when it is a JSON integer (or a float with an integral value); None for anything else,
    booleans included (JSON `true` is not a number)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _number(obj: Mapping[str, Any], key: str, maximum: int, *, default: int | None = None) -> int:
    """A whole number in 0..maximum under `key` (absent or null: `default`, if there is one)."""
    value = obj.get(key)
    if value is None and default is not None:
        return default
    number = _whole(value)
    if number is None or not 0 <= number <= maximum:
        raise ModelError(f"field {key!r} is not a whole number in 0..{maximum}")
    return number


def _extra(obj: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in known}


@dataclass(frozen=True, slots=True)
class WorkData:
    type: str
    id: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_healthcheck(self) -> bool:
        return self.type == "healthcheck"


@dataclass(frozen=True, slots=True)
class Work:
    """A work item. `secret` is a `WorkSecret` (redacted in repr) or None."""

    id: str
    environment_id: str
    data: WorkData
    state: str
    metadata: dict[str, str]
    created_at: str | None = None
    acknowledged_at: str | None = None
    started_at: str | None = None
    latest_heartbeat_at: str | None = None
    stop_requested_at: str | None = None
    stopped_at: str | None = None
    secret: WorkSecret | None = field(default=None, repr=False, compare=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def session_id(self) -> str | None:
        return self.data.id if self.data.type == "session" else None

    @classmethod
    def from_json(cls, obj: Any) -> Work:
        if not isinstance(obj, _OBJECT):
            raise ModelError("a work item is not a JSON object")
        data = obj.get("data")
        if not isinstance(data, _OBJECT):
            raise ModelError("missing field 'data'")
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, _OBJECT):
            raise ModelError("field 'metadata' is not an object")
        secret = _str(obj, "secret", required=False)
        times = {name: _str(obj, name, required=False) for name in WORK_TIMESTAMPS}
        return cls(
            id=_str(obj, "id") or "",
            environment_id=_str(obj, "environment_id", required=False) or "",
            data=WorkData(
                type=_str(data, "type") or "",
                id=_str(data, "id", required=False) or "",
                extra=_extra(data, WORK_DATA_FIELDS),
            ),
            state=_str(obj, "state") or "",
            metadata={str(k): str(v) for k, v in metadata.items()},
            **times,
            secret=WorkSecret(secret) if secret else None,
            extra=_extra(obj, WORK_FIELDS),
        )

    def to_json(self) -> dict[str, Any]:
        """The work object as JSON, with `secret` always null (for handing to scripts and logs)."""
        work = work_object(
            id=self.id,
            environment_id=self.environment_id,
            data={"type": self.data.type, "id": self.data.id, **self.data.extra},
            state=self.state,
            metadata=self.metadata,
            timestamps={name: getattr(self, name) for name in WORK_TIMESTAMPS},
            secret=None,
        )
        return {**work, **self.extra}


@dataclass(frozen=True, slots=True)
class HeartbeatResult:
    """The answer to a heartbeat. Echo `last_heartbeat` exactly in the next one."""

    last_heartbeat: str
    lease_extended: bool
    state: str
    ttl_seconds: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any) -> HeartbeatResult:
        if not isinstance(obj, _OBJECT):
            raise ModelError("a heartbeat response is not a JSON object")
        extended = obj.get("lease_extended", False)
        if not isinstance(extended, bool):
            raise ModelError("field 'lease_extended' is not a boolean")
        return cls(
            last_heartbeat=_str(obj, "last_heartbeat") or "",
            lease_extended=extended,
            state=_str(obj, "state") or "",
            ttl_seconds=_number(obj, "ttl_seconds", MAX_TTL_SECONDS, default=0),
            extra=_extra(obj, HEARTBEAT_FIELDS),
        )


@dataclass(frozen=True, slots=True)
class LeaseSnapshot:
    """The server's view of a lease, as a 412 reports it in `details.current_state`."""

    state: str | None
    last_heartbeat: str | None
    lease_extended: bool | None
    ttl_seconds: int | None
    lease_updated_at: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any) -> LeaseSnapshot | None:
        if not isinstance(obj, _OBJECT):
            return None
        ttl = _whole(obj.get("ttl_seconds"))
        extended = obj.get("lease_extended")
        return cls(
            state=_str(obj, "state", required=False),
            last_heartbeat=_str(obj, "last_heartbeat", required=False),
            lease_extended=extended if isinstance(extended, bool) else None,
            ttl_seconds=ttl if ttl is not None and 0 <= ttl <= MAX_TTL_SECONDS else None,
            lease_updated_at=_str(obj, "lease_updated_at", required=False),
            extra=_extra(obj, LEASE_SNAPSHOT_FIELDS),
        )


@dataclass(frozen=True, slots=True)
class QueueStats:
    depth: int
    pending: int
    oldest_queued_at: str | None
    workers_polling: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: Any) -> QueueStats:
        if not isinstance(obj, _OBJECT):
            raise ModelError("queue stats are not a JSON object")

        def count(key: str) -> int:
            return _number(obj, key, MAX_COUNT, default=0)

        return cls(
            depth=count("depth"),
            pending=count("pending"),
            oldest_queued_at=_str(obj, "oldest_queued_at", required=False),
            workers_polling=count("workers_polling"),
            extra=_extra(obj, QUEUE_STATS_FIELDS),
        )


@dataclass(frozen=True, slots=True)
class WorkPage:
    """One page of a list.

    `next_cursor` is the cursor of the next page (None on the last), whatever way the provider pages: pass it back
    as `list_page(cursor=...)`. `next_page` is the provider's own `page` token as sent (None when it sent none).
    """

    data: list[Work]
    next_page: str | None
    extra: dict[str, Any] = field(default_factory=dict)
    next_cursor: str | None = None

    @classmethod
    def from_json(cls, obj: Any, pagination: Pagination = Pagination.PAGE) -> WorkPage:
        if not isinstance(obj, _OBJECT) or not isinstance(obj.get("data"), list):
            raise ModelError("a work list page has no 'data' array")
        next_page = _str(obj, "next_page", required=False)
        cursor = next_page
        last_id = obj.get("last_id")
        after_id_pages = pagination is Pagination.PAGE_OR_AFTER_ID
        if not cursor and after_id_pages and obj.get("has_more") and isinstance(last_id, str):
            cursor = AFTER_ID_CURSOR + last_id
        return cls(
            data=[Work.from_json(item) for item in obj["data"]],
            next_page=next_page,
            extra=_extra(obj, LIST_PAGE_KEYS),
            next_cursor=cursor or None,
        )


def cursor_params(cursor: str | None, pagination: Pagination) -> dict[str, str]:
    """The query parameters that ask for the page a `WorkPage.next_cursor` names."""
    if not cursor:
        return {}
    if pagination is Pagination.PAGE_OR_AFTER_ID and cursor.startswith(AFTER_ID_CURSOR):
        return {"after_id": cursor[len(AFTER_ID_CURSOR) :]}
    return {"page": cursor}
