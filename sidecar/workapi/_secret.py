"""The per-item `secret`: a credential that must never be printed.

It is URL-safe base64 JSON, with or without padding:
`{"sessions_token": "sk-ant-req-…", "api_base_url": "…"}`. Neither the raw string nor the decoded
values appear in `repr`, `str`, logs or exceptions; callers take them out explicitly with `reveal()`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any


class SecretDecodeError(ValueError):
    """The secret is not URL-safe base64 JSON (its content is deliberately not in the message)."""


@dataclass(frozen=True, slots=True)
class SessionCredentials:
    """The decoded secret. `sessions_token` is hidden from repr."""

    sessions_token: str = field(repr=False)
    api_base_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)


class WorkSecret:
    """Holds the raw secret; prints as `WorkSecret(<redacted>)`."""

    __slots__ = ("__raw",)

    def __init__(self, raw: str) -> None:
        self.__raw = raw

    def reveal(self) -> str:
        """The raw string exactly as the Work API sent it."""
        return self.__raw

    def decode(self) -> SessionCredentials:
        raw = self.__raw.strip()
        try:
            padded = raw + "=" * (-len(raw) % 4)
            obj = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        except (binascii.Error, ValueError, UnicodeError):
            raise SecretDecodeError("the work item secret is not URL-safe base64 JSON") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("sessions_token"), str):
            raise SecretDecodeError("the work item secret has no sessions_token")
        base_url = obj.get("api_base_url")
        extra = {k: v for k, v in obj.items() if k not in ("sessions_token", "api_base_url")}
        return SessionCredentials(
            sessions_token=obj["sessions_token"],
            api_base_url=base_url if isinstance(base_url, str) else None,
            extra=extra,
        )

    def __repr__(self) -> str:
        return "WorkSecret(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkSecret) and other.reveal() == self.__raw

    def __hash__(self) -> int:
        return hash(self.__raw)

    def __reduce__(self) -> Any:
        raise TypeError("a WorkSecret cannot be pickled")
