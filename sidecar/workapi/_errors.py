"""One exception hierarchy for everything the Work API client can raise.

    WorkApiError
    ├── TransportError              no HTTP answer: connection refused or dropped, timeout
    │   └── RequestTimeout
    ├── ResponseError               an answer that is not what the protocol promises
    └── APIStatusError              an HTTP error with the Work API's error envelope
        ├── BadRequestError         400
        ├── AuthenticationError     401
        ├── PermissionDeniedError   403
        ├── NotFoundError           404
        ├── ConflictError           409
        ├── PreconditionFailedError 412
        │   └── LeaseLostError      412 on a heartbeat: someone else holds the lease
        ├── RateLimitError          429
        └── ServerError             5xx (OverloadedError 529, GatewayTimeoutError 504)

Messages carry the status, the error type, the server's message (token-like runs masked: it may quote a secret)
and the request id; never a header, a key or a secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ._models import LeaseSnapshot

_TOKEN_LIKE = re.compile(r"[A-Za-z0-9_\-+/.=~]{40,}")
"""A run of 40 or more token characters: a key, an item secret, a session token (ids are shorter)."""
MAX_SERVER_MESSAGE = 300


def masked(message: str) -> str:
    """The Work API's own error text as it may appear in our exceptions (and so in logs, spans and gRPC statuses):
    any token-like run replaced by `[redacted]`, cut to 300 characters. The text is the server's: it may quote an
    item's secret or a key. The raw text stays on the exception as `server_message` for code that needs it."""
    text = _TOKEN_LIKE.sub("[redacted]", message)
    return text if len(text) <= MAX_SERVER_MESSAGE else text[:MAX_SERVER_MESSAGE] + "…"


class WorkApiError(Exception):
    """Base class of every error the Work API client raises."""

    operation: str | None = None
    attempts: int = 1

    def __init__(self, message: str, *, operation: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.operation = operation


class TransportError(WorkApiError):
    """The request got no HTTP answer (connection refused or dropped, protocol error)."""


class RequestTimeout(TransportError):
    """The request did not complete within its timeout."""


class ResponseError(WorkApiError):
    """The Work API answered 2xx with a body that is not what the protocol promises."""


class APIStatusError(WorkApiError):
    """An HTTP error status with the Work API's error envelope."""

    def __init__(
        self,
        *,
        status_code: int,
        error_type: str,
        message: str,
        details: Mapping[str, Any] | None,
        request_id: str | None,
        operation: str | None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        self.status_code = status_code
        self.error_type = error_type
        self.server_message = message
        self.details: Mapping[str, Any] = details or {}
        self.request_id = request_id
        self.retry_after = retry_after
        self.should_retry = should_retry
        text = f"{operation or 'request'} failed: HTTP {status_code} {error_type}: {masked(message)}"
        if request_id:
            text += f" (request_id={request_id})"
        super().__init__(text, operation=operation)

    @property
    def error_code(self) -> str | None:
        code = self.details.get("error_code")
        return code if isinstance(code, str) else None


class BadRequestError(APIStatusError):
    """400: the request is malformed (bad TTL, bad block_ms, environment not self-hosted, …)."""


class AuthenticationError(APIStatusError):
    """401: the key is missing, invalid or expired."""


class PermissionDeniedError(APIStatusError):
    """403: the key may not do this operation."""


class NotFoundError(APIStatusError):
    """404: the environment or work item does not exist."""


class ConflictError(APIStatusError):
    """409: the item is in a state that does not allow this (for example acked already, or queued)."""


class PreconditionFailedError(APIStatusError):
    """412: a conditional request's precondition failed."""

    @property
    def current_state(self) -> LeaseSnapshot | None:
        return LeaseSnapshot.from_json(self.details.get("current_state"))


class LeaseLostError(PreconditionFailedError):
    """412 on a heartbeat: `expected_last_heartbeat` did not match; the lease is someone else's.

    `current_state` holds the server's view of the lease. Stop working on the item at once and do not
    call stop: it is no longer yours.
    """


class RateLimitError(APIStatusError):
    """429: too many requests; `retry_after` says how long to wait when the server said so."""


class ServerError(APIStatusError):
    """5xx: the Work API failed; retried with backoff."""


class GatewayTimeoutError(ServerError):
    """504."""


class OverloadedError(ServerError):
    """529."""


_BY_STATUS: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    412: PreconditionFailedError,
    429: RateLimitError,
    504: GatewayTimeoutError,
    529: OverloadedError,
}


def status_error_class(status_code: int, operation: str) -> type[APIStatusError]:
    if status_code == 412 and operation == "heartbeat":
        return LeaseLostError
    cls = _BY_STATUS.get(status_code)
    if cls is not None:
        return cls
    return ServerError if status_code >= 500 else APIStatusError
