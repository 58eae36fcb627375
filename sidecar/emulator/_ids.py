"""Identifiers, timestamps and per-item secrets in each provider's style."""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import time
from datetime import UTC, datetime, timedelta

_BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
ONE_MICROSECOND = timedelta(microseconds=1)


def _base58(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, digit = divmod(number, 58)
        digits.append(_BASE58[digit])
    return "".join(digits)


def new_id(prefix: str, style: str) -> str:
    """`anthropic`: `work_011CZkZ9X2dpNyB7HsEFoRfW`; `qoder`: prefix + 32 lowercase hex (time-ordered, like
    `work_019f3be4fd2475d9a784bf2c739e1194`)."""
    if style == "qoder":
        return f"{prefix}_{int(time.time() * 1000):012x}{secrets.token_hex(10)}"
    return f"{prefix}_011C" + _base58(int.from_bytes(secrets.token_bytes(15)), 20)


_REQUEST_STEM = "req_011C" + _base58(int.from_bytes(secrets.token_bytes(9)), 12)
_request_numbers = itertools.count(1)


def request_id() -> str:
    """`req_011C…`, unique per process (a random stem and a counter: cheap enough for every request)."""
    return _REQUEST_STEM + _base58(next(_request_numbers), 8)[::-1]


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(when: datetime) -> str:
    """RFC 3339 in UTC with microseconds: `2026-07-01T08:15:06.120394Z`."""
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_rfc3339(value: str) -> datetime | None:
    """The instant an RFC 3339 timestamp names, or None when it is not one (a zone is required)."""
    if len(value) < 20 or value[10] not in "Tt ":
        return None
    try:
        parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value[-1] in "Zz" else value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def new_secret(api_base_url: str, *, padded: bool) -> tuple[str, str]:
    """(secret, sessions_token): the secret is URL-safe base64 of
    `{"sessions_token": "sk-ant-req-…", "api_base_url": "…"}`, with its padding kept or stripped.

    The payload length is chosen so that the padded form really has padding, so callers see both variants."""
    token = "sk-ant-req-" + secrets.token_urlsafe(32)
    payload = json.dumps({"sessions_token": token, "api_base_url": api_base_url}, separators=(",", ":"))
    if len(payload.encode()) % 3 == 0:
        token += secrets.choice("abcdefghijkmnopqrstuvwxyz")
        payload = json.dumps({"sessions_token": token, "api_base_url": api_base_url}, separators=(",", ":"))
    encoded = base64.urlsafe_b64encode(payload.encode()).decode("ascii")
    return (encoded if padded else encoded.rstrip("=")), token
