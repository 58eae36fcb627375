"""One exception hierarchy for everything the Work API client can raise.

    WorkApiError
    ├── TransportError              no HTTP answer: connection dropped, timeout (the request may have been applied)
    │   ├── RequestTimeout
    │   └── ConnectError            no connection: the request was never sent
    │       └── TLSError            the TLS handshake failed (a certificate problem): final, not retried
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

Messages carry the status, the error type, the server's message (the client's own secrets masked by value, and
every token-like run: it may quote a secret) and the request id; never a header, a key or a secret.

Whether the Work API may have applied a request is part of every error (`maybe_applied`): an error whose outcome
is unknown (no answer, a broken or untrusted answer, a 5xx that a gateway may have put in place of the real
answer) on any attempt of a call makes the whole call's error `maybe_applied`, and so a refusal (409, 412) by a
later attempt of the same call: that refusal may have been caused by the call's own earlier attempt. Callers
settle such a refusal by reading the item (`sidecar.core._doubt`), never by believing it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ._models import LeaseSnapshot

_TOKEN_LIKE = re.compile(r"[A-Za-z0-9_\-+/.=~]{40,}")
"""A run of 40 or more token characters: a key, an item secret, a session token (ids are shorter)."""
MAX_SERVER_MESSAGE = 300


REDACTED = "[redacted]"


def masked(message: str, secrets: Iterable[str] = ()) -> str:
    """The Work API's own error text as it may appear in our exceptions (and so in logs, spans and gRPC statuses):
    each of `secrets` replaced by value (whatever its length or shape: the API key, items' secrets and session
    tokens), then any token-like run, each by `[redacted]`; cut to 300 characters. The text is the server's: it may
    quote an item's secret or a key. The raw text stays on the exception as `server_message` for code that needs
    it."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):  # the longest first: one may hold another
        if secret in message:
            message = message.replace(secret, REDACTED)
    text = _TOKEN_LIKE.sub(REDACTED, message)
    return text if len(text) <= MAX_SERVER_MESSAGE else text[:MAX_SERVER_MESSAGE] + "…"


class WorkApiError(Exception):
    """Base class of every error the Work API client raises."""

    operation: str | None = None
    attempts: int = 1
    outcome_unknown: bool = False
    """This attempt's outcome is unknown: the Work API may have applied the request (class-level per kind)."""
    maybe_applied: bool = False
    """Set by the client on the error a call raises: some attempt of the call had an unknown outcome, so the Work
    API may have applied the request (and a refusal by a later attempt may be the work of an earlier one)."""

    def __init__(self, message: str, *, operation: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.operation = operation


class TransportError(WorkApiError):
    """The request got no complete HTTP answer (the connection dropped, a protocol error, a timeout): the request
    may have been applied."""

    outcome_unknown = True


class RequestTimeout(TransportError):
    """The request did not complete within its timeout."""


class ConnectError(TransportError):
    """No connection to the Work API (refused, unreachable, the connect timed out): the request was never sent."""

    outcome_unknown = False


class TLSError(ConnectError):
    """The TLS handshake failed: the message names the certificate problem. Not retried (it does not pass)."""


class ResponseError(WorkApiError):
    """The Work API answered 2xx with a body that is not what the protocol promises, or an answer that does not
    belong to its request: the request may have been applied."""

    outcome_unknown = True


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
        secrets: Iterable[str] = (),
    ) -> None:
        self.status_code = status_code
        self.error_type = error_type
        self.server_message = message
        self.details: Mapping[str, Any] = details or {}
        self.request_id = request_id
        self.retry_after = retry_after
        self.should_retry = should_retry
        text = f"{operation or 'request'} failed: HTTP {status_code} {error_type}: {masked(message, secrets)}"
        if request_id:
            text += f" (request_id={request_id})"
        super().__init__(text, operation=operation)
        self.outcome_unknown = status_code >= 500  # a gateway's answer in place of the API's: it may have applied it

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
