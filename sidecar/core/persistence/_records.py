"""The journal's record format: one line per record, its own names for lease states and reasons, a version.

    <crc32 of the JSON, 8 hex digits> <JSON object>\\n

- `H` the header, first: format version, environment, API URL, provider and a hash of the API key (`Binding`);
- `L` the full state of a held lease: work id, item data, the last `last_heartbeat` (the CAS value), TTL,
  expiry (wall clock), sandbox id, stop state and the token's nonce (never the token, never the `secret`);
- `E` a lease ended, with its state and reason (kept as a tombstone for a sandbox that re-attaches later);
- `A` an item is about to be acked; `S` its claim settled without a lease (a later `L` settles it too);
- `C` the sidecar drained and closed the journal cleanly (its releases were sent).

States and reasons are written by name (`STATE_NAMES`, `REASON_NAMES`), never as protobuf enum numbers, so the
file does not change meaning with the gRPC API. Format 1 wrote those numbers; it is still read (`FORMAT_1_STATES`,
`FORMAT_1_REASONS` are that format's numbering, fixed) and every journal is written afresh in `FORMAT` when a
sidecar opens it.

A record whose checksum holds but whose values no sidecar writes (a non-finite expiry, a TTL that is not positive,
an id that is not an id, an unknown state or reason) parses to None: the reader counts it as invalid and skips it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...work.v1 import work_service_pb2 as pb

if TYPE_CHECKING:
    from ..engine._lease import Lease

FORMAT = 2
READABLE_FORMATS = frozenset({1, 2})

STATE_NAMES: dict[int, str] = {
    pb.LEASE_STATE_ACTIVE: "active",
    pb.LEASE_STATE_STOP_REQUESTED: "stop_requested",
    pb.LEASE_STATE_LOST: "lost",
    pb.LEASE_STATE_STOPPED: "stopped",
}
REASON_NAMES: dict[int, str] = {
    pb.LEASE_LOST_REASON_UNSPECIFIED: "unspecified",
    pb.LEASE_LOST_REASON_PRECONDITION_FAILED: "precondition_failed",
    pb.LEASE_LOST_REASON_NOT_EXTENDED: "not_extended",
    pb.LEASE_LOST_REASON_EXPIRED: "expired",
    pb.LEASE_LOST_REASON_NOT_FOUND: "not_found",
    pb.LEASE_LOST_REASON_SANDBOX_GONE: "sandbox_gone",
    pb.LEASE_LOST_REASON_DRAINED: "drained",
    pb.LEASE_LOST_REASON_STOPPED: "stopped",
    pb.LEASE_LOST_REASON_INTERNAL: "internal",
    pb.LEASE_LOST_REASON_UNKNOWN: "unknown",
}
FORMAT_1_STATES: dict[int, str] = {1: "active", 2: "stop_requested", 3: "lost", 4: "stopped"}
FORMAT_1_REASONS: dict[int, str] = {
    0: "unspecified", 1: "precondition_failed", 2: "not_extended", 3: "expired", 4: "not_found",
    5: "sandbox_gone", 6: "drained", 7: "stopped", 8: "internal", 9: "unknown",
}  # fmt: skip
_STATES = {name: value for value, name in STATE_NAMES.items()}
_REASONS = {name: value for value, name in REASON_NAMES.items()}
_HELD = frozenset({pb.LEASE_STATE_ACTIVE, pb.LEASE_STATE_STOP_REQUESTED})
_ENDED = frozenset({pb.LEASE_STATE_LOST, pb.LEASE_STATE_STOPPED})

ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""A work id as the Work API makes them (and as a sandbox may name them)."""
_NONCE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PRINTABLE = re.compile(r"[\x21-\x7e]{1,256}")
_MAX_EPOCH = 253402300799.0
"""The last second of year 9999: the latest instant a `datetime` holds."""


def encode(record: dict[str, Any]) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode(line: bytes) -> dict[str, Any] | None:
    """The record of one line (without its newline), or None when it does not check out."""
    crc, sep, payload = line.partition(b" ")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(payload):
            return None
        record = json.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("op"), str) else None


@dataclass(frozen=True, slots=True)
class Binding:
    """What a journal belongs to. The API key only as a hash."""

    environment_id: str
    api_url: str
    provider: str
    key_hash: str = field(repr=False)

    @classmethod
    def of(cls, *, environment_id: str, api_url: str, provider: str, api_key: str) -> Binding:
        digest = hashlib.sha256(b"work-sidecar journal\0" + api_key.encode()).hexdigest()[:32]
        return cls(environment_id, api_url.rstrip("/"), provider, digest)

    def header(self) -> bytes:
        return encode(
            {
                "op": "H",
                "format": FORMAT,
                "environment_id": self.environment_id,
                "api_url": self.api_url,
                "provider": self.provider,
                "key": self.key_hash,
            }
        )

    def mismatch(self, header: dict[str, Any]) -> str | None:
        """Which binding differs ('environment', 'API URL', …), or None when the header is ours."""
        version = header.get("format")
        if isinstance(version, bool) or version not in READABLE_FORMATS:
            return f"format {version!r}"
        for name, key, ours in (
            ("environment", "environment_id", self.environment_id),
            ("API URL", "api_url", self.api_url),
            ("provider", "provider", self.provider),
            ("API key", "key", self.key_hash),
        ):
            if header.get(key) != ours:
                return name
        return None


@dataclass(frozen=True, slots=True)
class JournaledLease:
    work_id: str
    data_type: str
    data_id: str
    last_heartbeat: str = field(repr=False)
    ttl_seconds: int
    expires_at: float
    """Wall-clock expiry (epoch seconds) after the last successful heartbeat."""
    nonce: str = field(repr=False)
    sandbox_id: str
    state: int
    stop_notified: bool

    def line(self) -> bytes:
        return lease_line(
            self.work_id, self.data_type, self.data_id, self.last_heartbeat, self.ttl_seconds, self.expires_at,
            self.nonce, self.sandbox_id, self.state, self.stop_notified,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class JournaledEnd:
    work_id: str
    data_type: str
    data_id: str
    nonce: str = field(repr=False)
    state: int
    reason: int
    last_heartbeat: str = field(repr=False)
    expires_at: float
    ended_at: float

    def line(self) -> bytes:
        return end_line(
            self.work_id, self.data_type, self.data_id, self.nonce, self.state, self.reason, self.last_heartbeat,
            self.expires_at, self.ended_at,
        )  # fmt: skip


def lease_line(
    work_id: str, data_type: str, data_id: str, last_heartbeat: str, ttl_seconds: int, expires_at: float,
    nonce: str, sandbox_id: str, state: int, stop_notified: bool,
) -> bytes:  # fmt: skip
    return encode(
        {
            "op": "L",
            "work": work_id,
            "type": data_type,
            "data_id": data_id,
            "hb": last_heartbeat,
            "ttl": ttl_seconds,
            "exp": round(expires_at, 3),
            "nonce": nonce,
            "sandbox": sandbox_id,
            "state": STATE_NAMES[state],
            "told": stop_notified,
        }
    )


def end_line(
    work_id: str, data_type: str, data_id: str, nonce: str, state: int, reason: int, last_heartbeat: str,
    expires_at: float, ended_at: float,
) -> bytes:  # fmt: skip
    return encode(
        {
            "op": "E",
            "work": work_id,
            "type": data_type,
            "data_id": data_id,
            "nonce": nonce,
            "state": STATE_NAMES[state],
            "reason": REASON_NAMES.get(reason, "unknown"),
            "hb": last_heartbeat,
            "exp": round(expires_at, 3),
            "at": round(ended_at, 3),
        }
    )


def held_line(lease: Lease) -> bytes:
    """The `L` record of a held lease."""
    work = lease.work
    return lease_line(
        lease.work_id, work.data.type, work.data.id, lease.last_heartbeat, lease.ttl_seconds,
        lease.expires_at.timestamp(), lease.nonce, lease.sandbox_id, lease.state, lease.stop_notified,
    )  # fmt: skip


def ended_line(lease: Lease) -> bytes:
    """The `E` record of a lease that has just ended."""
    work = lease.work
    return end_line(
        lease.work_id, work.data.type, work.data.id, lease.nonce, lease.state, lease.lost_reason, lease.last_heartbeat,
        lease.expires_at.timestamp(), time.time(),
    )  # fmt: skip


def acking_line(work_id: str) -> bytes:
    return encode({"op": "A", "work": work_id, "at": round(time.time(), 3)})


def settled_line(work_id: str) -> bytes:
    return encode({"op": "S", "work": work_id})


def closed_line() -> bytes:
    return encode({"op": "C", "work": "", "at": round(time.time(), 3)})


# -- reading ------------------------------------------------------------------------------------------------------


class _Impossible(ValueError):
    """A record that checks out (checksum, JSON) but holds values no sidecar writes."""


def parse_lease(record: dict[str, Any], version: int) -> JournaledLease | None:
    """The lease of an `L` record written in format `version`, or None when a value is missing or impossible."""
    try:
        ttl = record.get("ttl")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 < ttl < 2**31:
            raise _Impossible("ttl")
        told = record.get("told", False)
        if not isinstance(told, bool):
            raise _Impossible("told")
        work_id, nonce = _text(record, "work", ID), _text(record, "nonce", _NONCE)
        last_heartbeat = _text(record, "hb", _PRINTABLE)
        if not (work_id and nonce and last_heartbeat):
            raise _Impossible("work")
        state = _state(record, version, default=pb.LEASE_STATE_ACTIVE)
        if state not in _HELD:
            raise _Impossible("state")
        return JournaledLease(
            work_id=work_id,
            data_type=_text(record, "type", _PRINTABLE, default=""),
            data_id=_text(record, "data_id", _PRINTABLE, default=""),
            last_heartbeat=last_heartbeat,
            ttl_seconds=ttl,
            expires_at=_instant(record, "exp"),
            nonce=nonce,
            sandbox_id=_text(record, "sandbox", _PRINTABLE, default=""),
            state=state,
            stop_notified=told,
        )
    except _Impossible:
        return None


def parse_end(record: dict[str, Any], version: int) -> JournaledEnd | None:
    """The end of an `E` record written in format `version`, or None when a value is missing or impossible."""
    try:
        work_id, nonce = _text(record, "work", ID), _text(record, "nonce", _NONCE)
        if not (work_id and nonce):
            raise _Impossible("work")
        state = _state(record, version)
        if state not in _ENDED:
            raise _Impossible("state")
        return JournaledEnd(
            work_id=work_id,
            data_type=_text(record, "type", _PRINTABLE, default=""),
            data_id=_text(record, "data_id", _PRINTABLE, default=""),
            nonce=nonce,
            state=state,
            reason=_reason(record, version),
            last_heartbeat=_text(record, "hb", _PRINTABLE, default=""),
            expires_at=_instant(record, "exp", default=0),
            ended_at=_instant(record, "at", default=0),
        )
    except _Impossible:
        return None


def _text(record: dict[str, Any], key: str, pattern: re.Pattern[str], *, default: str | None = None) -> str:
    value = record.get(key, default)
    if not isinstance(value, str) or (value and not pattern.fullmatch(value)):
        raise _Impossible(key)
    return value


def _instant(record: dict[str, Any], key: str, *, default: float | None = None) -> float:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= _MAX_EPOCH:
        raise _Impossible(key)  # NaN and the infinities fail the range check too
    return float(value)


def _state(record: dict[str, Any], version: int, *, default: int | None = None) -> int:
    value = record.get("state")
    if value is None and default is not None:
        return default
    return _named(value, version, FORMAT_1_STATES, _STATES, "state")


def _reason(record: dict[str, Any], version: int) -> int:
    value = record.get("reason")
    if value is None:
        return pb.LEASE_LOST_REASON_UNSPECIFIED
    return _named(value, version, FORMAT_1_REASONS, _REASONS, "reason")


def _named(value: object, version: int, numbered: dict[int, str], named: dict[str, int], key: str) -> int:
    """A state or reason: by number in format 1, by name since."""
    if version == 1:
        if isinstance(value, bool) or not isinstance(value, int) or value not in numbered:
            raise _Impossible(key)
        value = numbered[value]
    if not isinstance(value, str) or value not in named:
        raise _Impossible(key)
    return named[value]
